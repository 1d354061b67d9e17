"""SEA sparse attention as TPU (Mosaic) Pallas kernels, splash-attention style.

Semantics (N batch, H heads, T tokens, d head dim, K compressed width):
  q (N, H, T, d), k, v (N, Hkv, T, d) fp32 or bf16, q already scaled by d^-0.5; H = G Hkv
    and query head h reads kv head h // G (grouped-query attention; G = 1 is multi-head);
  compressed_mask bool (N, H, T, K) stands for the dense mask
    M[n, h, t, s] = compressed_mask[n, h, t, bin_t(s)] for s <= t, else False,
    bin_t(s) = ((2s + 1) K - 1) // (2 (t + 1))          (sea_jax/ops/bins.py);
  out = softmax over the kept entries of each row (fp32) . v, empty rows -> 0;
  lse = log-sum-exp of the kept scores of each row, NEG_INF for empty rows.

Tiling. Every kernel walks a grid (N, H, outer block, step). The visit lists of
the BlockMap are scalar-prefetched (flattened to 1-D to keep SMEM padding small)
and the BlockSpec index maps read the visited block id from them; the lists are
padded by repeating the last id, so padded steps re-use the resident block (no
DMA) and `pl.when(step < count)` skips their compute.

Mask tiles are built in-kernel, without gathers or integer division:
  * outside the kernel each row's K mask bits are packed into nW = ceil(K / 32)
    int32 words, laid out (N, H, nW, T) (T on lanes; O(T K / 32) memory);
  * in the kernel the bin of every (t, s) of the tile is
    floor(num / den), num = (2s + 1) K - 1, den = 2 (t + 1), computed with one
    fp32 division, clamped to K, then corrected by +-1 with exact int32
    products (fp32 error is far below one bin for K < 10^5);
  * the bit is picked with nW - 1 selects over the words and one variable shift:
    keep = (word[bin >> 5] >> (bin & 31)) & 1 and s <= t.
  The cost per score element is O(nW) VPU ops (8 for K = 256), instead of O(K)
  for a compare-per-bin formulation.

Backward: a dq kernel (grid over query blocks, visiting q_visits) and a dk/dv
kernel (grid over key blocks, visiting k_visits) recompute the probabilities
from q, k and lse; delta = rowsum(dO * O) is computed outside in plain jnp. The
dk/dv kernel works on transposed tiles (key rows on sublanes, query rows on
lanes) so that all its matmuls are NT or NN.

GQA: the forward and dq grids run over query heads and their k/v index maps read
kv head h // G. The dk/dv grid is (N, Hkv, key block, g, step): for one kv head's
key block it walks the G query heads of the group (g) and each one's visited query
blocks (step), accumulating into one VMEM scratch; k and v are never repeated.

Per-row vectors (lse, delta, mask words) live in HBM with T last, i.e. as
(N, H, 1, T) / (N, H, nW, T); blocks are (1, block_q) / (nW, block_q). On a real
TPU block_q and block_k should therefore be multiples of 128 (or equal T).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NEG_INF = -1e30  # lse of empty rows; also the masked-score sentinel.
_LANES = 128
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


# --------------------------------------------------------------------------- helpers


def _interpret_arg(interpret):
  """pallas_call's `interpret` argument: TPU interpret mode when requested."""
  if interpret is True:
    return pltpu.InterpretParams()
  return interpret or False


def _compiler_params(semantics):
  cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
  return cls(dimension_semantics=semantics)


def _precision(dtype):
  """fp32 matmuls at full precision (Mosaic's default may use bf16 passes)."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, dims, precision):
  return lax.dot_general(a, b, dims, precision=precision,
                         preferred_element_type=jnp.float32)


def _lanes_to(x, width):
  """(rows, 128) lane-replicated -> (rows, width)."""
  reps = pl.cdiv(width, _LANES)
  if reps > 1:
    x = jnp.tile(x, (1, reps))
  return x[:, :width] if width != x.shape[1] else x


def pack_mask_words(compressed_mask):
  """(N, H, T, K) bool -> (N, H, nW, T) int32, bit b % 32 of word b // 32 = mask[..., b]."""
  N, H, T, K = compressed_mask.shape
  nw = pl.cdiv(K, 32)
  bits = jnp.pad(compressed_mask.astype(jnp.uint32),
                 ((0, 0), (0, 0), (0, 0), (0, nw * 32 - K)))
  bits = bits.reshape(N, H, T, nw, 32) << jnp.arange(32, dtype=jnp.uint32)
  words = jnp.sum(bits, axis=-1, dtype=jnp.uint32)  # distinct bits: sum == or
  words = lax.bitcast_convert_type(words, jnp.int32)
  return jnp.swapaxes(words, -1, -2)


