"""Sparse causal attention under a compressed mask (SEA_SPEC §1.5), pure JAX, O(T) memory.

The dense mask M[t,s] = M̂[t, bin_t(s)] (s <= t) is a closed function of (t, s, M̂[t]), so it is
rebuilt per tile and never stored for all T × T pairs.

`sparse_attention` (the contract) visits only the (head, query block, key block) tiles that
hold a kept key (`block_map.visited_tiles`), so its work follows the kept keys; see the tile-list
section below. When the kept keys touch so many tiles that only the ladder's last rung (every
causal tile) holds them, as an untrained estimator's scattered mask does, that rung runs
`blocked_attention`: the same every-key work in large matmuls, cheaper than the per-tile loop.
`sparse_attention_reference` is the plain form it is tested against: every query block against
all T keys (quadratic work, linear memory).

Grouped-query attention: k and v may have Hkv heads, H % Hkv == 0; query head h reads kv head
h // G, G = H // Hkv (Hugging Face's `repeat_kv` order). k and v are never repeated to H heads:
the tile list gathers kv blocks from row (n·H + h) // G = n·Hkv + h // G, and the backward adds
the G query heads' dk, dv into one kv block. The mask stays per query head, (N, H, T, K).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sea_jax.ops.blocked_attention import blocked_attention, expand_rows
from sea_jax.ops.bins import bin_index
from sea_jax.ops.block_map import visited_tiles


def check_shapes(q, k, v, compressed_mask) -> int:
  """G = H // Hkv for q (N,H,T,d), k, v (N,Hkv,T,d), M̂ (N,H,T,K); ValueError naming the shapes."""
  shapes = (f"q.shape={q.shape}, k.shape={k.shape}, v.shape={v.shape}, "
            f"compressed_mask.shape={compressed_mask.shape}")
  if q.ndim != 4 or k.ndim != 4:
    raise ValueError(f"q must be (N, H, T, d) and k, v (N, Hkv, T, d); got {shapes}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same (N, Hkv, T, d) shape; got {shapes}")
  N, H, T, d = q.shape
  if (k.shape[0], k.shape[2], k.shape[3]) != (N, T, d):
    raise ValueError(f"k, v must match q's N, T and d; got {shapes}")
  Hkv = k.shape[1]
  if Hkv < 1 or H % Hkv:
    raise ValueError(f"q's heads H={H} must be a multiple of k/v's heads Hkv={Hkv}; got {shapes}")
  if compressed_mask.ndim != 4 or compressed_mask.shape[:3] != q.shape[:3]:
    raise ValueError(f"compressed_mask must be (N, H, T, K) matching q's (N, H, T); "
                     f"got {shapes}")
  if compressed_mask.shape[3] < 1:
    raise ValueError(f"compressed width K must be >= 1; got {shapes}")
  return H // Hkv


def sparse_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                               compressed_mask: jax.Array, *, query_block: int = 128) -> jax.Array:
  """softmax over kept keys, times v: q (N,H,T,d), k, v (N,Hkv,T,d), M̂ (N,H,T,K) bool
  -> (N,H,T,d); query head h reads kv head h // (H // Hkv).

  q is already scaled. Scores and softmax are fp32 (fp64 for fp64 inputs); a row with nothing kept gives zeros.
  Query rows run in blocks of `query_block` (T is padded to a multiple) under `lax.scan`; the
  block body is rematerialised, so neither pass holds more than one block's B × T scores.
  Output dtype = v.dtype.
  """
  G = check_shapes(q, k, v, compressed_mask)
  N, H, T, d = q.shape
  Hkv = H // G
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
    mask = expand_rows(m_blk, rows, T)
    if G > 1:  # grouped view (N, Hkv, G, ...) of the query heads: k, v are read, not repeated
      mask = mask.reshape(N, Hkv, G, B, T)
      scores = jnp.einsum("ngcbd,ngsd->ngcbs", q_blk.reshape(N, Hkv, G, B, d), k,
                          preferred_element_type=acc)
    else:
      scores = jnp.einsum("nhbd,nhsd->nhbs", q_blk, k, preferred_element_type=acc)
    top = jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1, keepdims=True)
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    # exp of the masked logits only: exp(scores - top) can overflow on dropped entries, and an
    # inf under `where` turns into NaN gradients.
    p = jnp.exp(jnp.where(mask, scores - top, -jnp.inf))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out_type = jnp.promote_types(v.dtype, jnp.float32)
    if G > 1:
      out = jnp.einsum("ngcbs,ngsd->ngcbd", p.astype(v.dtype), v, preferred_element_type=out_type)
      return out.reshape(N, H, B, d)
    return jnp.einsum("nhbs,nhsd->nhbd", p.astype(v.dtype), v, preferred_element_type=out_type)

  def step(carry, xs):
    q_blk, m_blk, start = xs
    return carry, block(q_blk, m_blk, start)

  starts = jnp.arange(n_blocks, dtype=jnp.int32) * B
  _, out = jax.lax.scan(step, None, (q_blocks, m_blocks, starts))
  out = out.transpose(1, 2, 0, 3, 4).reshape(N, H, n_blocks * B, d)
  return out[:, :, :T].astype(v.dtype)


