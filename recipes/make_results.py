"""Builds the results table (Markdown) and the dynamic-k plot (PNG) from the recipe's JSON lines.

  python recipes/make_results.py --results runs/small/results --trained-k 16 \
      --out-md runs/small/RESULTS.md --out-png runs/small/k_sweep.png
"""
from __future__ import annotations

import argparse
import json
import os


def read_lines(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip().startswith("{")]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--results", required=True, help="folder with teacher/untrained_sea/sea_sweep/performer .jsonl")
  p.add_argument("--trained-k", type=int, required=True)
  p.add_argument("--out-md", required=True)
  p.add_argument("--out-png", required=True)
  args = p.parse_args()
  r = {name: read_lines(os.path.join(args.results, f"{name}.jsonl"))
       for name in ("teacher", "untrained_sea", "sea_sweep", "performer")}
  teacher = r["teacher"][-1]["perplexity"]
  trained = next(l for l in r["sea_sweep"] if l["sea_k"] == args.trained_k)
  rows = [("dense teacher", r["teacher"][-1]),
          (f"SEA student, untrained (k={args.trained_k})", r["untrained_sea"][-1]),
          (f"SEA student, distilled (k={args.trained_k})", trained),
          ("Performer student, distilled", r["performer"][-1])]
  first = r["teacher"][-1]
  md = [f"WikiText-2 `{first['protocol']}` protocol ({first['split']} split), seq-len "
        f"{first['seq_len']}, {first['windows']} windows.", "",
        "| model | attention | perplexity | × teacher |", "|---|---|---|---|"]
  for name, line in rows:
    md.append(f"| {name} | {line['attention']} | {line['perplexity']:.3f} | "
              f"{line['perplexity'] / teacher:.3f} |")
  md += ["", "Dynamic k (the distilled SEA student, trained at "
         f"k={args.trained_k}):", "", "| k | perplexity | × teacher |", "|---|---|---|"]
  sweep = sorted(r["sea_sweep"], key=lambda l: l["sea_k"])
  for line in sweep:
    md.append(f"| {line['sea_k']} | {line['perplexity']:.3f} | {line['perplexity'] / teacher:.3f} |")
  with open(args.out_md, "w") as f:
    f.write("\n".join(md) + "\n")

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
  ks = [l["sea_k"] for l in sweep]
  ax.plot(ks, [l["perplexity"] for l in sweep], "o-", label="SEA student (distilled)")
  ax.axhline(teacher, color="k", ls="--", label="dense teacher")
  ax.axhline(r["performer"][-1]["perplexity"], color="tab:red", ls=":", label="Performer student")
  ax.axvline(args.trained_k, color="gray", lw=0.8, alpha=0.6)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("k (keys per query per head at inference)")
  ax.set_ylabel("WikiText-2 perplexity")
  ax.set_title(f"Dynamic k, trained at k={args.trained_k}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(args.out_png)
  print(args.out_md)


if __name__ == "__main__":
  main()
