"""The pooled-key stage alone (`ops.pooled_keys.pooled_key_logits`) at SmolLM2-135M's shapes.

Forward ms (best of --iters after the compile) and compiled temp MiB per T, on random q and k
(9 query heads on 3 kv heads, head dim 64, K = 256); with --against COMMIT the same op as that
commit had it, loaded from git, timed side by side in the same run (and its output compared):

  python bench/bench_pooled_keys.py --lengths 1024 2048 8192 --against 610fc42
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.timing import compiled_time_and_temp  # noqa: E402
from sea_jax.ops.pooled_keys import pooled_key_logits  # noqa: E402

OP_FILE = "sea_jax/ops/pooled_keys.py"


def op_at(commit: str):
  """pooled_key_logits as `commit` had it (its module loaded from `git show`)."""
  root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
  source = subprocess.run(["git", "show", f"{commit}:{OP_FILE}"], cwd=root, check=True,
                          capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(), "pooled_keys_at_commit.py")
  with open(path, "w") as f:
    f.write(source)
  spec = importlib.util.spec_from_file_location("pooled_keys_at_commit", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.pooled_key_logits


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 8192])
  p.add_argument("--K", type=int, default=256, help="bins per row")
  p.add_argument("--iters", type=int, default=3, help="timed calls per figure (best kept)")
  p.add_argument("--against", default=None, help="a commit whose op is timed beside this one")
  args = p.parse_args(argv)
  ops = {"this tree": pooled_key_logits}
  if args.against:
    ops[args.against] = op_at(args.against)
  print(f"| T | {' | '.join(f'{name} ms | {name} temp MiB' for name in ops)} |"
        + (" speed-up | max abs diff |" if args.against else ""))
  print("|---" * (1 + 2 * len(ops) + (2 if args.against else 0)) + "|")
  for T in args.lengths:
    rng = np.random.default_rng(T)
    q = jnp.asarray(rng.standard_normal((1, 9, T, 64)) * 0.125, jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 3, T, 64)) + 0.3, jnp.float32)
    cells, outs, times = [], [], []
    for op in ops.values():
      f = jax.jit(lambda q, k, op=op: op(q, k, args.K))
      seconds, temp = compiled_time_and_temp(f, (q, k), args.iters)
      times.append(seconds * 1e3)
      outs.append(np.asarray(f(q, k)))
      cells += [f"{times[-1]:,.1f}", f"{temp / 2**20:,.0f}"]
    if args.against:
      cells += [f"{times[1] / times[0]:.2f}x", f"{np.max(np.abs(outs[0] - outs[1])):.1e}"]
    print(f"| {T:,} | " + " | ".join(cells) + " |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
