"""GPU (Triton-style Pallas) kernels for SEA sparse attention: forward, dq, dk/dv.

Layout: one program per ((n, h), query block) (forward, dq) or ((n, h_kv), key block) (dk/dv).
Each program runs a `lax.fori_loop` over only the tiles named by the block map (indices
loaded from ordinary input refs: Triton Pallas has no scalar prefetch) and rebuilds each
tile's mask in-kernel from (t, s, compressed_mask[t]):

  mask[t, s] = (s <= t) & compressed_mask[t, bin_t(s)]

The compressed row lives in global memory (int8, (T, K) per head) and is read with a
pointer gather `cm_ref[rows, bins]` (a (block_q, block_k) tile of addresses): Triton
lowers integer-array ref indexing to a masked `tt.load` of a pointer tensor, interpret mode
to an XLA gather; each row's K bytes sit in L1/L2, so the gather is cheap next to the two
matmuls. No (T, T) array and no probabilities are ever stored; the backward recomputes
probabilities from q, k and the log-sum-exp.

Shared with other backends (so a Mosaic GPU / Hopper variant can sit beside this file
and reuse everything but the kernel bodies): block sizes (`sparse_attention.BlockSizes`),
the block map and the tile index math (`block_map.tile_bins`), T padding and the
custom_vjp wiring (`sparse_attention.py`). Only the gather, the loads and the dots here
are Triton-specific. The head dim is zero-padded to a power of two >= 16 for Triton.

Grouped-query attention (k, v with Hkv = H / G heads): the forward and dq programs of query
head n·H + h read kv head (n·H + h) // G = n·Hkv + h // G through their k/v BlockSpec index
map; a dk/dv program owns one kv head's key block and loops over the G query heads of its
group (their q, dO, lse, delta, mask rows and visit lists laid out as (N·Hkv, G·T, ...)), each
over its visited query blocks, summing into one accumulator. k and v are never repeated.

Contract (called by sparse_attention.py): T is a multiple of block_q and block_k; q, cm, the
block map (N,H,...), k, v (N,Hkv,T,d).
  forward(q, k, v, cm, block_map, *, block_sizes, interpret) -> (out (N,H,T,d), lse (N,H,T) fp32)
  backward(q, k, v, cm, block_map, out, lse, d_out, *, block_sizes, interpret)
    -> (dq (N,H,T,d), dk, dv (N,Hkv,T,d))
lse is +inf on rows with nothing kept, so exp(s - lse) = 0 there.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sea_jax.ops.block_map import BlockMap, tile_bins

# Finite "minus infinity" for masked scores: exp(MASK - anything finite) == 0 and
# MASK - MASK == 0 does not produce NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


# pl.dot moved to the Triton module (JAX >= 0.10); keep the old spelling as a fallback.
_dot = getattr(plgpu, "dot", None) or pl.dot


def _compiler_params(num_warps: int, num_stages: int):
  cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  return cls(num_warps=num_warps, num_stages=num_stages)


def _precision(dtype):
  """fp32 inputs: exact fp32 dots (no TF32); 16-bit inputs: default tensor-core dots."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _padded_head_dim(d: int) -> int:
  return max(16, int(pl.next_power_of_2(d)))


def _mask_tile(cm_ref, q_start, k_start, block_q: int, block_k: int, K: int):
  """(block_q, block_k) bool dense-mask tile gathered from the compressed mask ref (T, K)."""
  rows, bins, causal = tile_bins(q_start, k_start, block_q, block_k, K)
  kept = cm_ref[rows, bins] != 0
  return jnp.logical_and(causal, kept)


# ----------------------------------------------------------------------------- kernels

