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


def compiled_time_and_temp(fn, args, repeats: int) -> tuple[float, int]:
  """(`best_time` seconds, XLA's compiled temp bytes) of the jitted `fn` on `args`, from one
  compile: the executable that is timed is the one whose memory is read."""
  compiled = fn.lower(*args).compile()
  return best_time(compiled, args, repeats), compiled.memory_analysis().temp_size_in_bytes
