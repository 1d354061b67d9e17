"""Model configuration: one dataclass per model family (OPT, Llama), plus the SEA settings.

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
SPARSE_IMPLS = ("auto", "xla", "blocked", "pallas")
DENSE_IMPLS = ("auto", "reference", "chunked", "cudnn", "splash")
COMPUTE_DTYPES = ("float32", "bfloat16")  # what the commands offer (--dtype)
PARAM_DTYPES = ("float32", "bfloat16", "float16")  # storage of parameters
MAX_POSITION_ROWS = 8192  # default cap on the rows of SEA's position table P (SEAConfig)


class ConfigError(UserError, ValueError):
  """A configuration that cannot describe a working model."""


def check_sea_K(K: int) -> None:
  """SEA's compressed width: a positive multiple of 4 (the estimator's rows are K/4 wide)."""
  if K < 4 or K % 4:
    raise ConfigError(f"SEA K must be a positive multiple of 4, got K={K}")


@dataclasses.dataclass(frozen=True)
class SEAConfig:
  """SEA attention settings (../shared/SEA_SPEC.md §1, §3).

  K: compressed width ("predictor length"); must be a multiple of 4.
  k: default target keys per query per head; the call may override it (dynamic k).
  nbf: Performer feature ratio, m = int(d * ln(d) / nbf) random features.
  performer_chunk: time chunk of the causal linear attention prefix sums.
  query_block: query rows per block in the pure-JAX sparse attention.
  sparse_impl: "xla" (pure JAX tile list, work follows the kept tiles), "blocked" (pure JAX,
    each query block over the keys it can see: causal dense work, linear memory, cheaper on
    CPU at short T),
    "pallas" (kernel) or "auto" (pallas on GPU/TPU; on CPU blocked below
    `sea.layer.AUTO_TILE_MIN_BLOCKS` query blocks, xla from there).
  seed: seed of the fixed orthogonal random features and the fresh SEA parameters.
  position_rows: rows of the Performer branch's learned value table P (None = the model's
    max_position_embeddings, capped at MAX_POSITION_ROWS); with fewer rows than positions,
    position s reads P by linear interpolation at s * (rows - 1) / (max_positions - 1).
  pooled_keys: mix the pooled-key bin scores (q · each bin's mean key, `ops.pooled_keys`)
    into the estimator's bin distribution (`sea.estimator.PooledKeyMix`): the estimator then
    sees the keys, not only the query. Not in the paper; off by default.
  """
  K: int = 256
  k: int = 64
  nbf: float = 8.0
  performer_chunk: int = 128
  query_block: int = 128
  sparse_impl: str = "auto"
  seed: int = 0
  position_rows: int | None = None
  pooled_keys: bool = False

  LEGACY_KEYS = ("jitter",)  # saved by earlier versions, never read: ignored when loading

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "SEAConfig":
    """The settings of a config.json "sea" block; an unknown key is a ConfigError."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names - set(cls.LEGACY_KEYS))
    if unknown:
      raise ConfigError(f"unknown SEA setting(s) {unknown} in config.json (known: "
                        f"{sorted(names)})")
    return cls(**{k: v for k, v in values.items() if k in names})

  def table_rows(self, max_positions: int) -> int:
    """Rows of P for a model of `max_positions` positions."""
    rows = self.position_rows if self.position_rows is not None else MAX_POSITION_ROWS
    return max(2, min(rows, max_positions)) if max_positions > 1 else 1

  def validate(self) -> None:
    check_sea_K(self.K)
    if self.k < 1:
      raise ConfigError(f"SEA k must be >= 1, got k={self.k}")
    if self.sparse_impl not in SPARSE_IMPLS:
      raise ConfigError(f"sparse_impl must be one of {SPARSE_IMPLS}, got {self.sparse_impl!r}")
    if self.performer_chunk < 1 or self.query_block < 1:
      raise ConfigError("performer_chunk and query_block must be >= 1")
    if self.position_rows is not None and self.position_rows < 2:
      raise ConfigError(f"SEA position_rows must be >= 2, got {self.position_rows}")


@dataclasses.dataclass(frozen=True)
class AttentionShape:
  """What an attention core needs to know about its model: heads, kv heads, head dim, the
  positions it may see, dtypes and the SEA settings."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_positions: int
  dtype: object
  param_dtype: object
  sea: SEAConfig
  dense_impl: str = "auto"

  @classmethod
  def of(cls, config) -> "AttentionShape":
    """From any family config (OPTConfig, LlamaConfig)."""
    return cls(num_heads=config.num_attention_heads, num_kv_heads=config.num_kv_heads,
               head_dim=config.head_dim, max_positions=config.max_position_embeddings,
               dtype=config.compute_dtype, param_dtype=config.params_dtype, sea=config.sea,
               dense_impl=config.dense_impl)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  """What every model family shares beyond its Hugging Face fields: dtypes, the attention of
  each layer, the SEA settings, remat. Family configs (OPTConfig, LlamaConfig) extend it and
  provide num_attention_heads, num_kv_heads, head_dim, max_position_embeddings, num_hidden_layers.

  dtype: compute dtype; param_dtype: storage dtype of the parameters.
  attention: "dense", "sea" or "performer" for every layer in `attention_layers`
    (None = all layers); the other layers stay dense.
  dense_impl: how dense attention runs: "reference" (T x T scores), "chunked" (one query
    block at a time over the keys it can see, XLA), "cudnn" (GPU flash attention), "splash"
    (TPU splash attention; interpreted elsewhere, for tests) or "auto" (cuDNN on GPU for
    bf16/fp16, splash on TPU, else chunked).
  """
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention: str = "dense"
  attention_layers: tuple[int, ...] | None = None
  sea: SEAConfig = SEAConfig()
  remat: bool = False
  dense_impl: str = "auto"

  family = "none"  # the model family's name (class attribute, not a field)
  shape_fields = ()  # (class attribute) the fields a resumed training run must share

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def num_kv_heads(self) -> int:
    return self.num_attention_heads

  def attention_kind(self, layer: int) -> str:
    """The attention implementation that layer `layer` uses."""
    if self.attention_layers is None or layer in self.attention_layers:
      return self.attention
    return "dense"

  def validate_runtime(self) -> None:
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings", "head_dim", "num_kv_heads"):
      value = getattr(self, name, 1)
      if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if self.dense_impl not in DENSE_IMPLS:
      raise ConfigError(f"dense_impl must be one of {DENSE_IMPLS}, got {self.dense_impl!r}")
    if self.attention not in ATTENTION_KINDS:
      raise ConfigError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in PARAM_DTYPES:
        raise ConfigError(f"{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")
    if self.attention_layers is not None:
      bad = [i for i in self.attention_layers if not 0 <= i < self.num_hidden_layers]
      if bad:
        raise ConfigError(f"attention_layers {bad} outside 0..{self.num_hidden_layers - 1}")
    self.sea.validate()

  def runtime_to_hf(self) -> dict[str, Any]:
    """The "sea_jax" block of config.json."""
    return {
        "attention": self.attention,
        "attention_layers": list(self.attention_layers) if self.attention_layers is not None else None,
        "sea": dataclasses.asdict(self.sea),
        "remat": self.remat,
        "dense_impl": self.dense_impl,
    }

  @classmethod
  def build(cls, fields: dict[str, Any], hf: dict[str, Any], overrides: dict[str, Any]):
    """The validated config of `fields` (read from a config.json dict `hf`) plus its "sea_jax"
    block, then `overrides`: the last step of every family's from_hf_dict."""
    cfg = dataclasses.replace(cls(), **{**fields, **cls.runtime_from_hf(hf)})
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()
    return cfg

  @staticmethod
  def runtime_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Field overrides from the "sea_jax" block of config.json (absent in HF checkpoints)."""
    extra = hf.get("sea_jax") or {}
    kwargs = {key: extra[key] for key in ("attention", "remat", "dense_impl") if key in extra}
    if extra.get("attention_layers") is not None:
      kwargs["attention_layers"] = tuple(extra["attention_layers"])
    if "sea" in extra:
      kwargs["sea"] = SEAConfig.from_dict(extra["sea"])
    return kwargs


@dataclasses.dataclass(frozen=True)
class OPTConfig(RuntimeConfig):
  """OPT hyperparameters (names follow Hugging Face `OPTConfig`) plus the runtime choices."""
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

  family = "opt"
  shape_fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "ffn_dim", "max_position_embeddings", "word_embed_proj_dim",
                  "do_layer_norm_before", "attention")  # what a resumed run must share

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def has_final_layer_norm(self) -> bool:
    return self.do_layer_norm_before and not self._remove_final_layer_norm

  def validate(self) -> None:
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by "
                        f"num_attention_heads {self.num_attention_heads}")
    if self.activation_function != "relu":
      raise ConfigError(f"only OPT's relu FFN is supported, got {self.activation_function!r}")
    if not self.tie_word_embeddings:
      raise ConfigError("untied lm_head.weight is not supported (OPT ties it to embed_tokens)")
    self.validate_runtime()

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
    return cls.build(kwargs, hf, overrides)

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
    hf["sea_jax"] = self.runtime_to_hf()
    return hf


LLAMA_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "mistral": "MistralForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(RuntimeConfig):
  """Llama-architecture decoders (Llama, Qwen2, Mistral without a sliding window): RoPE,
  grouped-query attention, SwiGLU, RMSNorm. Names follow Hugging Face; differences between the
  three are fields (qkv_bias / o_bias: Llama's attention_bias sets both, Qwen2 has q/k/v biases
  and none on o_proj). rope_scaling: None or sorted (key, value) pairs of a "linear" or
  "llama3" scaling (Hugging Face's rope_parameters minus rope_theta).
  dropout: residual dropout while training (ours; 0 in every Hugging Face Llama).
  """
  model_type: str = "llama"
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int = 128
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  hidden_act: str = "silu"
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None
  dropout: float = 0.0

  family = "llama"
  shape_fields = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                  "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "max_position_embeddings", "attention")

  @property
  def num_kv_heads(self) -> int:
    return self.num_key_value_heads

  @property
  def rope_scaling_dict(self) -> dict[str, Any]:
    return dict(self.rope_scaling or ())

  def validate(self) -> None:
    if self.model_type not in LLAMA_TYPES:
      raise ConfigError(f"model_type {self.model_type!r} is not a Llama-family type "
                        f"({sorted(LLAMA_TYPES)})")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                        f"num_key_value_heads {self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
    if self.hidden_act != "silu":
      raise ConfigError(f"only the SwiGLU (silu) MLP is supported, got hidden_act "
                        f"{self.hidden_act!r}")
    rope = self.rope_scaling_dict
    kind = rope.get("rope_type", "default")
    if kind not in ROPE_TYPES:
      raise ConfigError(f"rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings")}.get(kind, ())
    lacking = [key for key in need if key not in rope]
    if lacking:
      raise ConfigError(f"{kind} rope scaling lacks {', '.join(lacking)}")
    self.validate_runtime()

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], **overrides) -> "LlamaConfig":
    """Builds a config from a Hugging Face Llama / Qwen2 / Mistral `config.json` dict."""
    model_type = hf.get("model_type")
    if model_type not in LLAMA_TYPES:
      raise ConfigError(f"model_type {model_type!r} is not a Llama-family type")
    lacking = [key for key in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if key not in hf]
    if lacking:
      raise ConfigError(f"{model_type} config lacks {', '.join(lacking)}")
    unsupported = _llama_unsupported(hf)
    if unsupported:
      raise ConfigError(f"{model_type} config: {unsupported} is not supported")
    heads = int(hf["num_attention_heads"])
    kwargs: dict[str, Any] = {
        "model_type": model_type,
        "num_key_value_heads": int(hf.get("num_key_value_heads") or heads),
        "head_dim": int(hf.get("head_dim") or hf["hidden_size"] // heads),
    }
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "max_position_embeddings", "rms_norm_eps",
                 "tie_word_embeddings", "hidden_act", "bos_token_id", "pad_token_id", "mlp_bias"):
      if name in hf:
        kwargs[name] = hf[name]
    eos = hf.get("eos_token_id", 2)
    kwargs["eos_token_id"] = tuple(eos) if isinstance(eos, list) else eos
    if model_type == "qwen2":
      kwargs["qkv_bias"], kwargs["o_bias"] = True, False
    else:
      kwargs["qkv_bias"] = kwargs["o_bias"] = bool(hf.get("attention_bias", False))
    rope = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    if legacy and not rope.get("rope_type"):
      rope.update(legacy)
    if "type" in rope and "rope_type" not in rope:
      rope["rope_type"] = rope.pop("type")
    rope.pop("type", None)
    kwargs["rope_theta"] = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
      raise ConfigError(f"{model_type} config: partial_rotary_factor is not supported")
    rope.pop("partial_rotary_factor", None)
    kind = rope.get("rope_type", "default")
    kwargs["rope_scaling"] = None if kind == "default" else tuple(sorted(rope.items()))
    return cls.build(kwargs, hf, overrides)

  def to_hf_dict(self) -> dict[str, Any]:
    """A Hugging Face `config.json` dict of this model type; SEA settings under "sea_jax"."""
    rope = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_scaling:
      rope = {**self.rope_scaling_dict, "rope_theta": self.rope_theta}
    eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
    hf = {
        "model_type": self.model_type,
        "architectures": [LLAMA_TYPES[self.model_type]],
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_parameters": rope,
        "hidden_act": self.hidden_act,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": self.pad_token_id,
        "torch_dtype": self.param_dtype,
    }
    if self.model_type == "qwen2":
      hf.update(use_sliding_window=False, sliding_window=None)
    else:
      hf.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
      if self.model_type == "mistral":
        hf["sliding_window"] = None
    hf["sea_jax"] = self.runtime_to_hf()
    return hf


def _llama_unsupported(hf: dict[str, Any]) -> str | None:
  """The first config option a Llama-family checkpoint sets that sea-jax does not implement."""
  max_pos = hf.get("max_position_embeddings", 0) or 0
  window = hf.get("sliding_window")
  if hf.get("model_type") == "qwen2":
    if hf.get("use_sliding_window"):
      return f"use_sliding_window (sliding_window={window})"
    types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in types):
      return f"layer_types {sorted(set(types))}"
  elif window is not None and window < max_pos:
    return f"sliding_window={window} (shorter than max_position_embeddings {max_pos})"
  return None


MODEL_CONFIGS: dict[str, type] = {"opt": OPTConfig, **{t: LlamaConfig for t in LLAMA_TYPES}}
ModelConfig = OPTConfig | LlamaConfig


def config_from_hf_dict(hf: dict[str, Any], **overrides) -> "ModelConfig":
  """The family config of a `config.json` dict, chosen by its model_type."""
  model_type = hf.get("model_type")
  if model_type not in MODEL_CONFIGS:
    raise ConfigError(f"model_type {model_type!r} is not supported (supported: "
                      f"{', '.join(sorted(MODEL_CONFIGS))})")
  return MODEL_CONFIGS[model_type].from_hf_dict(hf, **overrides)


def load_config(folder: str, **overrides) -> "ModelConfig":
  """Reads `folder/config.json` into its family's config (OPTConfig, LlamaConfig)."""
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"no config.json in {folder}")
  try:
    with open(path) as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(hf, dict):
    raise ConfigError(f"{path} does not hold a JSON object")
  return config_from_hf_dict(hf, **overrides)