def _tile_keep(t, s, words, K):
  """Dense mask of a tile: t, s int32 tiles (same shape); words: nW arrays broadcastable to it."""
  num = (2 * s + 1) * K - 1
  den = 2 * (t + 1)
  approx = jnp.minimum(num.astype(jnp.float32) / den.astype(jnp.float32), float(K))
  b = approx.astype(jnp.int32)  # num, den > 0: truncation == floor
  b = jnp.where(b * den > num, b - 1, b)
  b = jnp.where((b + 1) * den <= num, b + 1, b)  # now b == num // den (when s <= t)
  word = jnp.broadcast_to(words[0], b.shape)
  if len(words) > 1:
    wi = b >> 5
    for w in range(1, len(words)):
      word = jnp.where(wi == w, words[w], word)
  bit = (word >> (b & 31)) & 1
  return (bit != 0) & (s <= t)


def _check(q, k, v, compressed_mask, block_map, block_q, block_k, interpret):
  N, H, T, d = q.shape
  assert k.shape == v.shape and k.ndim == 4, (q.shape, k.shape, v.shape)
  assert (k.shape[0], k.shape[2], k.shape[3]) == (N, T, d), (q.shape, k.shape)
  assert k.shape[1] >= 1 and H % k.shape[1] == 0, (q.shape, k.shape)
  assert compressed_mask.shape[:3] == (N, H, T), compressed_mask.shape
  assert T % block_q == 0 and T % block_k == 0, (T, block_q, block_k)
  nq, nk = T // block_q, T // block_k
  if not interpret:
    for name, b in (("block_q", block_q), ("block_k", block_k)):
      if b % _LANES and b != T:
        raise ValueError(f"TPU kernels need {name} to be a multiple of {_LANES} (or T={T}), "
                         f"got {b}; smaller blocks run only with interpret=True")
  assert block_map.q_visits.shape == (N, H, nq, nk), block_map.q_visits.shape
  assert block_map.k_visits.shape == (N, H, nk, nq), block_map.k_visits.shape
  return N, H, T, d, nq, nk


# Scalar-prefetched visit lists live in SMEM (a few hundred KiB at most); one pallas_call
# gets at most this many int32 visit entries, larger problems run as a lax.map over
# groups of heads.
SMEM_VISIT_WORDS = 1 << 16