# ------------------------------------------------------------------ tile-list sparse attention
#
# Every visited (head, query block, key block) tile goes into one flat list, processed by a
# `lax.scan` with flash-attention's online softmax into per-query-block accumulators; the
# backward (custom VJP) recomputes each tile from the saved log-sum-exp. The list's static
# length C is chosen per call from a ladder (`tile_ladder`) as the smallest rung that holds
# every visited tile; the top rung holds every causal tile, so no kept key is ever dropped.
# Tiles name flattened query heads n·H + h; with G query heads per kv head their k, v blocks
# are row (n·H + h) // G = n·Hkv + h // G of the (N·Hkv) kv blocks.

_EMPTY = 1e30  # finite stand-ins for -inf / the lse of a row with nothing kept


def tile_ladder(num_heads: int, num_blocks: int, ratio: float = 0.5,
                floor_fraction: float = 1 / 16) -> tuple[int, ...]:
  """Static tile-list lengths, ascending: every causal tile of every head (the last, which no
  mask exceeds), then x `ratio` per rung down to `floor_fraction` of it. Each rung is one
  compiled branch; a call pays for its rung, at most 1 / ratio times its visited tiles. Up to
  4 query blocks there is one rung: so few tiles leave little to skip, and compiles stay short."""
  total = num_heads * num_blocks * (num_blocks + 1) // 2
  if num_blocks <= 4:
    return (total,)
  caps, c = [], total
  while c >= max(1, total * floor_fraction):
    caps.append(c)
    c = int(c * ratio)
  return tuple(sorted(set(caps)))


def causal_visited_tiles(compressed_mask: jax.Array, query_block: int) -> jax.Array:
  """(N,H,nb,nb) bool: the causal tiles (key block <= query block) that hold a kept key."""
  vis = visited_tiles(compressed_mask, block_q=query_block, block_k=query_block)
  nb = vis.shape[-1]
  return vis & (jnp.arange(nb)[None, :] <= jnp.arange(nb)[:, None])


