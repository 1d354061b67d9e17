"""Which keys a compressed column stands for (SEA_SPEC §1.3), in exact integer arithmetic.

Row t's K bins evenly cover its visible prefix [0, t] (t + 1 keys):
  bin b covers keys [R(b (t+1) / K), R((b+1) (t+1) / K)) with R(x) = floor(x + 0.5),
equivalently bin_t(s) = floor((s + 0.5) K / (t + 1) - 1e-4) for s <= t.
Both are computed here with integers, so no rounding mode can move a key to another bin.
For t + 1 < K some bins are empty (start == end).
"""
from __future__ import annotations

import jax.numpy as jnp


def bin_index(t, s, K: int):
  """bin_t(s) for s <= t (int32, broadcasting t and s); meaningless for s > t.

  bin = ceil((2s + 1) K / (2 (t + 1))) - 1 = floor(((2s + 1) K - 1) / (2 (t + 1))).
  CPUs have no vector integer division, so the quotient is estimated in float32 (off by at
  most one) and then corrected with exact integer products: 3-6x faster than `//` over a
  block of rows x keys, and still exact.
  """
  t = jnp.asarray(t, jnp.int32)
  s = jnp.asarray(s, jnp.int32)
  num, den = (2 * s + 1) * K - 1, 2 * (t + 1)
  q = jnp.floor(num.astype(jnp.float32) / den.astype(jnp.float32)).astype(jnp.int32)
  # The remainder of the estimate lies in [-den, 2 den): int32 wraparound in q * den cancels
  # in the difference, so it is exact wherever num itself fits int32.
  rem = num - q * den
  return q + (rem >= den).astype(jnp.int32) - (rem < 0).astype(jnp.int32)


def bin_start(t, b, K: int):
  """First key of bin b in row t: floor(b (t + 1) / K + 0.5) = floor((2 b (t + 1) + K) / (2K))."""
  t = jnp.asarray(t, jnp.int32)
  b = jnp.asarray(b, jnp.int32)
  return (2 * b * (t + 1) + K) // (2 * K)


def bin_bounds(T: int, K: int):
  """(starts, ends), each (T, K) int32: bin b of row t covers keys [starts[t,b], ends[t,b])."""
  return row_bounds(jnp.arange(T, dtype=jnp.int32), K)


def row_bounds(t, K: int):
  """`bin_bounds` of the rows t (any shape S, int32, maybe traced): (starts, ends) (*S, K)."""
  t = jnp.asarray(t, jnp.int32)[..., None]
  b = jnp.arange(K, dtype=jnp.int32)
  return bin_start(t, b, K), bin_start(t, b + 1, K)


def nonempty_bins(T: int, K: int):
  """(T, K) bool: bin b of row t covers at least one key."""
  starts, ends = bin_bounds(T, K)
  return ends > starts
