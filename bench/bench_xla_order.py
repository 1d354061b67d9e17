"""XLA's two CPU instruction orders side by side on the real pair: compiled temp and eval
tokens/s of SmolLM2-135M and its SEA student under the concurrency-optimized order (XLA's
default) and the memory-aware order (sea-jax's default, `sea_jax/xla_defaults.py`).

  python bench/bench_xla_order.py [--lengths 1024 2048 8192] [--student FOLDER] [--out-md FILE]

Each (model, T, order) runs `bench_real_pair`'s child in a fresh process with XLA_FLAGS naming
the order (one WikiText-2 test window, gptq protocol, best of --repeats after a compile).
Prints a Markdown table (device, versions, date) with the ratios memory/concurrency.
"""
from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import report_files  # noqa: E402
from bench.bench_real_pair import measure, pair_parser, parse_pair_args  # noqa: E402
from sea_jax.xla_defaults import CPU_SCHEDULER_FLAG  # noqa: E402

ORDERS = {"concurrency": "true", "memory": "false"}


def order_env(value: str) -> dict:
  """This environment with XLA_FLAGS naming the scheduler flag's value (other flags kept)."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith(CPU_SCHEDULER_FLAG)]
  return dict(os.environ, XLA_FLAGS=" ".join(kept + [f"{CPU_SCHEDULER_FLAG}={value}"]))


def main() -> None:
  args = parse_pair_args(pair_parser(__doc__, [1024, 2048, 8192]), __file__)
  rows = []
  for T in args.lengths:
    for name, path in (("dense", args.dense), ("SEA", args.student)):
      row = {"model": name, "T": T}
      for order, value in ORDERS.items():
        row[order] = measure(path, T, 1, args.repeats, env=order_env(value))
      rows.append(row)
      print(json.dumps(row), file=sys.stderr, flush=True)
  mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
  lines = [f"{report_files.device_line()}; one WikiText-2 test window (gptq) per row, best of "
           f"{args.repeats}.", "",
           "| model | T | temp MiB, concurrency | temp MiB, memory | memory/concurrency temp | "
           "tok/s, concurrency | tok/s, memory | memory/concurrency speed |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    c, m = r["concurrency"], r["memory"]
    if "error" in c or "error" in m:
      lines.append(f"| {r['model']} | {r['T']:,} | {c.get('error', '')} | "
                   f"{m.get('error', '')} |" + " |" * 4)
      continue
    lines.append(f"| {r['model']} | {r['T']:,} | {mib(c['temp_bytes'])} | "
                 f"{mib(m['temp_bytes'])} | {m['temp_bytes'] / c['temp_bytes']:.2f}x | "
                 f"{c['tokens_per_s']:.0f} | "
                 f"{m['tokens_per_s']:.0f} | {m['tokens_per_s'] / c['tokens_per_s']:.2f}x |")
  report_files.publish(__file__, "\n".join(lines), args.out_md, args.out_json, {"rows": rows})


if __name__ == "__main__":
  main()
