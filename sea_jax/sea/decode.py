"""Incremental SEA and Performer decoding: the state a layer carries between new tokens, and
attention of one new query row over only the kept keys of a KV cache.

A decoder keeps, per SEA layer, beside the dense k, v cache (which the kept keys are gathered
from): the Performer branch's running sums S = Σ φk_j [P_j; v_j]ᵀ and z = Σ φk_j (O(m·d) work
per new token), the running sum of v for the causal mean, and the last `estimator.HISTORY_ROWS`
rows of each causal conv's input (the CNN's receptive field). A new row t then costs its
estimator row, one grouped top-k over its H·K cells and attention over its kept keys: the
cells' keys are laid out as one list of (head, key) pairs whose static length
`kept_key_bound` is the most keys any row t < L can keep (so no kept key is ever dropped),
and the softmax runs per head over that list: O(kept keys · d), not O(context · d).

Rows of a batch may have different lengths: the cache is left-padded (`attention.KVCache`), so
row n's key s (its own position) sits at slot offset_n + s. A prefill runs the full-sequence
forward on the rows shifted to right padding (`to_right_padding`), where SEA's causal
computation sees each row as it would alone.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sea_jax.ops.bins import row_bounds
from sea_jax.sea.topk import static_row_budget


@dataclasses.dataclass
class PerformerState:
  """A Performer layer's decode state: S (N,H,m,e), z (N,H,m), fp32."""
  S: jax.Array
  z: jax.Array


@dataclasses.dataclass
class SEAState:
  """A SEA layer's decode state: the Performer branch's sums (e = 2d: P's row and v), v_sum
  (N,Hkv,d) fp32 for the causal mean, the CNN history (h0, h1), each (N,2H,R,K/4), and with
  pooled keys (SEAConfig.pooled_keys) key_sums (N,Hkv,L+1,d) fp32, the prefix sums of the
  cached keys over slots (`ops.pooled_keys.key_prefix_sums`; padding slots add nothing)."""
  performer: PerformerState
  v_sum: jax.Array
  history: tuple[jax.Array, jax.Array]
  key_sums: jax.Array | None = None


jax.tree_util.register_dataclass(PerformerState, data_fields=["S", "z"], meta_fields=[])
jax.tree_util.register_dataclass(SEAState,
                                 data_fields=["performer", "v_sum", "history", "key_sums"],
                                 meta_fields=[])


def _roll_rows(x: jax.Array, shift: jax.Array) -> jax.Array:
  """x (N,C,T,...) with row n's axis 2 read from index (s + shift[n]) mod T."""
  T = x.shape[2]
  idx = (jnp.arange(T, dtype=jnp.int32)[None] + shift[:, None]) % T  # (N, T)
  return jnp.take_along_axis(x, idx.reshape(idx.shape[0], 1, T, *([1] * (x.ndim - 3))), axis=2)


def to_right_padding(x: jax.Array, offsets: jax.Array) -> jax.Array:
  """Rows left-padded by offsets (N,) along axis 2 of x (N,C,T,...) -> shifted to start at 0."""
  return _roll_rows(x, offsets)


def to_left_padding(x: jax.Array, offsets: jax.Array) -> jax.Array:
  """The inverse of `to_right_padding`."""
  return _roll_rows(x, -offsets)


def kept_key_bound(L: int, H: int, K: int, k: int) -> int:
  """The most (head, key) pairs any row t < L keeps (static; NumPy, exact).

  Row t keeps at most c_t non-empty cells of all heads (`static_row_budget`); its K bins have
  widths floor((t+1)/K) and, for (t+1) mod K of them, one more, the same in every head. The
  bound takes the c_t widest of the H·K cells.
  """
  t = np.arange(L, dtype=np.int64)
  budget = static_row_budget(L, H, K, k).astype(np.int64)
  narrow, wide = (t + 1) // K, H * ((t + 1) % K)
  keys = np.minimum(budget, wide) * (narrow + 1) + np.maximum(budget - wide, 0) * narrow
  return max(1, int(keys.max()))


def kept_pairs(mask: jax.Array, t: jax.Array, length: int):
  """The kept keys of one row per batch element as a list of `length` (head, key) pairs.

  mask (N,H,K) bool, the row's compressed mask; t (N,) its position -> head, key, valid, each
  (N, length) int32/bool, in (head, key) order; slots past the kept keys are invalid. length
  must be >= the row's kept keys (`kept_key_bound`).
  """
  N, H, K = mask.shape
  starts, ends = row_bounds(t, K)  # (N, K)
  widths = ends - starts
  count = jnp.where(mask, widths[:, None], 0).reshape(N, H * K)
  upto = jnp.cumsum(count, axis=-1)  # keys of cells 0..c
  slot = jnp.arange(length, dtype=jnp.int32)
  cell = jax.vmap(lambda u: jnp.searchsorted(u, slot, side="right"))(upto)
  cell = jnp.minimum(cell, H * K - 1).astype(jnp.int32)
  before = jnp.take_along_axis(upto - count, cell, axis=-1)
  key = jnp.take_along_axis(jnp.tile(starts, (1, H)), cell, axis=-1) + slot - before
  valid = slot[None] < upto[:, -1:]
  return cell // K, jnp.where(valid, key, 0), valid


def attend_kept(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, mask: jax.Array,
                t: jax.Array, offsets: jax.Array, length: int) -> jax.Array:
  """Softmax attention of one new query row over its kept keys only.

  q (N,H,d) scaled; k_cache, v_cache (N,Hkv,L,d), row n's key s at slot offsets[n] + s; mask
  (N,H,K) the row's compressed mask; t (N,) its position -> (N,H,d) in v's dtype (zeros for a
  head that keeps nothing), fp32 scores and sums. Work and memory O(length · d).
  """
  N, H, d = q.shape
  G = H // k_cache.shape[1]
  head, key, valid = kept_pairs(mask, t, length)
  n = jnp.arange(N, dtype=jnp.int32)[:, None]
  slot = jnp.clip(offsets[:, None] + key, 0, k_cache.shape[2] - 1)
  acc = jnp.result_type(jnp.float32, q.dtype, k_cache.dtype)
  k_kept = k_cache[n, head // G, slot].astype(acc)  # (N, length, d)
  v_kept = v_cache[n, head // G, slot].astype(acc)
  score = jnp.einsum("nld,nld->nl", q[n, head].astype(acc), k_kept)
  score = jnp.where(valid, score, -jnp.inf)
  segment = (n * H + head).reshape(-1)  # sorted: pairs come in (head, key) order
  top = jax.ops.segment_max(score.reshape(-1), segment, N * H, indices_are_sorted=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  w = jnp.where(valid, jnp.exp(score - top.reshape(N, H)[n, head]), 0.0)
  den = jax.ops.segment_sum(w.reshape(-1), segment, N * H, indices_are_sorted=True)
  num = jax.ops.segment_sum((w[..., None] * v_kept).reshape(-1, d), segment, N * H,
                            indices_are_sorted=True)
  out = jnp.where(den[:, None] > 0, num / jnp.where(den > 0, den, 1.0)[:, None], 0.0)
  return out.reshape(N, H, d).astype(v_cache.dtype)
