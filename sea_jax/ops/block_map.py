"""Block map and tile index math for SEA sparse attention (shared by every kernel backend).

Shared by the XLA block-sparse path (sea_jax.ops.sparse) and the Pallas kernels, jit-able:
from the compressed mask (N, H, T, K) find, per (n, h) and query block, which key blocks hold
any kept entry, in O(T*K) work plus block-level O(T^2 / (block_q * block_k)) arrays. Nothing
T x T is built.

Each kept cell (t, b) stands for the key interval [bin_start(t, b), bin_start(t, b + 1)),
i.e. key blocks [start // block_k, (end - 1) // block_k] of query block t // block_q. These
intervals are marked with a difference array of shape (N, H, nQ, nK + 1) and a cumsum over
key blocks.

The tile helpers at the bottom (`tile_positions`, `tile_bins`) are the in-kernel index
math: plain jnp/lax on non-negative int32, so they lower in Triton, Mosaic and interpret.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sea_jax.ops.bins import bin_start


class BlockMap(NamedTuple):
  """Visited key blocks per query block, and the transpose (all int32).

  q_visits: (N, H, nQ, nK) visited key-block ids ascending, padded by repeating the last
    valid id (0 when the query block visits nothing).
  q_counts: (N, H, nQ) number of valid entries in q_visits.
  k_visits: (N, H, nK, nQ) query blocks that visit each key block, same padding.
  k_counts: (N, H, nK).
  """
  q_visits: jax.Array
  q_counts: jax.Array
  k_visits: jax.Array
  k_counts: jax.Array

  @property
  def num_q_blocks(self) -> int:
    return self.q_visits.shape[2]

  @property
  def num_k_blocks(self) -> int:
    return self.q_visits.shape[3]

  def visited_fraction(self, causal_tiles: bool = False) -> jax.Array:
    """Fraction (scalar fp32) of (query block, key block) tiles visited.

    causal_tiles=False: over all nQ*nK tiles. True: over the tiles dense causal attention
    would visit (key block <= query block's last row), assuming block_q == block_k.
    """
    n, h, nq, nk = self.q_visits.shape
    visited = jnp.sum(self.q_counts.astype(jnp.float32))
    if causal_tiles:
      if nq != nk:
        raise ValueError("causal_tiles=True needs block_q == block_k "
                         f"(got nQ={nq}, nK={nk})")
      total = n * h * nq * (nq + 1) / 2
    else:
      total = n * h * nq * nk
    return visited / total


def num_blocks(T: int, block: int) -> int:
  return -(-T // block)


def visited_tiles(compressed_mask: jax.Array, *, block_q: int, block_k: int) -> jax.Array:
  """(N, H, nQ, nK) bool: tile (query block, key block) holds a kept entry of the dense mask."""
  if compressed_mask.ndim != 4:
    raise ValueError(f"compressed_mask must be (N, H, T, K), got shape {compressed_mask.shape}")
  N, H, T, K = compressed_mask.shape
  nq, nk = num_blocks(T, block_q), num_blocks(T, block_k)
  t = jnp.arange(T, dtype=jnp.int32)[:, None]
  b = jnp.arange(K, dtype=jnp.int32)[None, :]
  start = bin_start(t, b, K)          # (T, K), first key of bin b
  end = bin_start(t, b + 1, K)        # (T, K), one past its last key
  kb_lo = start // block_k
  kb_hi = jnp.maximum(end - 1, 0) // block_k + 1   # exclusive
  qb = jnp.broadcast_to(t // block_q, (T, K))
  live = compressed_mask.astype(bool) & (end > start)[None, None]   # (N, H, T, K)
  live = live.reshape(N * H, T, K)
  size = N * H * nq * (nk + 1)
  nh = jnp.arange(N * H, dtype=jnp.int32)[:, None, None]
  row = (nh * nq + qb[None]) * (nk + 1)                      # (NH, T, K)
  # Cells not kept get an out-of-range index and are dropped (no atomic, no contention):
  # at large T nearly all cells are empty (about k keys per row are kept).
  flat_lo = jnp.where(live, row + kb_lo[None], size).reshape(-1)
  flat_hi = jnp.where(live, row + kb_hi[None], size).reshape(-1)
  diff = jnp.zeros((size,), jnp.int32)
  diff = diff.at[flat_lo].add(1, mode="drop")
  diff = diff.at[flat_hi].add(-1, mode="drop")
  cover = jnp.cumsum(diff.reshape(N, H, nq, nk + 1), axis=-1)[..., :nk]
  return cover > 0


def compact(visited: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(..., M) bool -> (ids (..., M) int32 ascending, padded by the last valid id or 0;
  counts (...) int32)."""
  m = visited.shape[-1]
  ids = jnp.arange(m, dtype=jnp.int32)
  key = jnp.where(visited, ids, m)
  order = jnp.sort(key, axis=-1)
  counts = jnp.sum(visited, axis=-1, dtype=jnp.int32)
  last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  last = jnp.where(counts[..., None] > 0, last, 0)
  out = jnp.where(ids < counts[..., None], order, last)
  return out.astype(jnp.int32), counts


def build_block_map(compressed_mask: jax.Array, *, block_q: int, block_k: int) -> BlockMap:
  """compressed_mask (N, H, T, K) bool -> BlockMap for tiles of block_q queries x block_k keys.

  nQ = ceil(T / block_q), nK = ceil(T / block_k); block sizes are static.
  """
  if block_q <= 0 or block_k <= 0:
    raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}")
  visited = visited_tiles(compressed_mask, block_q=block_q, block_k=block_k)
  q_visits, q_counts = compact(visited)
  k_visits, k_counts = compact(jnp.swapaxes(visited, -1, -2))
  return BlockMap(q_visits, q_counts, k_visits, k_counts)


# ----------------------------------------------------------------------------------------
# In-kernel tile index math (shared by the Triton-style kernel and any Mosaic variant).

def bin_index_nonneg(t, s, K: int):
  """bin_t(s) = ((2s+1)K - 1) // (2(t+1)) with lax.div (t, s >= 0, so truncation == floor).

  Same integer formula as sea_jax.ops.bins.bin_index, written without jnp.floor_divide's
  sign fix-ups so it lowers in Triton.
  """
  return lax.div((2 * s + 1) * K - 1, 2 * (t + 1))


def tile_positions(q_start, k_start, block_q: int, block_k: int):
  """Absolute query rows t (block_q, 1) and key columns s (1, block_k), int32."""
  t = q_start + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
  s = k_start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
  return t, s


def tile_bins(q_start, k_start, block_q: int, block_k: int, K: int):
  """(rows, bins, causal) for one tile, each (block_q, block_k) int32/bool.

  rows: absolute query row of each element; bins: bin_t(s), clamped to 0 where s > t so a
  gather at [rows, bins] stays in bounds; causal: s <= t. The tile's dense mask is
  causal & compressed_mask[rows, bins].
  """
  t, s = tile_positions(q_start, k_start, block_q, block_k)
  causal = s <= t
  bins = jnp.where(causal, bin_index_nonneg(t, s, K), 0)
  rows = jnp.broadcast_to(t, (block_q, block_k))
  return rows, bins, causal