def _tile_list(visited, C: int):
  """(NH,nb,nb) bool -> (head, qblock, kblock, valid), each (C,), in (head, qblock) order."""
  NH, nb, _ = visited.shape
  flat = visited.reshape(-1)
  (idx,) = jnp.nonzero(flat, size=C, fill_value=0)
  valid = jnp.arange(C) < jnp.sum(flat)
  head, rest = idx // (nb * nb), idx % (nb * nb)
  as_int = lambda x: x.astype(jnp.int32)  # noqa: E731
  return as_int(head), as_int(rest // nb), as_int(rest % nb), valid


def _tile_mask(m_rows, qb, kb, B: int):
  """(B,B) bool dense mask of tile (qb, kb) from its query rows' compressed mask (B,K)."""
  K = m_rows.shape[-1]
  t = qb * B + jnp.arange(B, dtype=jnp.int32)[:, None]
  s = kb * B + jnp.arange(B, dtype=jnp.int32)[None, :]
  bins = jnp.clip(bin_index(t, s, K), 0, K - 1)
  return jnp.take_along_axis(m_rows, bins, axis=-1) & (s <= t)


def _blocks(x, B):
  NH = x.shape[0] * x.shape[1]
  return x.reshape(NH, x.shape[2] // B, B, x.shape[-1])


def _kv_row(h, G: int):
  """Flat kv head n·Hkv + h_in // G of flat query head h = n·H + h_in (H = Hkv·G)."""
  return h // G if G > 1 else h


def _tiles_forward(q, k, v, cm, tiles, B: int):
  """(out (NH,nb,B,d) fp32, lse (NH,nb,B) fp32) over the tiles; k, v (N,Hkv,T,d)."""
  qb_, kb_, vb_, mb_ = (_blocks(x, B) for x in (q, k, v, cm))
  G = q.shape[1] // k.shape[1]
  NH, nb, _, d = qb_.shape
  acc = jnp.result_type(jnp.float32, q.dtype, k.dtype)
  o = jnp.zeros((NH, nb, B, d), acc)
  m = jnp.full((NH, nb, B), -_EMPTY, acc)
  l = jnp.zeros((NH, nb, B), acc)

  def step(carry, tile):
    o, m, l = carry
    h, i, j, ok = tile
    g = _kv_row(h, G)
    mask = _tile_mask(mb_[h, i], i, j, B) & ok
    s = jnp.dot(qb_[h, i], kb_[g, j].T, preferred_element_type=acc)
    m_old, l_old, o_old = m[h, i], l[h, i], o[h, i]
    m_new = jnp.maximum(m_old, jnp.max(jnp.where(mask, s, -_EMPTY), axis=-1))
    p = jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - m_new[:, None]), 0.0)
    scale = jnp.exp(m_old - m_new)
    l = l.at[h, i].set(l_old * scale + jnp.sum(p, axis=-1))
    o = o.at[h, i].set(o_old * scale[:, None] + jnp.dot(
        p.astype(v.dtype), vb_[g, j], preferred_element_type=acc))
    return (o, m.at[h, i].set(m_new), l), None

  (o, m, l), _ = jax.lax.scan(step, (o, m, l), tiles)
  nonempty = l > 0
  out = o / jnp.where(nonempty, l, 1.0)[..., None]
  lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), _EMPTY)
  return out, lse


def _tiles_backward(q, k, v, cm, tiles, out, lse, d_out, B: int):
  """(dq (NH,nb,B,d), dk, dv (NHkv,nb,B,d)) fp32: the G query heads of a kv head add into it."""
  qb_, kb_, vb_, mb_ = (_blocks(x, B) for x in (q, k, v, cm))
  G = q.shape[1] // k.shape[1]
  acc = lse.dtype
  do = _blocks(d_out, B).astype(acc)
  delta = jnp.sum(do * out, axis=-1)                                   # (NH,nb,B)
  dq = jnp.zeros(qb_.shape, acc)
  dk = jnp.zeros(kb_.shape, acc)
  dv = jnp.zeros(vb_.shape, acc)

  def step(carry, tile):
    dq, dk, dv = carry
    h, i, j, ok = tile
    g = _kv_row(h, G)
    mask = _tile_mask(mb_[h, i], i, j, B) & ok
    qt, kt, vt = qb_[h, i], kb_[g, j], vb_[g, j]
    s = jnp.dot(qt, kt.T, preferred_element_type=acc)
    p = jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - lse[h, i][:, None]), 0.0)
    dot = do[h, i]
    dv = dv.at[g, j].add(jnp.dot(p.T, dot))
    dp = jnp.dot(dot, vt.T.astype(acc))
    ds = p * (dp - delta[h, i][:, None])
    dq = dq.at[h, i].add(jnp.dot(ds, kt.astype(acc)))
    dk = dk.at[g, j].add(jnp.dot(ds.T, qt.astype(acc)))
    return (dq, dk, dv), None

  (dq, dk, dv), _ = jax.lax.scan(step, (dq, dk, dv), tiles)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _tile_core(q, k, v, cm, tiles, B: int):
  """(NH, nb, B, d) attention over the tile list; k, v (N, Hkv, T, d); B (tile size) static."""
  out, _ = _tiles_forward(q, k, v, cm, tiles, B)
  return out


def _tile_core_fwd(q, k, v, cm, tiles, B: int):
  out, lse = _tiles_forward(q, k, v, cm, tiles, B)
  return out, (q, k, v, cm, tiles, out, lse)


def _tile_core_bwd(B: int, res, d_out):
  q, k, v, cm, tiles, out, lse = res
  dq, dk, dv = _tiles_backward(q, k, v, cm, tiles, out, lse, d_out.reshape(q.shape), B)
  like = lambda g, x: g.reshape(x.shape).astype(x.dtype)  # noqa: E731
  zero = lambda x: np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731 - bool / int inputs
  return like(dq, q), like(dk, k), like(dv, v), zero(cm), tuple(zero(t) for t in tiles)