def _fwd_kernel(visits_ref, counts_ref, cm_ref, q_ref, k_ref, v_ref, *refs,
                block_q: int, block_k: int, K: int, precision):
  o_ref, lse_ref = refs[-2:]          # earlier refs (if any) are the aliased poison inputs
  qi = pl.program_id(1)
  q_start = qi * block_q
  q = q_ref[...]                                            # (bq, dp)
  dp = q.shape[-1]
  count = counts_ref[qi]

  def body(j, carry):
    acc, m, l = carry
    kb = visits_ref[qi, j]
    k_start = pl.multiple_of(kb * block_k, block_k)
    k = k_ref[pl.ds(k_start, block_k), :]                   # (bk, dp)
    v = v_ref[pl.ds(k_start, block_k), :]
    mask = _mask_tile(cm_ref, q_start, k_start, block_q, block_k, K)
    s = _dot(q, k, trans_b=True, precision=precision)     # (bq, bk) fp32
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    l = alpha * l + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, precision=precision)
    return acc, m_new, l

  acc = jnp.zeros((block_q, dp), jnp.float32)
  m = jnp.full((block_q,), MASK_VALUE, jnp.float32)
  l = jnp.zeros((block_q,), jnp.float32)
  acc, m, l = lax.fori_loop(0, count, body, (acc, m, l))
  has = l > 0.0
  inv = jnp.where(has, 1.0 / jnp.where(has, l, 1.0), 0.0)
  o_ref[...] = (acc * inv[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), jnp.inf)


def _dq_kernel(visits_ref, counts_ref, cm_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, *refs, block_q: int, block_k: int, K: int, precision):
  dq_ref = refs[-1]
  qi = pl.program_id(1)
  q_start = qi * block_q
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  count = counts_ref[qi]

  def body(j, dq):
    kb = visits_ref[qi, j]
    k_start = pl.multiple_of(kb * block_k, block_k)
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    mask = _mask_tile(cm_ref, q_start, k_start, block_q, block_k, K)
    s = _dot(q, k, trans_b=True, precision=precision)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    dpv = _dot(do, v, trans_b=True, precision=precision)
    ds = p * (dpv - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k, precision=precision)

  dq = lax.fori_loop(0, count, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkdv_kernel(visits_ref, counts_ref, cm_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                 delta_ref, *refs, block_q: int, block_k: int, K: int, T: int, G: int,
                 precision):
  """One kv head's key block; the query-side refs hold its G query heads stacked along rows
  (visits (G·nk, nq), counts (G·nk,), cm (G·T, K), q / dO (G·T, dp), lse / delta (G·T,))."""
  dk_ref, dv_ref = refs[-2:]
  ki = pl.program_id(1)
  nk = counts_ref.shape[0] // G
  k_start = ki * block_k
  k = k_ref[...]                                            # (bk, dp)
  v = v_ref[...]

  def head(g, carry):
    """Adds query head g of the group (g == 0 a Python int when G == 1: no offsets)."""
    row0 = g * T if G > 1 else 0                            # its rows in the stacked refs
    col = g * nk + ki if G > 1 else ki

    def body(j, carry):
      dk, dv = carry
      qb = visits_ref[col, j]
      q_start = pl.multiple_of(qb * block_q, block_q)       # row in the head's own T
      r = pl.multiple_of(row0 + q_start, block_q) if G > 1 else q_start
      q = q_ref[pl.ds(r, block_q), :]
      do = do_ref[pl.ds(r, block_q), :]
      lse = lse_ref[pl.ds(r, block_q)]
      delta = delta_ref[pl.ds(r, block_q)]
      rows, bins, causal = tile_bins(q_start, k_start, block_q, block_k, K)
      if G > 1:
        rows = rows + row0
      mask = jnp.logical_and(causal, cm_ref[rows, bins] != 0)
      s = _dot(q, k, trans_b=True, precision=precision)     # (bq, bk)
      p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
      dv = dv + _dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
      dpv = _dot(do, v, trans_b=True, precision=precision)
      ds = p * (dpv - delta[:, None])
      dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True, precision=precision)
      return dk, dv

    return lax.fori_loop(0, counts_ref[col], body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  if G == 1:
    dk, dv = head(0, (zeros, zeros))
  else:
    dk, dv = lax.fori_loop(0, G, head, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- wrappers

def _check_tiled(q, block_sizes):
  T = q.shape[2]
  bq, bk = block_sizes.block_q, block_sizes.block_k
  if T % bq or T % bk:
    raise ValueError(f"gpu kernels need T a multiple of block_q={bq} and block_k={bk}; "
                     f"got q.shape={q.shape} (sparse_attention pads for you)")


def _flat(x, dp=None):
  """(N, H, T, d) -> (N*H, T, dp), zero-padding the head dim (also for k, v at Hkv heads)."""
  N, H, T, d = x.shape
  x = x.reshape(N * H, T, d)
  if dp is not None and dp != d:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, dp - d)))
  return x