def _in_head_chunks(call, per_head, *arrays, group: int = 1):
  """call(*arrays) on arrays with leading (N, H) (query heads) or (N, H // group) (kv heads),
  in chunks of c query heads (a multiple of `group`, so whole kv groups) of <=
  SMEM_VISIT_WORDS visit entries (per_head each) and their c // group kv heads; outputs keep
  their leading (N, heads)."""
  N, H = arrays[0].shape[:2]
  nh = N * H
  c = max(1, min(nh, SMEM_VISIT_WORDS // max(per_head, 1)))
  c = max(group, c - c % group)
  while nh % c:
    c -= group
  if c == nh:
    return call(*arrays)

  def chunks(x):
    cx = c if x.shape[1] == H else c // group
    return x.reshape(x.shape[0] * x.shape[1] // cx, 1, cx, *x.shape[2:])

  outs = lax.map(lambda xs: call(*xs), [chunks(x) for x in arrays])
  return jax.tree.map(lambda y: y.reshape(N, -1, *y.shape[3:]), outs)


# --------------------------------------------------------------------------- forward


def _fwd_kernel(qv_ref, qc_ref, q_ref, k_ref, v_ref, w_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, H, nq, nk, bq, bk, K, nw, precision):
  n, h, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  row = (n * H + h) * nq + i

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full_like(m_sc, NEG_INF)
    l_sc[...] = jnp.zeros_like(l_sc)
    acc_sc[...] = jnp.zeros_like(acc_sc)

  @pl.when(j < qc_ref[row])
  def _step():
    kb = qv_ref[row * nk + j]
    v = v_ref[...]
    s = _dot(q_ref[...], k_ref[...], _NT, precision)  # (bq, bk)
    t_ids = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    s_ids = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    words = [jnp.expand_dims(w_ref[w], -1) for w in range(nw)]  # (bq, 1) each
    keep = _tile_keep(t_ids, s_ids, words, K)
    s = jnp.where(keep, s, NEG_INF)
    m_prev = m_sc[...]  # (bq, 128), lane-replicated
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(keep, jnp.exp(s - _lanes_to(m_next, bk)), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    m_sc[...] = m_next
    pv = _dot(p.astype(v.dtype), v, _NN, precision)  # (bq, d)
    acc_sc[...] = _lanes_to(alpha, acc_sc.shape[1]) * acc_sc[...] + pv

  @pl.when(j == nk - 1)
  def _finish():
    l = l_sc[...]
    empty = l == 0.0
    inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
    o_ref[...] = (acc_sc[...] * _lanes_to(inv, acc_sc.shape[1])).astype(o_ref.dtype)
    lse = jnp.where(empty, NEG_INF, m_sc[...] + jnp.log(jnp.where(empty, 1.0, l)))
    lse_ref[...] = lse.T[:1, :]  # (bq, 128) -> (1, bq)


def _query_grid_maps(H: int, nq: int, nk: int, G: int = 1):
  """Index maps of a (N, H, query block i, visit step j) grid with the query-block visit lists
  scalar-prefetched: q-side blocks, the visited k/v block (of kv head h // G), and per-row
  (N, H, *, T) data."""

  def q_map(n, h, i, j, qv, qc):
    return n, h, i, 0

  def kv_map(n, h, i, j, qv, qc):
    return n, lax.div(h, G) if G > 1 else h, qv[((n * H + h) * nq + i) * nk + j], 0

  def row_map(n, h, i, j, qv, qc):
    return n, h, 0, i

  return q_map, kv_map, row_map


def _fwd_call(q, k, v, words, qv, qc, *, bq, bk, K, interpret):
  """One pallas_call over all (n, h) of its inputs: q (N, H, T, d), k, v (N, Hkv, T, d),
  words (N, H, nW, T), q_visits (N, H, nQ, nK), q_counts (N, H, nQ)
  -> out (N, H, T, d), lse (N, H, 1, T)."""
  N, H, T, d = q.shape
  nq, nk = qv.shape[2:]
  nw = words.shape[2]

  q_map, kv_map, row_map = _query_grid_maps(H, nq, nk, H // k.shape[1])

  kernel = functools.partial(_fwd_kernel, H=H, nq=nq, nk=nk, bq=bq, bk=bk, K=K, nw=nw,
                             precision=_precision(q.dtype))
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(N, H, nq, nk),
          in_specs=[
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, nw, bq), row_map),
          ],
          out_specs=[
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, 1, bq), row_map),
          ],
          scratch_shapes=[
              pltpu.VMEM((bq, _LANES), jnp.float32),
              pltpu.VMEM((bq, _LANES), jnp.float32),
              pltpu.VMEM((bq, d), jnp.float32),
          ],
      ),
      out_shape=[
          jax.ShapeDtypeStruct((N, H, T, d), q.dtype),
          jax.ShapeDtypeStruct((N, H, 1, T), jnp.float32),
      ],
      compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="sea_sparse_attention_fwd",
  )(qv.reshape(-1), qc.reshape(-1), q, k, v, words)