_tile_core.defvjp(_tile_core_fwd, _tile_core_bwd)


def sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, compressed_mask: jax.Array, *,
                     query_block: int = 128, capacities: tuple[int, ...] | None = None,
                     full_rung: str = "blocked") -> jax.Array:
  """softmax over kept keys, times v: q (N,H,T,d), k, v (N,Hkv,T,d), M̂ (N,H,T,K) bool
  -> (N,H,T,d); query head h reads kv head h // (H // Hkv), k and v are never repeated.

  Equals `sparse_attention_reference`: q already scaled; fp32 scores, softmax and
  accumulation (fp64 for fp64 inputs); a row with nothing kept gives zeros; output v.dtype.
  Tiles are query_block × query_block. Work: the visited tiles, rounded up to the rung of
  `capacities` (default `tile_ladder`; its last entry must hold every causal tile of every
  head). Memory: O(T·d) accumulators plus the (N·H, nb, nb) block map; nothing T × T.

  full_rung: what runs when only the last rung (every causal tile) holds the visited tiles.
  "blocked" (default): `blocked_attention`, the same every-key work as large matmuls, which on
  CPU costs 0.46-0.90x the per-tile loop forward, 0.65-1.0x forward and backward (an untrained
  estimator's mask visits nearly every tile; BENCHMARKS.md, "The every-tile rung runs
  blocked_attention"). "tiles": the tile list itself.
  """
  check_shapes(q, k, v, compressed_mask)
  if full_rung not in ("blocked", "tiles"):
    raise ValueError(f"full_rung must be 'blocked' or 'tiles', got {full_rung!r}")
  N, H, T, d = q.shape
  B = max(1, min(query_block, T))
  nb = -(-T // B)
  pad = nb * B - T
  if pad:  # padded rows keep nothing, and no real row sees a padded key
    widths = ((0, 0), (0, 0), (0, pad), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    compressed_mask = jnp.pad(compressed_mask, widths)
  visited = causal_visited_tiles(jax.lax.stop_gradient(compressed_mask), B)
  visited = visited.reshape(N * H, nb, nb)
  caps = tuple(capacities) if capacities is not None else tile_ladder(N * H, nb)
  if list(caps) != sorted(caps) or caps[-1] < N * H * nb * (nb + 1) // 2:
    raise ValueError(f"capacities must ascend to every causal tile ({N * H * nb * (nb + 1) // 2})"
                     f", got {caps}")
  need = jnp.sum(visited)
  rung = jnp.sum(need > jnp.asarray(caps[:-1], jnp.int32)) if len(caps) > 1 else 0

  def tiles(C):
    def run(q, k, v, cm, visited):
      return _tile_core(q, k, v, cm, _tile_list(visited, C), B).reshape(N, H, nb * B, d)
    return run

  def every_key(q, k, v, cm, visited):
    del visited
    return blocked_attention(q, k, v, compressed_mask=cm)

  branches = [tiles(C) for C in caps]
  if full_rung == "blocked":
    branches[-1] = every_key
  # lax.switch needs one output type: the tile list accumulates in fp32, blocked gives v.dtype
  branches = [lambda *a, f=f: f(*a).astype(v.dtype) for f in branches]
  if len(branches) == 1:
    out = branches[0](q, k, v, compressed_mask, visited)
  else:
    out = jax.lax.switch(rung, branches, q, k, v, compressed_mask, visited)
  return out[:, :, :T].astype(v.dtype)


def expand_mask(compressed_mask: jax.Array, T: int) -> jax.Array:
  """Dense mask (N,H,T,T) bool: M[t,s] = M̂[t, bin_t(s)] for s <= t, else False.

  O(T²) memory: for tests and pictures only.
  """
  K = compressed_mask.shape[-1]
  t = jnp.arange(T, dtype=jnp.int32)[:, None]
  s = jnp.arange(T, dtype=jnp.int32)[None, :]
  bins = jnp.clip(bin_index(t, s, K), 0, K - 1)
  lead = compressed_mask.shape[:-2]
  idx = jnp.broadcast_to(bins, (*lead, T, T))
  dense = jnp.take_along_axis(compressed_mask[..., :T, :], idx, axis=-1)
  return dense & (s <= t)
