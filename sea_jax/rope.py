"""Rotary position embeddings (RoPE) as Hugging Face Llama computes them.

inv_freq (d/2,) from rope_theta and the scaling ("default", "linear": every frequency / factor;
"llama3": Llama 3.1's wavelength-banded scaling); `apply_rope` rotates the two halves of each
head vector (Hugging Face's `rotate_half` layout, not interleaved pairs).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
  """(head_dim // 2,) float32 inverse frequencies, computed in float32 like Hugging Face."""
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv = (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)
  scaling = scaling or {}
  kind = scaling.get("rope_type", "default")
  if kind == "linear":
    return (inv / np.float32(scaling["factor"])).astype(np.float32)
  if kind == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  if kind != "default":
    raise ValueError(f"unsupported rope type {kind!r}")
  return inv


def rope_tables(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
  """cos, sin (N, T, d) in `dtype` for integer positions (N, T)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x (N, H, T, d) rotated by cos/sin (N, T, d): x * cos + rotate_half(x) * sin."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, None] + rotated * sin[:, None]
