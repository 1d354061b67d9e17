"""Sparse causal attention under a compressed mask (SEA_SPEC §1.5), pure JAX, O(T) memory.

The dense mask M[t,s] = M̂[t, bin_t(s)] (s <= t) is a closed function of (t, s, M̂[t]), so it is
rebuilt per block of query rows and never stored for all T × T pairs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sea_jax.sea.bins import bin_index


def _block_mask(rows: jax.Array, T: int, mask_rows: jax.Array) -> jax.Array:
  """(N,H,B,T) bool for query rows `rows` (B,) from their compressed rows (N,H,B,K)."""
  K = mask_rows.shape[-1]
  s = jnp.arange(T, dtype=jnp.int32)[None, :]
  t = rows[:, None]
  bins = jnp.clip(bin_index(t, s, K), 0, K - 1)  # (B, T)
  idx = jnp.broadcast_to(bins, (*mask_rows.shape[:-1], T))
  return jnp.take_along_axis(mask_rows, idx, axis=-1) & (s <= t)


def sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, compressed_mask: jax.Array, *,
                     query_block: int = 128) -> jax.Array:
  """softmax over kept keys, times v: q, k, v (N,H,T,d), M̂ (N,H,T,K) bool -> (N,H,T,d).

  q is already scaled. Scores and softmax are fp32 (fp64 for fp64 inputs); a row with nothing kept gives zeros.
  Query rows run in blocks of `query_block` (T is padded to a multiple) under `lax.scan`; the
  block body is rematerialised, so neither pass holds more than one block's B × T scores.
  Output dtype = v.dtype.
  """
  N, H, T, d = q.shape
  acc = jnp.result_type(jnp.float32, q.dtype, k.dtype)
  B = max(1, min(query_block, T))
  n_blocks = -(-T // B)
  pad = n_blocks * B - T
  if pad:
    q = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0)))
    compressed_mask = jnp.pad(compressed_mask, ((0, 0), (0, 0), (0, pad), (0, 0)))
  q_blocks = q.reshape(N, H, n_blocks, B, d).transpose(2, 0, 1, 3, 4)
  m_blocks = compressed_mask.reshape(N, H, n_blocks, B, -1).transpose(2, 0, 1, 3, 4)

  @jax.checkpoint
  def block(q_blk, m_blk, start):
    rows = start + jnp.arange(B, dtype=jnp.int32)
    mask = _block_mask(rows, T, m_blk)
    scores = jnp.einsum("nhbd,nhsd->nhbs", q_blk, k, preferred_element_type=acc)
    top = jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1, keepdims=True)
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    # exp of the masked logits only: exp(scores - top) can overflow on dropped entries, and an
    # inf under `where` turns into NaN gradients.
    p = jnp.exp(jnp.where(mask, scores - top, -jnp.inf))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    return jnp.einsum("nhbs,nhsd->nhbd", p.astype(v.dtype), v,
                      preferred_element_type=jnp.promote_types(v.dtype, jnp.float32))

  def step(carry, xs):
    q_blk, m_blk, start = xs
    return carry, block(q_blk, m_blk, start)

  starts = jnp.arange(n_blocks, dtype=jnp.int32) * B
  _, out = jax.lax.scan(step, None, (q_blocks, m_blocks, starts))
  out = out.transpose(1, 2, 0, 3, 4).reshape(N, H, n_blocks * B, d)
  return out[:, :, :T].astype(v.dtype)
