"""XLA flags sea-jax sets for every process that imports it (before JAX starts a backend).

`--xla_cpu_enable_concurrency_optimized_scheduler=false`: XLA's CPU compiler orders a program's
instructions to run independent work concurrently by default, and that order starts every
computation that needs no activations (the zero-filled output buffer of each layer's row-block
loop, the Performer's broadcast position rows) at the top of the program, so they stay alive
across the whole forward: the compiled temp of a 30-layer SEA model grows with its depth. The
memory-aware order keeps one layer's buffers alive at a time. Measured on SmolLM2-135M's SEA
student, one eval window of 2,048 tokens (2 CPU cores): 1,036 against 130 MiB of compiled temp
(dense SmolLM2: 172 against 102 MiB); tests/test_sea_memory.py checks that a SEA model's temp
does not grow with its depth. The cost is speed on short windows: at T = 1,024 the dense
model's eval step runs at 0.75-0.82x (the student's at 0.83-0.99x); from 2,048 up the two
orders are within run-to-run noise (BENCHMARKS.md, "The CPU scheduler").

The flag is CPU-only (GPU and TPU compilers ignore it). A value already in XLA_FLAGS wins, so
`XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=true` restores XLA's default. It
takes effect only if sea_jax is imported before the process's first JAX computation.
"""
from __future__ import annotations

import os

CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def apply_defaults(environ=os.environ) -> None:
  """Appends sea-jax's XLA flags to environ["XLA_FLAGS"] unless it already names them."""
  flags = environ.get("XLA_FLAGS", "")
  if CPU_SCHEDULER_FLAG not in flags:
    environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}=false".strip()
