"""Pooled-key bin scores: a content signal for SEA's estimator, O(T·K·d) work and O(T) memory.

SEA's estimator (SEA_SPEC §1.2) predicts row t's compressed logits over its K bins (§1.3) from
that query's own features and a Performer summary: it never sees the keys of a bin, so on a
pretrained model it learns mostly where attention goes (sinks, recency), not which keys match
the query. The pooled-key score gives it the keys: for query row t and bin b,

  P[t, b] = q_t · mean(k_s for s in bin b of row t),

the attention logit of the bin's mean key (a lower bound of the bin's log-mean-exp logit, by
Jensen). Bin sums come from one prefix sum of k over time: sum over [start, end) =
S[end] - S[start], so a row costs K gathers of d numbers and one (K, d) x (d,) product, and
rows run in blocks of ROW_BLOCK so that the gathered bin means never exceed
O(ROW_BLOCK · K · d) per head. Empty bins (t + 1 < K) score EMPTY.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sea_jax.ops.bins import bin_start

EMPTY = -1e30  # the score of an empty bin (finite, so that softmaxes stay NaN-free)
ROW_BLOCK = 256  # query rows whose gathered bin means exist at once


def key_prefix_sums(k: jax.Array) -> jax.Array:
  """k (N,Hkv,T,d) -> S (N,Hkv,T+1,d) in fp32 (fp64 for fp64 k): S[j] = sum of k[0..j-1]."""
  wide = jnp.promote_types(k.dtype, jnp.float32)
  k = k.astype(wide)
  return jnp.concatenate([jnp.zeros_like(k[:, :, :1]), jnp.cumsum(k, axis=2)], axis=2)


def _scores(q: jax.Array, S: jax.Array, rows: jax.Array, K: int, shift=0) -> jax.Array:
  """Pooled scores of query rows `rows` (B,) int32: q (N,H,B,d), S (N,Hkv,L+1,d) -> (N,H,B,K).

  shift (decoding, a left-padded cache): key s of these rows sits at slot shift + s."""
  N, H, B, d = q.shape
  Hkv = S.shape[1]
  edges = bin_start(rows[:, None], jnp.arange(K + 1, dtype=jnp.int32)[None], K)  # (B, K+1)
  count = (edges[:, 1:] - edges[:, :-1]).astype(S.dtype)  # bin b: keys [edges[b], edges[b+1])
  at = S[:, :, edges + shift]  # (N,Hkv,B,K+1,d): one gather per edge, shared by its two bins
  mean = (at[..., 1:, :] - at[..., :-1, :]) / jnp.maximum(count, 1.0)[..., None]
  qg = q.astype(S.dtype).reshape(N, Hkv, H // Hkv, B, d)
  scores = jnp.einsum("nkgbd,nkbcd->nkgbc", qg, mean).reshape(N, H, B, K)
  return jnp.where(count > 0, scores, EMPTY)


def pooled_key_logits(q: jax.Array, k: jax.Array, K: int, *,
                      row_block: int = ROW_BLOCK) -> jax.Array:
  """q (N,H,T,d) (scaled, as attention uses it), k (N,Hkv,T,d) -> P (N,H,T,K) fp32.

  Rows run in blocks of `row_block` (`jax.lax.map`, rematerialised in the backward): memory
  O(row_block · K · d) per head besides P itself."""
  N, H, T, d = q.shape
  S = key_prefix_sums(k)
  B = min(row_block, T)
  n = -(-T // B)
  qb = jnp.pad(q, [(0, 0), (0, 0), (0, n * B - T), (0, 0)]).reshape(N, H, n, B, d)

  @jax.checkpoint  # the backward regathers a block's bin means instead of keeping them all
  def block(i):
    rows = jnp.minimum(i * B + jnp.arange(B, dtype=jnp.int32), T - 1)
    return _scores(qb[:, :, i], S, rows, K)

  out = jax.lax.map(block, jnp.arange(n))  # (n, N, H, B, K)
  return jnp.moveaxis(out, 0, 2).reshape(N, H, n * B, K)[:, :, :T]


def pooled_key_row(q: jax.Array, key_sums: jax.Array, t: jax.Array, offsets: jax.Array,
                   K: int) -> jax.Array:
  """One decoding row: q (N,H,d); key_sums (N,Hkv,L+1,d), the prefix sums over a cache's slots
  (`key_prefix_sums` of the cached keys with padding slots zeroed), where row n's key s sits at
  slot offsets[n] + s; t (N,) the row's position -> (N,H,K). O(K·d) per kv head."""
  one = lambda qn, Sn, tn, on: _scores(qn[None, :, None], Sn[None], tn[None], K, on)[0, :, 0]  # noqa: E731
  return jax.vmap(one)(q, key_sums, t, offsets)