def _num_warps(block_sizes, dp):
  nw = getattr(block_sizes, "num_warps", None)
  return nw if nw is not None else (4 if dp <= 64 else 8)


def _common_inputs(visits, counts, cm):
  nh = cm.shape[0] * cm.shape[1]
  visits = visits.reshape(nh, *visits.shape[2:])
  counts = counts.reshape(nh, counts.shape[2])
  cm = cm.reshape(nh, *cm.shape[2:]).astype(jnp.int8)
  return visits, counts, cm


def _full_spec(shape):
  """Per-(n,h) BlockSpec covering the whole trailing array (first dim squeezed)."""
  zeros = (0,) * len(shape)
  return pl.BlockSpec((None, *shape), lambda i, j: (i, *zeros))


def _kv_spec(shape, G: int):
  """Like _full_spec for a program of flat query head i = n*H + h: kv head i // G."""
  if G == 1:
    return _full_spec(shape)
  zeros = (0,) * len(shape)
  return pl.BlockSpec((None, *shape), lambda i, j: (lax.div(i, G), *zeros))


def _group_of(x, G: int):
  """Per-query-head (N, H, R, ...) -> (N*H/G, G*R, ...): a group's G heads stacked along R."""
  N, H, R = x.shape[:3]
  return x.reshape(N * H // G, G * R, *x.shape[3:])


def _groups(q, k):
  """G = H // Hkv (sparse_attention.check_inputs has checked the shapes)."""
  if k.shape[1] < 1 or q.shape[1] % k.shape[1]:
    raise ValueError(f"q heads must be a multiple of k heads; got q.shape={q.shape}, "
                     f"k.shape={k.shape}")
  return q.shape[1] // k.shape[1]


def forward(q, k, v, compressed_mask, block_map: BlockMap, *, block_sizes,
            interpret: bool = False, poison: bool = False):
  """q (N,H,T,d), k, v (N,Hkv,T,d), bool (N,H,T,K), BlockMap -> (out (N,H,T,d) q.dtype,
  lse (N,H,T) fp32); query head h reads kv head h // (H // Hkv).

  poison=True (tests): outputs start as NaN buffers aliased into the call, so any element
  the kernel fails to write stays NaN.
  """
  _check_tiled(q, block_sizes)
  N, H, T, d = q.shape
  G = _groups(q, k)
  K = compressed_mask.shape[-1]
  bq, bk = block_sizes.block_q, block_sizes.block_k
  dp = _padded_head_dim(d)
  nq, nk = T // bq, T // bk
  visits, counts, cm = _common_inputs(block_map.q_visits, block_map.q_counts, compressed_mask)
  qf, kf, vf = _flat(q, dp), _flat(k, dp), _flat(v, dp)
  nh = N * H
  in_specs = [
      _full_spec((nq, nk)), _full_spec((nq,)), _full_spec((T, K)),
      pl.BlockSpec((None, bq, dp), lambda i, j: (i, j, 0)),
      _kv_spec((T, dp), G), _kv_spec((T, dp), G),
  ]
  out_specs = [pl.BlockSpec((None, bq, dp), lambda i, j: (i, j, 0)),
               pl.BlockSpec((None, bq), lambda i, j: (i, j))]
  out_shape = [jax.ShapeDtypeStruct((nh, T, dp), q.dtype),
               jax.ShapeDtypeStruct((nh, T), jnp.float32)]
  args = [visits, counts, cm, qf, kf, vf]
  aliases = {}
  if poison:
    in_specs += out_specs
    aliases = {len(args): 0, len(args) + 1: 1}
    args += [jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shape]
  kernel = functools.partial(_fwd_kernel, block_q=bq, block_k=bk, K=K,
                             precision=_precision(q.dtype))
  out, lse = pl.pallas_call(
      kernel, grid=(nh, nq), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      input_output_aliases=aliases, interpret=interpret, name="sea_sparse_attention_fwd",
      compiler_params=_compiler_params(_num_warps(block_sizes, dp), block_sizes.num_stages),
  )(*args)
  out = out[..., :d].reshape(N, H, T, d)
  return out, lse.reshape(N, H, T)


def backward(q, k, v, compressed_mask, block_map: BlockMap, out, lse, d_out, *,
             block_sizes, interpret: bool = False, poison: bool = False):
  """Residuals + d_out (N,H,T,d) -> (dq (N,H,T,d), dk, dv (N,Hkv,T,d)) in the inputs' dtypes."""
  _check_tiled(q, block_sizes)
  N, H, T, d = q.shape
  G = _groups(q, k)
  K = compressed_mask.shape[-1]
  bq, bk = block_sizes.block_q, block_sizes.block_k
  dp = _padded_head_dim(d)
  nq, nk = T // bq, T // bk
  nh = N * H
  delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)
  d_out = d_out.astype(q.dtype)
  qf, kf, vf, dof = _flat(q, dp), _flat(k, dp), _flat(v, dp), _flat(d_out, dp)
  lse = lse.reshape(nh, T).astype(jnp.float32)
  delta = delta.reshape(nh, T)
  precision = _precision(q.dtype)
  params = _compiler_params(_num_warps(block_sizes, dp), block_sizes.num_stages)

  def poisoned(args, in_specs, out_specs, out_shape):
    if not poison:
      return args, in_specs, {}
    aliases = {len(args) + i: i for i in range(len(out_shape))}
    return (args + [jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shape],
            in_specs + out_specs, aliases)

  # dq: one program per query block, over its visited key blocks.
  visits, counts, cm = _common_inputs(block_map.q_visits, block_map.q_counts, compressed_mask)
  q_blk = pl.BlockSpec((None, bq, dp), lambda i, j: (i, j, 0))
  row_blk = pl.BlockSpec((None, bq), lambda i, j: (i, j))
  in_specs = [_full_spec((nq, nk)), _full_spec((nq,)), _full_spec((T, K)),
              q_blk, _kv_spec((T, dp), G), _kv_spec((T, dp), G), q_blk, row_blk, row_blk]
  out_specs = [q_blk]
  out_shape = [jax.ShapeDtypeStruct((nh, T, dp), q.dtype)]
  args, in_specs, aliases = poisoned(
      [visits, counts, cm, qf, kf, vf, dof, lse, delta], in_specs, out_specs, out_shape)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_q=bq, block_k=bk, K=K, precision=precision),
      grid=(nh, nq), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      input_output_aliases=aliases, interpret=interpret, compiler_params=params,
      name="sea_sparse_attention_dq",
  )(*args)[0]

  # dk, dv: one program per (kv head, key block), over the G query heads of its group and,
  # for each, the query blocks that visit the key block. Query-side inputs are regrouped
  # (free reshapes) so that a program sees its group's G heads stacked along rows.
  nkv = nh // G
  visits = _group_of(block_map.k_visits, G)                        # (nkv, G*nk, nq)
  counts = _group_of(block_map.k_counts, G)                        # (nkv, G*nk)
  cm = _group_of(compressed_mask, G).astype(jnp.int8)              # (nkv, G*T, K)
  grouped = [x.reshape(nkv, G * T, *x.shape[2:]) for x in (qf, dof, lse, delta)]
  k_blk = pl.BlockSpec((None, bk, dp), lambda i, j: (i, j, 0))
  in_specs = [_full_spec((G * nk, nq)), _full_spec((G * nk,)), _full_spec((G * T, K)),
              _full_spec((G * T, dp)), k_blk, k_blk, _full_spec((G * T, dp)),
              _full_spec((G * T,)), _full_spec((G * T,))]
  out_specs = [k_blk, k_blk]
  out_shape = [jax.ShapeDtypeStruct((nkv, T, dp), k.dtype),
               jax.ShapeDtypeStruct((nkv, T, dp), v.dtype)]
  gq, gdo, glse, gdelta = grouped
  args, in_specs, aliases = poisoned(
      [visits, counts, cm, gq, kf, vf, gdo, glse, gdelta], in_specs, out_specs, out_shape)
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, block_q=bq, block_k=bk, K=K, T=T, G=G,
                        precision=precision),
      grid=(nkv, nk), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      input_output_aliases=aliases, interpret=interpret, compiler_params=params,
      name="sea_sparse_attention_dkdv",
  )(*args)

  def unflat(x):
    return x[..., :d].reshape(N, -1, T, d)
  return unflat(dq), unflat(dk), unflat(dv)
