"""Wall time of a jitted call, the one timing rule every benchmark here uses."""
from __future__ import annotations

import time


def best_time(fn, args, repeats: int) -> float:
  """Seconds of the fastest of `repeats` calls fn(*args), after one untimed call (the compile),
  each waited for with `jax.block_until_ready`."""
  import jax
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best
