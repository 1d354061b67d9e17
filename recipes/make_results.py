"""Tables (Markdown) and plots (PNG) of the small recipe, from its JSON lines and metrics.

  python recipes/make_results.py --run runs/small --trained-k 32 --out runs/small/report

Reads RUN/results/<model>_<text>.jsonl (eval.py lines; texts: heldout, wikitext) and
RUN/{teacher,sea,performer}/metrics.jsonl; writes OUT/results.md (perplexity tables, the
dynamic-k sweep, per-layer coverage and gates at the end of distillation, stage wall times and
tokens/s), OUT/k_sweep.png and OUT/distillation.png (every loss term, s_prob, s_mix and the
kept mask's coverage of the teacher's attention per layer over training).
"""
from __future__ import annotations

import argparse
import json
import os

TEXTS = {"heldout": "held-out books", "wikitext": "WikiText-2 validation"}
MODELS = (("teacher", "dense teacher"),
          ("untrained_performer", "teacher, attention replaced by an untrained Performer"),
          ("untrained_sea", "teacher, attention replaced by untrained SEA"),
          ("sea", "SEA student, distilled"),
          ("performer", "Performer student, distilled"))


def read_lines(path: str) -> list[dict]:
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip().startswith("{")]


def _k_train(run: str) -> str | None:
  """The SEA student's --sea-k-train (dynamic-k training), or None."""
  path = os.path.join(run, "sea", "train_config.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f).get("args", {}).get("sea_k_train")


def _perplexity_tables(results: str, trained_k: int, k_train: str | None = None
                       ) -> tuple[list[str], dict]:
  md, sweeps = [], {}
  for text, title in TEXTS.items():
    r = {name: read_lines(os.path.join(results, f"{name}_{text}.jsonl"))
         for name in ("teacher", "untrained_performer", "untrained_sea", "sea_sweep",
                      "performer")}
    if not r["teacher"]:
      continue
    teacher = r["teacher"][-1]
    sweep = sorted(r["sea_sweep"], key=lambda l: l["sea_k"])
    sweeps[text] = (teacher, sweep, r["performer"][-1] if r["performer"] else None)
    trained = next((l for l in sweep if l["sea_k"] == trained_k), None)
    lines = {"teacher": teacher, "sea": trained,
             "untrained_performer": (r["untrained_performer"] or [None])[-1],
             "untrained_sea": (r["untrained_sea"] or [None])[-1],
             "performer": (r["performer"] or [None])[-1]}
    where = (f"`{teacher['text']}`" if teacher.get("text") else
             f"`{teacher['protocol']}` protocol ({teacher['split']} split)")
    md += [f"**{title}** ({where}, seq-len {teacher['seq_len']}, first {teacher['windows']} "
           f"windows, {teacher['windows'] * teacher['seq_len']:,} tokens):", "",
           "| model | attention | k | perplexity | × teacher |", "|---|---|---|---|---|"]
    for key, name in MODELS:
      line = lines[key]
      if line is None:
        continue
      k = line.get("sea_k") if line["attention"] == "sea" else "–"
      md.append(f"| {name} | {line['attention']} | {k} | {line['perplexity']:.2f} | "
                f"{line['perplexity'] / teacher['perplexity']:.3f} |")
    how = (f"trained at k drawn from [{k_train.replace(',', ', ')}], default k = {trained_k}"
           if k_train else f"trained at k = {trained_k}")
    md += ["", f"Dynamic k (the SEA student, {how}; k = "
           f"{teacher['seq_len']} keeps every visible key):", "",
           "| k | " + " | ".join(str(l["sea_k"]) for l in sweep) + " |",
           "|---|" + "---|" * len(sweep),
           "| perplexity | " + " | ".join(f"{l['perplexity']:.2f}" for l in sweep) + " |",
           "| × teacher | " + " | ".join(f"{l['perplexity'] / teacher['perplexity']:.3f}"
                                        for l in sweep) + " |", ""]
  return md, sweeps


def _stage_table(run: str) -> list[str]:
  """Wall time per recipe stage (summed over its runs, OUT/stage_times.jsonl), and for the
  training stages steps, tokens and the steady-state rate (median of the logged tokens/s)."""
  walls: dict[str, list[int]] = {}
  for line in read_lines(os.path.join(run, "stage_times.jsonl")):
    walls.setdefault(line["stage"], []).append(line["seconds"])
  md = ["| stage | wall time | runs | steps | tokens | tokens/s (median of logged) |",
        "|---|---|---|---|---|---|"]
  for stage in ("corpus", "teacher", "sea", "performer", "perplexity", "pictures"):
    wall = f"{sum(walls[stage]) / 60:.1f} min" if stage in walls else "-"
    runs = str(len(walls.get(stage, []))) or "-"
    steps = tokens = rate = "-"
    m = read_lines(os.path.join(run, stage, "metrics.jsonl"))
    cfg_path = os.path.join(run, stage, "train_config.json")
    if m and os.path.isfile(cfg_path):
      with open(cfg_path) as f:
        cfg = json.load(f)
      steps = str(m[-1]["step"])
      tokens = f"{m[-1]['step'] * cfg['args']['batch_size'] * cfg['args']['seq_len']:,}"
      rates = sorted(r["tokens_per_s"] for r in m)
      rate = f"{rates[len(rates) // 2]:,.0f}"
    if stage in walls or steps != "-":
      md.append(f"| {stage} | {wall} | {runs} | {steps} | {tokens} | {rate} |")
  if walls:
    total = sum(sum(v) for v in walls.values())
    md.append(f"| all | {total / 60:.1f} min | | | | |")
  return md


def _final_layers(run: str) -> list[str]:
  m = read_lines(os.path.join(run, "sea", "metrics.jsonl"))
  if not m:
    return []
  layers = sorted({int(k.rsplit("_", 1)[1]) for k in m[0] if k.startswith("coverage_")})
  tail = m[-10:]  # the last logged steps, averaged
  avg = lambda key: sum(r[key] for r in tail) / len(tail)
  first = m[0]
  held = {}
  path = os.path.join(run, "results", "coverage_heldout.json")
  if os.path.isfile(path):  # recipes/coverage.py at the default k on the held-out books
    with open(path) as f:
      held = json.load(f)
  col = f"coverage at k = {held['sea_k']}, held-out |" if held else ""
  md = [f"| layer | coverage in training (start → end) | {col} s_prob (start → end) | "
        "s_mix (start → end) |", "|---|---|---|---|" + ("---|" if held else "")]
  for i in layers:
    cell = f" {held[f'coverage_{i}']:.3f} |" if held else ""
    md.append(f"| {i} | {first[f'coverage_{i}']:.3f} → {avg(f'coverage_{i}'):.3f} |{cell} "
              f"{first[f's_prob_{i}']:.3f} → {avg(f's_prob_{i}'):.3f} | "
              f"{first[f's_mix_{i}']:.3f} → {avg(f's_mix_{i}'):.3f} |")
  return md


def _plots(run: str, sweeps: dict, trained_k: int, out: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  if sweeps:
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5.2 * len(sweeps), 3.8), dpi=110)
    axes = [axes] if len(sweeps) == 1 else axes
    for ax, (text, (teacher, sweep, performer)) in zip(axes, sweeps.items()):
      ks = [l["sea_k"] for l in sweep]
      ax.plot(ks, [l["perplexity"] / teacher["perplexity"] for l in sweep], "o-",
              label="SEA student")
      ax.axhline(1.0, color="k", ls="--", label="dense teacher")
      if performer:
        ax.axhline(performer["perplexity"] / teacher["perplexity"], color="tab:red", ls=":",
                   label="Performer student")
      ax.axvline(trained_k, color="gray", lw=0.8, alpha=0.6)
      ax.set_xscale("log", base=2)
      ax.set_xlabel("k (keys per query per head at inference)")
      ax.set_ylabel("perplexity / teacher's")
      ax.set_title(TEXTS[text])
      ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "k_sweep.png"))
    plt.close(fig)
  m = read_lines(os.path.join(run, "sea", "metrics.jsonl"))
  p = read_lines(os.path.join(run, "performer", "metrics.jsonl"))
  if not m:
    return
  steps = [r["step"] for r in m]
  layers = sorted({int(k.rsplit("_", 1)[1]) for k in m[0] if k.startswith("coverage_")})
  fig, axes = plt.subplots(2, 3, figsize=(14, 7), dpi=100)
  for ax, term in zip(axes[0], (("ce", "kl", "hidden"), ("approx", "prob", "context"),
                                ("total",))):
    for name in term:
      ax.plot(steps, [r[name] for r in m], label=f"SEA {name}")
      if p and name in p[0]:
        ax.plot([r["step"] for r in p], [r[name] for r in p], ls=":",
                label=f"Performer {name}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
  for ax, key, title in zip(axes[1], ("coverage", "s_prob", "s_mix"),
                            ("teacher attention mass on kept keys", "s_prob", "s_mix")):
    for i in layers:
      ax.plot(steps, [r[f"{key}_{i}"] for r in m], label=f"layer {i}")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
  fig.suptitle("SEA distillation (loss terms; dotted: the Performer student)")
  fig.tight_layout()
  fig.savefig(os.path.join(out, "distillation.png"))
  plt.close(fig)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run", required=True, help="the recipe's output folder (OUT)")
  p.add_argument("--trained-k", type=int, required=True, help="k the SEA student trained at")
  p.add_argument("--out", required=True, help="report folder")
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  md, sweeps = _perplexity_tables(os.path.join(args.run, "results"), args.trained_k,
                                  _k_train(args.run))
  md += ["Per layer, SEA student, first logged step → mean of the last ten logged steps:", ""]
  md += _final_layers(args.run) + ["", "Stages:", ""] + _stage_table(args.run)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write("\n".join(md) + "\n")
  _plots(args.run, sweeps, args.trained_k, args.out)
  print(os.path.join(args.out, "results.md"))


if __name__ == "__main__":
  main()
