"""Grouped top-k over heads (SEA_SPEC §1.4) and the dense expansion of a compressed mask (§1.5)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sea_jax.sea.bins import bin_index, nonempty_bins, row_bounds


def check_k(k) -> None:
  if isinstance(k, (int, np.integer)) and k < 1:
    raise ValueError(f"SEA k (keys per query per head) must be >= 1, got k={k}")


def row_budget(T: int, H: int, K: int, k) -> jax.Array:
  """(T,) int32: c_t = clamp(round_half_even(H·k·K / (t+1)), 1, H·K), in exact integers.

  k may be a Python int or a traced integer scalar.
  """
  return budget_at(jnp.arange(T, dtype=jnp.int32), H, K, k)


def budget_at(t: jax.Array, H: int, K: int, k) -> jax.Array:
  """`row_budget` of the rows t (any shape, int32, maybe traced) -> same shape int32."""
  check_k(k)
  q = jnp.asarray(t, jnp.int32) + 1
  num = jnp.asarray(k, jnp.int32) * (H * K)
  floor, rem = num // q, num % q
  up = (2 * rem > q) | ((2 * rem == q) & (floor % 2 == 1))
  return jnp.clip(floor + up.astype(jnp.int32), 1, H * K)


def static_row_budget(T: int, H: int, K: int, k: int) -> np.ndarray:
  """`row_budget` for a Python-int k, in NumPy (static under jit)."""
  q = np.arange(1, T + 1, dtype=np.int64)
  floor, rem = divmod(np.int64(k) * (H * K), q)
  up = (2 * rem > q) | ((2 * rem == q) & (floor % 2 == 1))
  return np.clip(floor + up, 1, H * K).astype(np.int32)


def grouped_topk_mask(est_probs: jax.Array, k) -> jax.Array:
  """Compressed mask M̂, bool (N,H,T,K), from estimated probabilities Â (N,H,T,K).

  Per (n, t) the H·K cells of all heads compete for one budget c_t (`row_budget`); the c_t most
  probable are kept, ties going to the lower flat index h·K + b. Empty bins (`nonempty_bins`)
  rank after every real cell and are never kept. Not differentiable (gradients stop here).
  """
  check_k(k)
  N, H, T, K = est_probs.shape
  nonempty = nonempty_bins(T, K)  # (T, K)
  probs = jax.lax.stop_gradient(est_probs)
  probs = probs.astype(jnp.promote_types(probs.dtype, jnp.float32))
  score = jnp.where(nonempty[None, None], probs, -1.0)
  score = score.transpose(0, 2, 1, 3).reshape(N, T, H * K)
  cells = jax.lax.broadcasted_iota(jnp.int32, score.shape, 2)
  # The budget-th (score, cell) pair in (score descending, cell ascending) order is the row's
  # threshold; a cell is kept iff its pair comes at or before it.
  if isinstance(k, (int, np.integer)):
    thr, cell_thr = _thresholds_by_top_k(score, static_row_budget(T, H, K, int(k)))
  else:
    thr, cell_thr = _thresholds_by_sort(score, cells, row_budget(T, H, K, k))
  keep = (score > thr) | ((score == thr) & (cells <= cell_thr))
  keep = keep.reshape(N, T, H, K).transpose(0, 2, 1, 3)
  return keep & nonempty[None, None]


def grouped_topk_row(est_probs: jax.Array, t: jax.Array, k) -> jax.Array:
  """The compressed mask of one row per batch element (decoding): Â (N,H,K) of rows t (N,)
  int32 -> M̂ (N,H,K) bool, the same cells `grouped_topk_mask` keeps in row t of a sequence."""
  check_k(k)
  N, H, K = est_probs.shape
  starts, ends = row_bounds(t, K)
  nonempty = ends > starts  # (N, K)
  probs = jax.lax.stop_gradient(est_probs)
  probs = probs.astype(jnp.promote_types(probs.dtype, jnp.float32))
  score = jnp.where(nonempty[:, None], probs, -1.0).reshape(N, 1, H * K)
  cells = jax.lax.broadcasted_iota(jnp.int32, score.shape, 2)
  thr, cell_thr = _thresholds_by_sort(score, cells, budget_at(t, H, K, k)[:, None])
  keep = (score > thr) | ((score == thr) & (cells <= cell_thr))
  return keep.reshape(N, H, K) & nonempty[:, None]


def _thresholds_by_sort(score, cells, budget):
  """One sort of (-score, cell) pairs per row (any budget, traced k included); budget (T,) for
  every batch element or (N, T)."""
  N, T, _ = score.shape
  neg_sorted, cells_sorted = jax.lax.sort((-score, cells), dimension=2, num_keys=2)
  last = jnp.broadcast_to(jnp.broadcast_to(budget - 1, (N, T))[..., None], (N, T, 1))
  thr = -jnp.take_along_axis(neg_sorted, last, axis=2)
  return thr, jnp.take_along_axis(cells_sorted, last, axis=2)


def _thresholds_by_top_k(score, budget: np.ndarray):
  """`lax.top_k` per octave of rows [2^j - 1, 2^(j+1) - 1) with that octave's largest budget
  (static: k is a Python int), far less work than a full sort once c_t << H·K. top_k orders
  equal values by lower index first, the same order as the sort's (score, cell) keys."""
  N, T, _ = score.shape
  thr, cell_thr, start = [], [], 0
  while start < T:
    stop = min(T, 2 * start + 1)
    c = budget[start:stop]
    values, index = jax.lax.top_k(score[:, start:stop], int(c.max()))
    last = jnp.broadcast_to(jnp.asarray(c - 1, jnp.int32)[None, :, None], (N, stop - start, 1))
    thr.append(jnp.take_along_axis(values, last, axis=2))
    cell_thr.append(jnp.take_along_axis(index, last, axis=2).astype(jnp.int32))
    start = stop
  return jnp.concatenate(thr, axis=1), jnp.concatenate(cell_thr, axis=1)


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