def forward(q, k, v, compressed_mask, block_map, *, block_sizes, interpret=False):
  """q (N, H, T, d), k, v (N, Hkv, T, d), compressed_mask (N, H, T, K), block_map for
  block_sizes (`BlockSizes`: block_q x block_k tiles) -> out (N, H, T, d) in q.dtype, lse
  (N, H, T) fp32 (NEG_INF for empty rows); query head h reads kv head h // (H // Hkv)."""
  block_q, block_k = block_sizes.block_q, block_sizes.block_k
  N, H, T, d, nq, nk = _check(q, k, v, compressed_mask, block_map, block_q,
                              block_k, interpret)
  K = compressed_mask.shape[-1]
  call = functools.partial(_fwd_call, bq=block_q, bk=block_k, K=K,
                           interpret=_interpret_arg(interpret))
  out, lse = _in_head_chunks(call, nq * nk, q, k, v, pack_mask_words(compressed_mask),
                             block_map.q_visits.astype(jnp.int32),
                             block_map.q_counts.astype(jnp.int32), group=H // k.shape[1])
  return out, lse.reshape(N, H, T)


# --------------------------------------------------------------------------- backward


def _dq_kernel(qv_ref, qc_ref, q_ref, k_ref, v_ref, do_ref, w_ref, lse_ref, dl_ref,
               dq_ref, dq_sc, *, H, nq, nk, bq, bk, K, nw, precision):
  n, h, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  row = (n * H + h) * nq + i

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros_like(dq_sc)

  @pl.when(j < qc_ref[row])
  def _step():
    kb = qv_ref[row * nk + j]
    k, v = k_ref[...], v_ref[...]
    s = _dot(q_ref[...], k, _NT, precision)  # (bq, bk)
    t_ids = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    s_ids = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    words = [jnp.expand_dims(w_ref[w], -1) for w in range(nw)]
    keep = _tile_keep(t_ids, s_ids, words, K)
    lse = jnp.expand_dims(lse_ref[0], -1)  # (bq, 1)
    delta = jnp.expand_dims(dl_ref[0], -1)
    p = jnp.where(keep, jnp.exp(s - lse), 0.0)  # masked / empty rows: exact 0
    dp = _dot(do_ref[...].astype(v.dtype), v, _NT, precision)  # (bq, bk)
    ds = p * (dp - delta)
    dq_sc[...] += _dot(ds.astype(k.dtype), k, _NN, precision)

  @pl.when(j == nk - 1)
  def _finish():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(kv_ref, kc_ref, k_ref, v_ref, q_ref, do_ref, w_ref, lse_ref, dl_ref,
                dk_ref, dv_ref, dk_sc, dv_sc, *, H, G, nq, nk, bq, bk, K, nw, precision):
  n, hk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  g, i = pl.program_id(3), pl.program_id(4)   # query head hk * G + g of the group, step
  col = (n * H + hk * G + g) * nk + j

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_sc[...] = jnp.zeros_like(dk_sc)
    dv_sc[...] = jnp.zeros_like(dv_sc)

  @pl.when(i < kc_ref[col])
  def _step():
    qb = kv_ref[col * nq + i]
    q, do = q_ref[...], do_ref[...]
    v = v_ref[...]
    st = _dot(k_ref[...], q, _NT, precision)  # (bk, bq): keys on sublanes
    s_ids = j * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
    t_ids = qb * bq + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
    words = [w_ref[w:w + 1, :] for w in range(nw)]  # (1, bq) each
    keep = _tile_keep(t_ids, s_ids, words, K)
    lse = lse_ref[...]  # (1, bq)
    delta = dl_ref[...]
    pt = jnp.where(keep, jnp.exp(st - lse), 0.0)
    dv_sc[...] += _dot(pt.astype(do.dtype), do, _NN, precision)  # (bk, d)
    dpt = _dot(v, do.astype(v.dtype), _NT, precision)  # (bk, bq)
    dst = pt * (dpt - delta)
    dk_sc[...] += _dot(dst.astype(q.dtype), q, _NN, precision)

  @pl.when((g == G - 1) & (i == nq - 1))
  def _finish():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_call(q, k, v, do, words, lse, delta, qv, qc, *, bq, bk, K, interpret):
  """dq over query blocks: lse, delta (N, H, 1, T); k, v (N, Hkv, T, d); q_visits/q_counts as
  in _fwd_call."""
  N, H, T, d = q.shape
  nq, nk = qv.shape[2:]
  nw = words.shape[2]

  q_map, kv_map, row_map = _query_grid_maps(H, nq, nk, H // k.shape[1])

  kernel = functools.partial(_dq_kernel, H=H, nq=nq, nk=nk, bq=bq, bk=bk, K=K, nw=nw,
                             precision=_precision(q.dtype))
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(N, H, nq, nk),
          in_specs=[
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, nw, bq), row_map),
              pl.BlockSpec((None, None, 1, bq), row_map),
              pl.BlockSpec((None, None, 1, bq), row_map),
          ],
          out_specs=pl.BlockSpec((None, None, bq, d), q_map),
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct((N, H, T, d), q.dtype),
      compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="sea_sparse_attention_dq",
  )(qv.reshape(-1), qc.reshape(-1), q, k, v, do, words, lse, delta)


