"""Causal attention one block of query rows at a time, each block against only the keys it can
see, with FlashAttention's backward (custom VJP): O(B·T) memory per head, about half the work
of a T x T score matrix, and on CPU 2-3x faster than it.

Blocks of B query rows are grouped by key extent (`causal_groups`): block i (rows [iB, (i+1)B))
sees keys < (i+1)B; at most 8 groups of consecutive blocks each share the key length of their
last block and run as one `lax.scan` whose scores are (B, L) per head. The work is the causal
triangle plus at most 1/8 of the square, in large matmuls and few loop steps (a per-tile loop
costs more than it saves on a CPU).

The mask of a block is the causal one, and optionally padding (`key_mask` (N, T), True for
real keys) and SEA's compressed mask (N, H, T, K) expanded per block (`expand_rows`): one
mechanism for dense attention and for SEA's every-key sparse path. The forward keeps the output
and each row's log-sum-exp; the backward recomputes each block's probabilities from them. A row
that sees no key gives zeros. Scores, softmax and accumulation are fp32 (fp64 for fp64 inputs);
the probabilities meet v in v's dtype, as in `attention.dense_attention`.

Grouped-query attention: k, v (N, Hkv, T, d) with H % Hkv == 0; query head h reads kv head
h // G through a (N, Hkv, G, ...) view, never a copy, and dk, dv sum their G query heads.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sea_jax.ops.bins import bin_index

NEG = -1e30  # finite "-inf": masked scores, and the lse of a row that sees nothing
SCORE_BYTES = 4 << 20  # a block's fp32 scores (all heads, head dim 32) aim at this size


MAX_GROUPS = 8  # scans per call: more is closer to exact causal work, and longer to compile


def causal_groups(T: int, block: int, max_groups: int = MAX_GROUPS
                  ) -> tuple[tuple[int, int, int], ...]:
  """((first block, number of blocks, key length), ...) covering the T query rows in blocks of
  `block`: consecutive blocks in at most `max_groups` groups of equal count, each group seeing
  the keys its last block can see (< (last + 1)·block, at most T). Work: the causal triangle
  plus at most 1 / max_groups of the square."""
  nb = -(-T // block)
  per = -(-nb // max(1, max_groups))
  return tuple((i, min(per, nb - i), min((min(i + per, nb)) * block, T))
               for i in range(0, nb, per))


def pick_block(rows_per_step: int, T: int, head_dim: int, *, score_bytes: int = SCORE_BYTES,
               smallest: int = 32) -> int:
  """Query rows per step: the power of two in [smallest, 256] whose fp32 scores over T keys for
  `rows_per_step` (N·H) heads stay near score_bytes · head_dim / 32 (measured on a 2-core CPU:
  small blocks keep a step's maps in cache, wide heads make larger matmuls pay), at most T's
  power of two."""
  target = score_bytes * max(1, head_dim) // 32 // (4 * max(1, rows_per_step) * max(1, T))
  b = 1 << max(0, int(target).bit_length() - 1)
  return int(min(max(b, smallest), 256, 1 << max(0, (T - 1).bit_length())))


def expand_rows(compressed_rows: jax.Array, rows: jax.Array, L: int) -> jax.Array:
  """SEA's dense mask of some query rows over keys [0, L): (..., B, K) bool with rows (B,) ->
  (..., B, L), M[t, s] = M̂[t, bin_t(s)] for s <= t, else False.

  The leading (batch, head) masks share the rows' bins, so they are packed as bits of one
  unsigned word per (row, bin) (8, 16 or 32 of them per word), gathered once per (row, key)
  and unpacked with shifts: the per-element gather, which cost more than the block's scores at
  head dim 32, runs once per word instead of once per head.
  """
  lead, (B, K) = compressed_rows.shape[:-2], compressed_rows.shape[-2:]
  P = int(np.prod(lead, dtype=np.int64))
  s = jnp.arange(L, dtype=jnp.int32)[None, :]
  t = rows[:, None]
  bins = jnp.clip(bin_index(t, s, K), 0, K - 1)  # (B, L)
  width = 8 if P <= 8 else 16 if P <= 16 else 32
  utype = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[width]
  words = -(-P // width)
  m = compressed_rows.reshape(P, B, K)
  if words * width > P:
    m = jnp.pad(m, ((0, words * width - P), (0, 0), (0, 0)))
  shift = jnp.arange(width, dtype=utype)
  packed = jnp.sum(m.reshape(words, width, B, K).astype(utype) << shift[:, None, None], axis=1,
                   dtype=utype)  # (words, B, K): disjoint bits, so the sum is an OR
  got = jnp.take_along_axis(packed, jnp.broadcast_to(bins, (words, B, L)), axis=-1,
                            mode="promise_in_bounds")
  bits = (got[:, None] >> shift[None, :, None, None]) & utype(1)  # (words, width, B, L)
  dense = bits.reshape(words * width, B, L)[:P].astype(bool)
  return dense.reshape(lead + (B, L)) & (s <= t)


def _visible(rows, L, key_real, cmask_blk):
  """(N|1, Hkv|1, G|1, B, L) bool for query rows `rows` over keys [0, L)."""
  if cmask_blk is not None:  # (N, Hkv, G, B, K): the causal mask is inside
    m = expand_rows(cmask_blk, rows, L)
  else:
    m = (jnp.arange(L, dtype=jnp.int32)[None, :] <= rows[:, None])[None, None, None]
  if key_real is not None:
    m = m & key_real[:, None, None, None, :L]
  return m


def _split(x, first: int, n: int, B: int):
  """Rows of blocks first .. first+n-1 of x (N, Hkv, G, T, ...) -> (n, N, Hkv, G, B, ...),
  zero-padded past T."""
  seg = x[:, :, :, first * B:(first + n) * B]
  pad = n * B - seg.shape[3]
  if pad:
    seg = jnp.pad(seg, [(0, 0)] * 3 + [(0, pad)] + [(0, 0)] * (x.ndim - 4))
  seg = seg.reshape(seg.shape[:3] + (n, B) + seg.shape[4:])
  return jnp.moveaxis(seg, 3, 0)


def _join(y, rows: int):
  """(n, N, Hkv, G, B, ...) -> (N, Hkv, G, rows, ...), the first `rows` rows."""
  y = jnp.moveaxis(y, 0, 3)
  return y.reshape(y.shape[:3] + (y.shape[3] * y.shape[4],) + y.shape[5:])[:, :, :, :rows]


def _grouped(x, Hkv: int):
  """(N, H, T, ...) -> (N, Hkv, G, T, ...) (a view)."""
  return x.reshape((x.shape[0], Hkv, x.shape[1] // Hkv) + x.shape[2:])


def _forward(q, k, v, key_real, cmask, B: int):
  """(out (N,Hkv,G,T,d) acc dtype, lse (N,Hkv,G,T)); q (N,Hkv,G,T,d), k, v (N,Hkv,T,d)."""
  N, Hkv, G, T, d = q.shape
  acc = jnp.result_type(jnp.float32, q.dtype, k.dtype)
  outs, lses = [], []
  for first, n, L in causal_groups(T, B):
    k_l, v_l = k[:, :, :L], v[:, :, :L]

    def body(carry, xs, L=L, k_l=k_l, v_l=v_l):
      q_blk, c_blk, i = xs
      vis = _visible(i * B + jnp.arange(B, dtype=jnp.int32), L, key_real, c_blk)
      s = jnp.einsum("nhgbd,nhsd->nhgbs", q_blk, k_l, preferred_element_type=acc)
      s = jnp.where(vis, s, NEG)
      top = jnp.max(s, axis=-1, keepdims=True)
      e = jnp.where(vis, jnp.exp(s - top), 0.0)
      total = jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), np.finfo(np.float32).tiny)
      o = jnp.einsum("nhgbs,nhsd->nhgbd", (e / total).astype(v.dtype), v_l,
                     preferred_element_type=acc)
      return carry, (o, (top + jnp.log(total))[..., 0])

    c_blocks = None if cmask is None else _split(cmask, first, n, B)
    idx = first + jnp.arange(n, dtype=jnp.int32)
    _, (o, lse) = jax.lax.scan(body, None, (_split(q, first, n, B), c_blocks, idx))
    rows = min(n * B, T - first * B)
    outs.append(_join(o, rows))
    lses.append(_join(lse, rows))
  return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


def _backward(q, k, v, key_real, cmask, out, lse, d_out, B: int):
  """(dq, dk, dv) in the acc dtype: each block's probabilities recomputed from its lse."""
  N, Hkv, G, T, d = q.shape
  acc = lse.dtype
  d_out = d_out.astype(acc)
  delta = jnp.sum(d_out * out, axis=-1)  # (N,Hkv,G,T)
  dq_parts = []
  dk = jnp.zeros(k.shape, acc)
  dv = jnp.zeros(v.shape, acc)
  for first, n, L in causal_groups(T, B):
    k_l, v_l = k[:, :, :L], v[:, :, :L]

    def body(carry, xs, L=L, k_l=k_l, v_l=v_l):
      dk_l, dv_l = carry
      q_blk, do_blk, lse_blk, delta_blk, c_blk, i = xs
      vis = _visible(i * B + jnp.arange(B, dtype=jnp.int32), L, key_real, c_blk)
      s = jnp.einsum("nhgbd,nhsd->nhgbs", q_blk, k_l, preferred_element_type=acc)
      p = jnp.exp(jnp.where(vis, s - lse_blk[..., None], NEG))
      dv_l = dv_l + jnp.einsum("nhgbs,nhgbd->nhsd", p.astype(v.dtype).astype(acc), do_blk)
      dp = jnp.einsum("nhgbd,nhsd->nhgbs", do_blk, v_l, preferred_element_type=acc)
      ds = p * (dp - delta_blk[..., None])
      dq_blk = jnp.einsum("nhgbs,nhsd->nhgbd", ds, k_l, preferred_element_type=acc)
      dk_l = dk_l + jnp.einsum("nhgbs,nhgbd->nhsd", ds, q_blk, preferred_element_type=acc)
      return (dk_l, dv_l), dq_blk

    zeros = jnp.zeros((N, Hkv, L, d), acc)
    xs = tuple(_split(x, first, n, B) for x in (q, d_out, lse, delta))
    xs += (None if cmask is None else _split(cmask, first, n, B),
           first + jnp.arange(n, dtype=jnp.int32))
    (dk_l, dv_l), dq = jax.lax.scan(body, (zeros, zeros), xs)
    dq_parts.append(_join(dq, min(n * B, T - first * B)))
    dk = dk.at[:, :, :L].add(dk_l)
    dv = dv.at[:, :, :L].add(dv_l)
  return jnp.concatenate(dq_parts, axis=3), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, key_real, cmask, B: int):
  return _forward(q, k, v, key_real, cmask, B)[0]


