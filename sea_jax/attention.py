"""The attention seam: one interface, implementations chosen by `OPTConfig.attention`.

An attention core receives OPT's own projections and returns the per-head context:

  core(q, k, v, *, key_mask=None, sea_k=None, deterministic=True, return_aux=False)
      q, k, v: (N, H, T, d); q is already scaled by d**-0.5 (OPT's convention).
      key_mask: (N, T) bool, True for real tokens (None = all real).
      sea_k: keys per query per head for SEA (None = the config's k); ignored by others.
      -> (context (N, H, T, d), aux dict)

`aux` is empty unless `return_aux`; then it holds at least "q", "k", "context" (what the
distillation losses need) and, for SEA, the estimator outputs (SEA_SPEC §1.7).
Implementations register themselves in `ATTENTION_CORES` by name.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sea_jax.config import ConfigError, OPTConfig

NEG_INF = -1e30


def causal_key_mask(T: int, key_mask: jax.Array | None, q_offset: int = 0,
                    rows: int | None = None) -> jax.Array:
  """(N|1, 1, rows, T) bool: query q_offset+i may see key s (s <= t and key s is real)."""
  rows = T if rows is None else rows
  t = q_offset + jnp.arange(rows)[:, None]
  s = jnp.arange(T)[None, :]
  mask = (s <= t)[None, None]
  if key_mask is not None:
    mask = mask & key_mask[:, None, None, :].astype(bool)
  return mask


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    key_mask: jax.Array | None = None) -> jax.Array:
  """Causal softmax attention with an fp32 softmax: (N,H,T,d) x3 -> (N,H,T,d)."""
  T = q.shape[2]
  scores = jnp.einsum("nhtd,nhsd->nhts", q, k, preferred_element_type=jnp.float32)
  mask = causal_key_mask(T, key_mask)
  scores = jnp.where(mask, scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = jnp.where(mask, probs, 0.0)  # fully masked rows (padding queries) give zeros
  return jnp.einsum("nhts,nhsd->nhtd", probs.astype(v.dtype), v)


class DenseAttention(nnx.Module):
  """OPT's own causal softmax attention; no parameters."""

  def __init__(self, config: OPTConfig, *, rngs: nnx.Rngs):
    del config, rngs

  def __call__(self, q, k, v, *, key_mask=None, sea_k=None, deterministic=True,
               return_aux=False):
    del sea_k, deterministic
    with jax.named_scope("dense_attention"):
      context = dense_attention(q, k, v, key_mask)
    aux = {"q": q, "k": k, "context": context} if return_aux else {}
    return context, aux


def _sea_core(config: OPTConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  from sea_jax.sea import SEAAttention  # imported lazily: SEA is optional at import time
  return SEAAttention.from_config(config, rngs=rngs)


def _performer_core(config: OPTConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  from sea_jax.sea import PerformerAttention
  return PerformerAttention.from_config(config, rngs=rngs)


ATTENTION_CORES: dict[str, Callable[..., nnx.Module]] = {
    "dense": DenseAttention,
    "sea": _sea_core,
    "performer": _performer_core,
}


def make_attention_core(config: OPTConfig, layer: int, *, rngs: nnx.Rngs) -> nnx.Module:
  """The attention core of decoder layer `layer`, as the config chooses."""
  kind = config.attention_kind(layer)
  if kind not in ATTENTION_CORES:
    raise ConfigError(f"unknown attention {kind!r}; choose from {sorted(ATTENTION_CORES)}")
  return ATTENTION_CORES[kind](config, rngs=rngs)
