"""Pooled-key bin scores: a content signal for SEA's estimator, O(T·K·d) work and O(T) memory.

SEA's estimator (SEA_SPEC §1.2) predicts row t's compressed logits over its K bins (§1.3) from
that query's own features and a Performer summary: it never sees the keys of a bin, so on a
pretrained model it learns mostly where attention goes (sinks, recency), not which keys match
the query. The pooled-key score gives it the keys: for query row t and bin b,

  P[t, b] = q_t · mean(k_s for s in bin b of row t),

the attention logit of the bin's mean key (a lower bound of the bin's log-mean-exp logit, by
Jensen). Bin sums come from one prefix sum S of k over time: the sum over [start, end) is
S[end] - S[start], so P[t, b] = (q_t · S[end] - q_t · S[start]) / count, and a row costs
K + 1 gathers of Hkv·d numbers (one per bin edge, shared by its two bins) and K + 1 dot
products per head. Rows run in blocks of ROW_BLOCK so that the gathered sums never exceed
O(ROW_BLOCK · K · d) per head. Empty bins (t + 1 < K) score EMPTY.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sea_jax.ops.bins import bin_start

EMPTY = -1e30  # the score of an empty bin (finite, so that softmaxes stay NaN-free)
ROW_BLOCK = 64  # query rows whose gathered edge sums exist at once (faster than 256 on CPU)


def key_prefix_sums(k: jax.Array) -> jax.Array:
  """k (N,Hkv,T,d) -> S (N,Hkv,T+1,d) in fp32 (fp64 for fp64 k): S[j] = sum of k[0..j-1]."""
  wide = jnp.promote_types(k.dtype, jnp.float32)
  k = k.astype(wide)
  return jnp.concatenate([jnp.zeros_like(k[:, :, :1]), jnp.cumsum(k, axis=2)], axis=2)


def _edges(rows, K: int):
  """Bin edges of query rows (any int array, NumPy or traced) -> (..., K+1): bin b of row t
  covers keys [edges[b], edges[b + 1]) (`ops.bins.bin_start`)."""
  return bin_start(rows[..., None], jnp.arange(K + 1, dtype=jnp.int32), K)


def _bin_scores(q: jax.Array, at: jax.Array, edges: jax.Array) -> jax.Array:
  """q (N,H,B,d); at (N,B,K+1,Hkv,d), the prefix sums at each row's K+1 bin edges;
  edges (B,K+1) -> scores (N,H,B,K), EMPTY where a bin holds no key.

  q_t · mean = (q_t · S[end] - q_t · S[start]) / count: the dot products come first, so no
  (B, K, d) array of bin means is formed (the same subtraction of prefix sums, moved past
  the dot product)."""
  N, H, B, d = q.shape
  Hkv = at.shape[3]
  count = (edges[:, 1:] - edges[:, :-1]).astype(at.dtype)
  qg = q.astype(at.dtype).reshape(N, Hkv, H // Hkv, B, d)
  dots = jnp.einsum("nkgbd,nbckd->nkgbc", qg, at).reshape(N, H, B, -1)  # q_t · S[edge]
  scores = (dots[..., 1:] - dots[..., :-1]) / jnp.maximum(count, 1.0)
  return jnp.where(count > 0, scores, EMPTY)


def pooled_key_logits(q: jax.Array, k: jax.Array, K: int, *,
                      row_block: int = ROW_BLOCK) -> jax.Array:
  """q (N,H,T,d) (scaled, as attention uses it), k (N,Hkv,T,d) -> P (N,H,T,K) fp32.

  Rows run in blocks of `row_block` (`jax.lax.map`, rematerialised in the backward): memory
  O(row_block · K · d) per head besides P itself. The prefix sums are laid out time-major,
  (N, T+1, Hkv, d), so that one edge gathers one contiguous run of Hkv·d numbers, and the
  edges are computed once, before the row loop: with the dot products first (`_bin_scores`),
  5-6x faster on CPU than gathering per kv head with edges computed in the loop
  (bench/bench_pooled_keys.py)."""
  N, H, T, d = q.shape
  S = jnp.moveaxis(key_prefix_sums(k), 2, 1)  # (N, T+1, Hkv, d)
  B = min(row_block, T)
  n = -(-T // B)
  qb = jnp.pad(q, [(0, 0), (0, 0), (0, n * B - T), (0, 0)]).reshape(N, H, n, B, d)
  # The edges are computed once per call, outside the row loop, from an iota that XLA may not
  # fold: as a constant of the program each layer would embed its own (T, K+1) int32 table in
  # the executable (241 MiB over SmolLM2's 30 layers at T = 8,192, held in host memory).
  rows = jnp.minimum(jax.lax.optimization_barrier(jnp.arange(n * B, dtype=jnp.int32)), T - 1)
  edges = _edges(rows, K).reshape(n, B, K + 1)

  @jax.checkpoint  # the backward regathers a block's edge sums instead of keeping them all
  def block(i):
    return _bin_scores(qb[:, :, i], S[:, edges[i]], edges[i])

  out = jax.lax.map(block, jnp.arange(n))  # (n, N, H, B, K)
  return jnp.moveaxis(out, 0, 2).reshape(N, H, n * B, K)[:, :, :T]


def pooled_key_row(q: jax.Array, key_sums: jax.Array, t: jax.Array, offsets: jax.Array,
                   K: int) -> jax.Array:
  """One decoding row: q (N,H,d); key_sums (N,Hkv,L+1,d), the prefix sums over a cache's slots
  (`key_prefix_sums` of the cached keys with padding slots zeroed), where row n's key s sits at
  slot offsets[n] + s; t (N,) the row's position -> (N,H,K). O(K·d) per kv head."""
  def one(qn, Sn, tn, on):  # qn (H,d), Sn (Hkv,L+1,d)
    edges = _edges(tn[None], K)  # (1, K+1)
    at = jnp.moveaxis(Sn[:, edges + on], 0, 2)[None]  # (1, 1, K+1, Hkv, d)
    return _bin_scores(qn[None, :, None], at, edges)[0, :, 0]
  return jax.vmap(one)(q, key_sums, t, offsets)