def _attention_fwd(q, k, v, key_real, cmask, B: int):
  out, lse = _forward(q, k, v, key_real, cmask, B)
  return out, (q, k, v, key_real, cmask, out, lse)


def _attention_bwd(B: int, res, d_out):
  q, k, v, key_real, cmask, out, lse = res
  dq, dk, dv = _backward(q, k, v, key_real, cmask, out, lse, d_out, B)
  no_grad = lambda x: None if x is None else np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), no_grad(key_real),
          no_grad(cmask))


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                      key_mask: jax.Array | None = None,
                      compressed_mask: jax.Array | None = None,
                      block: int | None = None) -> jax.Array:
  """Causal softmax attention: q (N,H,T,d) pre-scaled, k, v (N,Hkv,T,d) -> (N,H,T,d) in
  v.dtype; query head h reads kv head h // (H // Hkv).

  key_mask (N, T) bool hides padding keys. compressed_mask (N, H, T, K) bool restricts each
  row to SEA's kept keys (SEA_SPEC §1.5). block: query rows per step (default `pick_block`).
  """
  N, H, T, d = q.shape
  Hkv = k.shape[1]
  B = block or pick_block(N * H, T, d)
  key_real = None if key_mask is None else jnp.asarray(key_mask, bool)
  cmask = None if compressed_mask is None else _grouped(compressed_mask, Hkv)
  out = _attention(_grouped(q, Hkv), k, v, key_real, cmask, int(B))
  return out.reshape(N, H, T, out.shape[-1]).astype(v.dtype)