def _dkv_call(q, k, v, do, words, lse, delta, kv, kc, *, bq, bk, K, interpret):
  """dk, dv (N, Hkv, T, d) over key blocks of kv heads, each summing the G query heads of its
  group: k_visits (N, H, nK, nQ), k_counts (N, H, nK) per query head."""
  N, H, T, d = q.shape
  Hkv = k.shape[1]
  G = H // Hkv
  nk, nq = kv.shape[2:]
  nw = words.shape[2]

  def k_map(n, hk, j, g, i, kv, kc):
    return n, hk, j, 0

  def q_map(n, hk, j, g, i, kv, kc):
    h = hk * G + g
    return n, h, kv[((n * H + h) * nk + j) * nq + i], 0

  def row_map(n, hk, j, g, i, kv, kc):
    h = hk * G + g
    return n, h, 0, kv[((n * H + h) * nk + j) * nq + i]

  kernel = functools.partial(_dkv_kernel, H=H, G=G, nq=nq, nk=nk, bq=bq, bk=bk, K=K, nw=nw,
                             precision=_precision(q.dtype))
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(N, Hkv, nk, G, nq),
          in_specs=[
              pl.BlockSpec((None, None, bk, d), k_map),
              pl.BlockSpec((None, None, bk, d), k_map),
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, nw, bq), row_map),
              pl.BlockSpec((None, None, 1, bq), row_map),
              pl.BlockSpec((None, None, 1, bq), row_map),
          ],
          out_specs=[
              pl.BlockSpec((None, None, bk, d), k_map),
              pl.BlockSpec((None, None, bk, d), k_map),
          ],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32),
                          pltpu.VMEM((bk, d), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct((N, Hkv, T, d), k.dtype),
                 jax.ShapeDtypeStruct((N, Hkv, T, d), v.dtype)],
      compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary",
                                        "arbitrary")),
      interpret=interpret,
      name="sea_sparse_attention_dkv",
  )(kv.reshape(-1), kc.reshape(-1), k, v, q, do, words, lse, delta)


def backward(q, k, v, compressed_mask, block_map, out, lse, d_out, *, block_sizes,
             interpret=False):
  """Gradients of forward's out given d_out (N, H, T, d): dq (N, H, T, d), dk, dv (N, Hkv, T, d),
  in the dtypes of q, k, v."""
  block_q, block_k = block_sizes.block_q, block_sizes.block_k
  N, H, T, d, nq, nk = _check(q, k, v, compressed_mask, block_map, block_q,
                              block_k, interpret)
  K = compressed_mask.shape[-1]
  kw = dict(bq=block_q, bk=block_k, K=K, interpret=_interpret_arg(interpret))
  words = pack_mask_words(compressed_mask)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  rows = (q, k, v, d_out.astype(q.dtype), words,
          lse.astype(jnp.float32).reshape(N, H, 1, T), delta.reshape(N, H, 1, T))
  G = H // k.shape[1]
  dq = _in_head_chunks(functools.partial(_dq_call, **kw), nq * nk, *rows,
                       block_map.q_visits.astype(jnp.int32),
                       block_map.q_counts.astype(jnp.int32), group=G)
  dk, dv = _in_head_chunks(functools.partial(_dkv_call, **kw), nq * nk, *rows,
                           block_map.k_visits.astype(jnp.int32),
                           block_map.k_counts.astype(jnp.int32), group=G)
  return dq, dk, dv
