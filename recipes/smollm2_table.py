"""RESULTS.md's SmolLM2-135M tables (Markdown) from `recipes/smollm2_eval.sh`'s result files.

  python recipes/smollm2_table.py --results runs/smollm2/results [--run runs/smollm2]

Reads RESULTS/<row>.jsonl (eval.py lines) and RESULTS/coverage_val.json; prints the headline
table (dense vs the SEA student, ratio, target), the k sweep, the untrained and Performer rows,
the per-layer coverage against the oracle's, and (with --run) the recipe's stage wall times.
A row whose file is missing is printed as "not run".
"""
from __future__ import annotations

import argparse
import json
import os


def last_lines(results: str, name: str) -> list[dict]:
  path = os.path.join(results, f"{name}.jsonl")
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip().startswith("{")]


def ppl(line: dict) -> str:
  return f"{line['perplexity']:.3f}"


def headline(results: str) -> list[str]:
  rows = [("WikiText-2 validation, whole split (sea protocol)", "dense_val", "sea_val", 1.05),
          ("WikiText-2 test, whole split (gptq protocol)", "dense_test", "sea_test", 1.05),
          ("validation, T = 2,048 (first windows)", "dense_val_T2048", "sea_val_T2048", 1.10),
          ("validation, T = 4,096 (first windows)", "dense_val_T4096", "sea_val_T4096", 1.10),
          ("held-out books (first windows)", "dense_heldout", "sea_heldout", None)]
  out = ["| text | T | windows (tokens) | dense | SEA k = 64 | ratio | target |",
         "|---|---|---|---|---|---|---|"]
  for title, dense_name, sea_name, target in rows:
    dense, sea = last_lines(results, dense_name), last_lines(results, sea_name)
    tgt = f"≤ {target:.2f}x" if target else "—"
    if not dense or not sea:
      out.append(f"| {title} | | | {ppl(dense[-1]) if dense else 'not run'} | "
                 f"{ppl(sea[-1]) if sea else 'not run'} | | {tgt} |")
      continue
    d, s = dense[-1], sea[-1]
    ratio = s["perplexity"] / d["perplexity"]
    mark = "" if target is None else (" ✓" if ratio <= target else " ✗")
    out.append(f"| {title} | {d['seq_len']} | {d['windows']} ({d['windows'] * d['seq_len']:,}) | "
               f"{ppl(d)} | "
               f"{ppl(s)} | {ratio:.3f}x{mark} | {tgt} |")
  return out


def sweep(results: str) -> list[str]:
  dense = last_lines(results, "dense_sub")
  lines = last_lines(results, "sea_sweep")
  if not dense or not lines:
    return ["(k sweep not run)"]
  base = dense[-1]["perplexity"]
  out = [f"dense on the same {dense[-1]['windows']} windows: {base:.3f}", "",
         "| k | kept of T at the last row | SEA student | ratio to dense | tokens/s |",
         "|---|---|---|---|---|"]
  for line in lines:
    k, T = line["sea_k"], line["seq_len"]
    out.append(f"| {k} | {min(k, T) / T:.1%} | {ppl(line)} | {line['perplexity'] / base:.4f}x | "
               f"{line.get('tokens_per_s', 0):.0f} |")
  ks = [l["perplexity"] for l in lines]
  monotone = all(b <= a for a, b in zip(ks, ks[1:]))
  out.append("")
  out.append(f"monotone in k: {'yes' if monotone else 'no'}")
  return out


def baselines(results: str) -> list[str]:
  dense = last_lines(results, "dense_sub")
  out = ["| model (first windows) | perplexity | ratio to dense |", "|---|---|---|"]
  for title, name in (("dense SmolLM2-135M", "dense_sub"),
                      ("SEA student (k = 64)", None),
                      ("SEA on an oracle mask (the teacher's own top bins, k = 64, gates 1; "
                       "`recipes/oracle_perplexity.py`)", "oracle_sub"),
                      ("untrained SEA on the frozen base (K = 256, k = 64)", "untrained_sea"),
                      ("Performer on the frozen base (ReLU features; no parameters to train)",
                       "performer")):
    if name is None:
      lines = [l for l in last_lines(results, "sea_sweep") if l["sea_k"] == 64]
    else:
      lines = last_lines(results, name)
    if not lines:
      out.append(f"| {title} | not run | |")
      continue
    ratio = lines[-1]["perplexity"] / dense[-1]["perplexity"] if dense else float("nan")
    out.append(f"| {title} | {ppl(lines[-1])} | {ratio:.3f}x |")
  return out


def coverage(results: str) -> list[str]:
  path = os.path.join(results, "coverage_val.json")
  if not os.path.isfile(path):
    return ["(coverage not run)"]
  with open(path) as f:
    c = json.load(f)
  layers = sorted(int(n.split("_")[1]) for n in c
                  if n.startswith("coverage_") and n.split("_")[1].isdigit())
  out = [f"k = {c['sea_k']}, T = {c['seq_len']}, first {c['windows']} windows of validation; "
         f"mean over layers: learned {c['coverage_mean']:.3f}, oracle {c['oracle_mean']:.3f}", "",
         "| layer | " + " | ".join(str(i) for i in layers) + " |",
         "|---|" + "---|" * len(layers),
         "| learned | " + " | ".join(f"{c[f'coverage_{i}']:.2f}" for i in layers) + " |",
         "| oracle | " + " | ".join(f"{c[f'oracle_{i}']:.2f}" for i in layers) + " |"]
  for gate in ("s_prob", "s_mix"):
    if f"{gate}_{layers[0]}" in c:
      out.append(f"| {gate} | " + " | ".join(f"{c[f'{gate}_{i}']:.2f}" for i in layers) + " |")
  return out


def stages(run: str) -> list[str]:
  path = os.path.join(run, "stage_times.jsonl")
  if not os.path.isfile(path):
    return []
  out = ["| stage | wall seconds | ended | note |", "|---|---|---|---|"]
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      out.append(f"| {r['stage']} | {r['seconds']:,} | {r.get('ended', '')} | "
                 f"{r.get('note', '')} |")
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--results", required=True, help="smollm2_eval.sh's results folder")
  p.add_argument("--run", help="the recipe's folder (for stage_times.jsonl)")
  args = p.parse_args(argv)
  parts = [("Against the targets", headline(args.results)),
           ("The k sweep (T = 1,024)", sweep(args.results)),
           ("Beside it", baselines(args.results)),
           ("Coverage of the teacher's attention by the kept mask", coverage(args.results))]
  if args.run:
    parts.append(("Stage wall times", stages(args.run)))
  for title, lines in parts:
    print(f"### {title}\n")
    print("\n".join(lines))
    print()
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
