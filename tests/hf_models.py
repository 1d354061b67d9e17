"""Tiny random Hugging Face OPT models saved to disk, the reference for the Flax port."""
from __future__ import annotations

import os

import numpy as np

VOCAB = 50272  # OPT's vocabulary, so real tokenized text fits


def tiny_opt_kwargs(variant: str = "pre", vocab_size: int = VOCAB) -> dict:
  """pre: pre-LN like 125m; post: post-LN with 512<->1024-style projections like 350m."""
  kw = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
            num_attention_heads=4, max_position_embeddings=128, dropout=0.0,
            attention_dropout=0.0)
  if variant == "post":
    kw.update(do_layer_norm_before=False, word_embed_proj_dim=16)
  return kw


def save_tiny_opt(folder: str, variant: str = "pre", *, seed: int = 0, vocab_size: int = VOCAB,
                  safe_serialization: bool = True, max_shard_size: str | None = None,
                  with_tokenizer: bool = False, init_std: float | None = None):
  """Builds a random transformers.OPTForCausalLM and save_pretrained()s it; returns the model.

  init_std: the weights' initial std (transformers' default 0.02 makes a near-uniform model
  whose perplexity hardly depends on attention; 0.2 makes attention visible in the loss).
  """
  import torch
  import transformers
  torch.manual_seed(seed)
  kw = tiny_opt_kwargs(variant, vocab_size)
  if init_std is not None:
    kw["init_std"] = init_std
  config = transformers.OPTConfig(**kw)
  model = transformers.OPTForCausalLM(config).eval()
  with torch.no_grad():  # non-trivial LayerNorm and bias values, so a mix-up cannot hide
    for name, p in model.named_parameters():
      if name.endswith("bias") or "layer_norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  os.makedirs(folder, exist_ok=True)
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  if safe_serialization:
    model.save_pretrained(folder, **kwargs)
  else:
    _save_bin(model, folder, max_shard_size)
  if with_tokenizer:
    from sea_jax.data import load_tokenizer, save_tokenizer
    save_tokenizer(load_tokenizer(None), folder)
  return model


def _save_bin(model, folder: str, max_shard_size: str | None) -> None:
  """pytorch_model.bin (single, or two shards with an index) as older checkpoints have it."""
  import json
  import torch
  model.config.save_pretrained(folder)
  state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
  if max_shard_size is None:
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    return
  names = sorted(state)
  halves = [names[: len(names) // 2], names[len(names) // 2:]]
  weight_map = {}
  for i, part in enumerate(halves):
    fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
    torch.save({n: state[n] for n in part}, os.path.join(folder, fname))
    weight_map.update({n: fname for n in part})
  with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


def torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  """float64 logits of a transformers model (run in float64 for a higher-precision reference)."""
  import copy
  import torch
  ref = copy.deepcopy(model).double()
  with torch.no_grad():
    out = ref(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
  return out.logits.numpy()


def tiny_llama_kwargs(model_type: str = "llama", *, kv_heads: int = 2, head_dim: int = 16,
                      rope: dict | None = None, tied: bool = False, vocab_size: int = VOCAB) -> dict:
  """A 2-layer Llama / Qwen2 / Mistral config: 4 query heads over `kv_heads` kv heads."""
  kw = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=head_dim,
            max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tied,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **(rope or {})})
  if model_type == "mistral":
    kw["sliding_window"] = None
  return kw


LLAMA_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                 "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                 "mistral": ("MistralConfig", "MistralForCausalLM")}


def save_tiny_llama(folder: str, model_type: str = "llama", *, seed: int = 0,
                    with_tokenizer: bool = False, **kwargs):
  """Builds a random transformers Llama-family model (weights at std 0.2, so attention and
  RoPE move the logits well above rounding) and save_pretrained()s it; returns the model."""
  import torch
  import transformers
  config_cls, model_cls = (getattr(transformers, n) for n in LLAMA_CLASSES[model_type])
  torch.manual_seed(seed)
  config = config_cls(**tiny_llama_kwargs(model_type, **kwargs), initializer_range=0.2)
  model = model_cls(config).eval()
  with torch.no_grad():  # non-trivial norm scales and biases
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  os.makedirs(folder, exist_ok=True)
  model.save_pretrained(folder)
  if with_tokenizer:
    from sea_jax.data import load_tokenizer, save_tokenizer
    save_tokenizer(load_tokenizer(None), folder)
  return model
