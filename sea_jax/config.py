"""Model configuration: one dataclass for every OPT variant, plus the SEA settings.

Variants are made with `dataclasses.replace`, never with flags spread through the model.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from sea_jax.errors import UserError

ATTENTION_KINDS = ("dense", "sea", "performer")
SPARSE_IMPLS = ("auto", "xla", "pallas")


class ConfigError(UserError, ValueError):
  """A configuration that cannot describe a working model."""


@dataclasses.dataclass(frozen=True)
class SEAConfig:
  """SEA attention settings (../shared/SEA_SPEC.md §1, §3).

  K: compressed width ("predictor length"); must be a multiple of 4.
  k: default target keys per query per head; the call may override it (dynamic k).
  nbf: Performer feature ratio, m = int(d * ln(d) / nbf) random features.
  performer_chunk: time chunk of the causal linear attention prefix sums.
  query_block: query rows per block in the pure-JAX sparse attention.
  sparse_impl: "xla" (pure JAX), "pallas" (kernel) or "auto" (pallas on GPU/TPU, xla on CPU).
  jitter: the reference's training-only key-rank noise (10% of calls); off by default.
  seed: seed of the fixed orthogonal random features and the fresh SEA parameters.
  """
  K: int = 256
  k: int = 64
  nbf: float = 8.0
  performer_chunk: int = 128
  query_block: int = 128
  sparse_impl: str = "auto"
  jitter: bool = False
  seed: int = 0

  def validate(self) -> None:
    if self.K < 4 or self.K % 4:
      raise ConfigError(f"SEA K must be a positive multiple of 4, got K={self.K}")
    if self.k < 1:
      raise ConfigError(f"SEA k must be >= 1, got k={self.k}")
    if self.sparse_impl not in SPARSE_IMPLS:
      raise ConfigError(f"sparse_impl must be one of {SPARSE_IMPLS}, got {self.sparse_impl!r}")
    if self.performer_chunk < 1 or self.query_block < 1:
      raise ConfigError("performer_chunk and query_block must be >= 1")


@dataclasses.dataclass(frozen=True)
class OPTConfig:
  """OPT hyperparameters (names follow Hugging Face `OPTConfig`) and runtime choices.

  dtype: compute dtype; param_dtype: storage dtype of the parameters.
  attention: "dense", "sea" or "performer" for every layer in `attention_layers`
    (None = all layers); the other layers stay dense.
  """
  vocab_size: int = 50272
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  ffn_dim: int = 3072
  max_position_embeddings: int = 2048
  word_embed_proj_dim: int = 768
  do_layer_norm_before: bool = True
  layer_norm_elementwise_affine: bool = True
  enable_bias: bool = True
  activation_function: str = "relu"
  dropout: float = 0.1
  attention_dropout: float = 0.0
  pad_token_id: int = 1
  bos_token_id: int = 2
  eos_token_id: int = 2
  tie_word_embeddings: bool = True
  _remove_final_layer_norm: bool = False
  layer_norm_eps: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention: str = "dense"
  attention_layers: tuple[int, ...] | None = None
  sea: SEAConfig = SEAConfig()
  remat: bool = False

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def has_final_layer_norm(self) -> bool:
    return self.do_layer_norm_before and not self._remove_final_layer_norm

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)

  def attention_kind(self, layer: int) -> str:
    """The attention implementation that layer `layer` uses."""
    if self.attention_layers is None or layer in self.attention_layers:
      return self.attention
    return "dense"

  def validate(self) -> None:
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by "
                        f"num_attention_heads {self.num_attention_heads}")
    if self.attention not in ATTENTION_KINDS:
      raise ConfigError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
    if self.activation_function != "relu":
      raise ConfigError(f"only OPT's relu FFN is supported, got {self.activation_function!r}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")
    if self.attention_layers is not None:
      bad = [i for i in self.attention_layers if not 0 <= i < self.num_hidden_layers]
      if bad:
        raise ConfigError(f"attention_layers {bad} outside 0..{self.num_hidden_layers - 1}")
    self.sea.validate()

  # --- (de)serialisation -------------------------------------------------------------------

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], **overrides) -> "OPTConfig":
    """Builds a config from a Hugging Face OPT `config.json` dict (plus our own keys)."""
    model_type = hf.get("model_type")
    if model_type != "opt":
      raise ConfigError(f"model_type is {model_type!r}, not 'opt': only OPT checkpoints are supported")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in hf.items() if k in names and k not in ("sea", "attention_layers")}
    if "word_embed_proj_dim" not in hf or hf.get("word_embed_proj_dim") is None:
      kwargs["word_embed_proj_dim"] = hf["hidden_size"]
    sea_jax_extra = hf.get("sea_jax", {})
    for key in ("attention", "remat"):
      if key in sea_jax_extra:
        kwargs[key] = sea_jax_extra[key]
    if sea_jax_extra.get("attention_layers") is not None:
      kwargs["attention_layers"] = tuple(sea_jax_extra["attention_layers"])
    if "sea" in sea_jax_extra:
      kwargs["sea"] = SEAConfig(**sea_jax_extra["sea"])
    cfg = dataclasses.replace(cls(), **kwargs)
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()
    return cfg

  def to_hf_dict(self) -> dict[str, Any]:
    """A Hugging Face OPT `config.json` dict; SEA settings ride along under "sea_jax"."""
    hf = {
        "model_type": "opt",
        "architectures": ["OPTForCausalLM"],
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "ffn_dim": self.ffn_dim,
        "max_position_embeddings": self.max_position_embeddings,
        "word_embed_proj_dim": self.word_embed_proj_dim,
        "do_layer_norm_before": self.do_layer_norm_before,
        "layer_norm_elementwise_affine": self.layer_norm_elementwise_affine,
        "enable_bias": self.enable_bias,
        "activation_function": self.activation_function,
        "dropout": self.dropout,
        "attention_dropout": self.attention_dropout,
        "pad_token_id": self.pad_token_id,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "tie_word_embeddings": self.tie_word_embeddings,
        "_remove_final_layer_norm": self._remove_final_layer_norm,
        "torch_dtype": self.param_dtype,
    }
    hf["sea_jax"] = {
        "attention": self.attention,
        "attention_layers": list(self.attention_layers) if self.attention_layers is not None else None,
        "sea": dataclasses.asdict(self.sea),
        "remat": self.remat,
    }
    return hf


def load_config(folder: str, **overrides) -> OPTConfig:
  """Reads `folder/config.json` into an OPTConfig."""
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"no config.json in {folder}")
  try:
    with open(path) as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is not valid JSON: {e}") from None
  return OPTConfig.from_hf_dict(hf, **overrides)
