"""Grouped top-k over heads (SEA_SPEC §1.4) and the dense expansion of a compressed mask (§1.5)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sea_jax.ops.bins import nonempty_bins, row_bounds


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
  if isinstance(k, (int, np.integer)):
    keep = _keep_by_octave(score, static_row_budget(T, H, K, int(k)))
  else:
    keep = _keep_by_select(score, jnp.broadcast_to(row_budget(T, H, K, k), (N, T)))
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
  keep = _keep_by_select(score, budget_at(t, H, K, k)[:, None])
  return keep.reshape(N, H, K) & nonempty[:, None]


def _ordered_key(x: jax.Array) -> jax.Array:
  """Unsigned keys in the order of the float values x (x < y iff key(x) < key(y), and -0.0
  and 0.0 share one key as in `lax.sort`; no NaNs): uint32 for float32 and narrower floats,
  uint64 for float64."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  utype = jnp.uint64 if x.dtype == jnp.float64 else jnp.uint32
  bits = jax.lax.bitcast_convert_type(x, utype)
  top = utype(1) << utype(8 * x.dtype.itemsize - 1)
  return jnp.where(x == 0, top, jnp.where(bits >= top, ~bits, bits | top))


@jax.jit  # eager calls (tests, pictures) would otherwise compile the bit loop on every call
def _keep_by_select(score: jax.Array, budget: jax.Array) -> jax.Array:
  """bool (N,T,n): the budget[n,t] largest scores of each row, equal scores going to the lower
  index, i.e. the first c_t of the (score descending, index ascending) order: exactly what a
  sort keeps, for any budget (traced k included). score (N,T,n) float, budget (N,T) int32.

  A radix select instead of a sort: the c_t-th largest key is built bit by bit from the top
  (one compare-and-count pass over the row per key bit), then the cells above it are kept with
  the first (c_t - #above) cells equal to it. About 7x faster than `lax.sort` on CPU at the
  small recipe's (8, 512, 512).
  """
  key = _ordered_key(score)
  c = budget[..., None]
  bits = 8 * key.dtype.itemsize

  def bit(i, ans):  # set bit (bits - 1 - i) if at least c keys are >= the candidate
    cand = ans | (jnp.ones((), key.dtype) << (bits - 1 - i).astype(key.dtype))
    enough = jnp.sum(key >= cand, axis=-1, keepdims=True, dtype=jnp.int32) >= c
    return jnp.where(enough, cand, ans)

  thr = jax.lax.fori_loop(0, bits, bit, jnp.zeros(c.shape, key.dtype))
  above = key > thr
  tie = key == thr
  need = c - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)
  return above | (tie & (jnp.cumsum(tie, axis=-1, dtype=jnp.int32) <= need))


# An octave of rows whose largest budget is at most this fraction of the row's cells takes
# `lax.top_k`; a wider one the radix select, cheaper there (bench/bench_sparse_auto.py).
TOP_K_MAX_FRACTION = 1 / 16


def _keep_by_octave(score: jax.Array, budget: np.ndarray) -> jax.Array:
  """`_keep_by_select` for a static budget (k a Python int), an octave of rows
  [2^j - 1, 2^(j+1) - 1) at a time: `lax.top_k` with the octave's largest budget where budgets
  are small next to the n cells (far less work than a full selection), else the radix select.
  top_k orders equal values by lower index first, the same order as the select's."""
  N, T, n = score.shape
  parts, start = [], 0
  while start < T:
    stop = min(T, 2 * start + 1)
    rows, c = score[:, start:stop], budget[start:stop]
    if c.max() > TOP_K_MAX_FRACTION * n:
      parts.append(_keep_by_select(rows, jnp.broadcast_to(jnp.asarray(c), (N, stop - start))))
    else:
      # The c-th (score, cell) pair in (score descending, cell ascending) order is the row's
      # threshold; a cell is kept iff its pair comes at or before it.
      values, index = jax.lax.top_k(rows, int(c.max()))
      last = jnp.broadcast_to(jnp.asarray(c - 1, jnp.int32)[None, :, None], (N, stop - start, 1))
      thr = jnp.take_along_axis(values, last, axis=2)
      cell_thr = jnp.take_along_axis(index, last, axis=2).astype(jnp.int32)
      cells = jax.lax.broadcasted_iota(jnp.int32, rows.shape, 2)
      parts.append((rows > thr) | ((rows == thr) & (cells <= cell_thr)))
    start = stop
  return jnp.concatenate(parts, axis=1)
