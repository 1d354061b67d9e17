"""The real pair end to end on this machine: SmolLM2-135M dense against its SEA student, at each
window length, side by side in one run.

  python bench/bench_real_pair.py [--student FOLDER] [--lengths 1024 2048 4096 8192]
                                  [--programs layerwise whole] [--windows 1]
                                  [--out-md FILE] [--out-json FILE]

Per (model, T), in a fresh process each (so the host's peak RSS is that run's alone): the
forward + per-window loss as `eval.py` runs it (`--programs layerwise`: the embedding, one
compiled layer run for every layer, the head; `whole`: the model as one jitted program) on
WikiText-2 test windows (gptq protocol): tokens/s (best of --repeats timed passes over
--windows windows, after a compile), XLA's compiled temp bytes
(`memory_analysis().temp_size_in_bytes`; layerwise: the largest of its programs), the
compile's seconds, the process's peak RSS, and the perplexity of those windows, so speed is
never read without quality. Ratios SEA/dense come from the same run. Prints a Markdown table
(device, versions, date).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import report_files  # noqa: E402

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
from sea_jax import checkpoint, data, evaluate
from sea_jax import sharding as shd
path, T, windows, repeats, program = (sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                      int(sys.argv[5]), sys.argv[6])
mesh = shd.make_mesh(None)
model = checkpoint.load_pretrained(path, mesh)
tokens = data.protocol_tokens(checkpoint.model_tokenizer(path), "gptq")
wins = data.eval_windows(tokens, T)[:windows]
x = jnp.asarray(wins[:1])
start = time.perf_counter()
if program == "layerwise":  # what eval.py runs
  step = evaluate.LayerwiseLosses(model, mesh, None)
  step.compile(x, None)
  run, temp = (lambda w: step(w, None)), step.temp_bytes()
else:  # the whole model as one program
  from flax import nnx
  graph, state = nnx.split(model)
  compiled = jax.jit(lambda s, x: evaluate.window_losses(nnx.merge(graph, s), x, None)).lower(
      state, x).compile()
  run, temp = (lambda w: compiled(state, w)), compiled.memory_analysis().temp_size_in_bytes
compile_s = time.perf_counter() - start
losses = [float(l) for w in wins for l in np.asarray(run(jnp.asarray(w[None])))]
best = None
for _ in range(repeats):
  start = time.perf_counter()
  for w in wins:
    jax.block_until_ready(run(jnp.asarray(w[None])))
  took = time.perf_counter() - start
  best = took if best is None else min(best, took)
print(json.dumps({"tokens_per_s": wins.size / best, "temp_bytes": int(temp),
                  "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "compile_s": compile_s, "perplexity": float(np.exp(np.mean(losses))),
                  "windows": int(len(wins))}))
"""

PROGRAMS = ("layerwise", "whole")  # evaluate.LayerwiseLosses (eval.py's), or one jitted program


def measure(path: str, T: int, windows: int, repeats: int, env: dict | None = None,
            program: str = "layerwise") -> dict:
  """One (model, T) in a fresh process (env: its environment, default this one's)."""
  proc = subprocess.run([sys.executable, "-c", CHILD, REPO, path, str(T), str(windows),
                         str(repeats), program], capture_output=True, text=True, cwd=REPO,
                        env=env)
  if proc.returncode != 0:
    return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def pair_parser(doc: str, lengths: list[int]) -> argparse.ArgumentParser:
  """A real-pair bench's parser: --dense, --student, --lengths, --repeats, --out-md,
  --out-json (`parse_pair_args` reads it)."""
  p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
  p.add_argument("--dense", default="smollm2-135m", help="the dense model (default: the GGUF)")
  p.add_argument("--student", help="the SEA student folder (default: the bundled student, "
                 "sea_jax/assets/models/smollm2-135m-sea.tar.xz, unpacked)")
  p.add_argument("--lengths", type=int, nargs="+", default=lengths)
  p.add_argument("--repeats", type=int, default=2, help="timed passes; the best is kept")
  p.add_argument("--out-md", help="also write the table here")
  p.add_argument("--out-json", help="also write the rows here")
  return p


def parse_pair_args(p: argparse.ArgumentParser, script: str) -> argparse.Namespace:
  """Parses `pair_parser`'s flags, claims the output files for `script` before any work, and
  unpacks the bundled student when --student is not given."""
  args = p.parse_args()
  report_files.claim(script, args.out_md, args.out_json)
  if args.student is None:
    from sea_jax import bundle
    args.student = bundle.student_folder()
  return args


def main() -> None:
  p = pair_parser(__doc__, [1024, 2048, 4096, 8192])
  p.add_argument("--windows", type=int, default=1, help="timed windows per (model, T)")
  p.add_argument("--programs", nargs="+", choices=PROGRAMS, default=["layerwise"],
                 help="how the eval step is compiled: layerwise (eval.py's: the embedding, "
                 "one layer for every layer, the head) and/or whole (the model as one program); "
                 "each gets its rows (default: layerwise)")
  args = parse_pair_args(p, __file__)
  rows = []
  for T in args.lengths:
    for program in args.programs:
      dense = measure(args.dense, T, args.windows, args.repeats, program=program)
      sea = measure(args.student, T, args.windows, args.repeats, program=program)
      rows.append({"T": T, "program": program, "dense": dense, "sea": sea})
      print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
  lines = [f"{report_files.device_line()}; {args.windows} window(s) of WikiText-2 test "
           f"(gptq) per T, best of {args.repeats}.", "",
           "| T | program | dense tok/s | SEA tok/s | SEA/dense speed | dense temp MiB | "
           "SEA temp MiB | SEA/dense temp | dense RSS MiB | SEA RSS MiB | SEA/dense RSS | "
           "dense compile s | SEA compile s | dense ppl | SEA ppl |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    d, s = r["dense"], r["sea"]
    if "error" in d or "error" in s:
      lines.append(f"| {r['T']} | {r['program']} | {d.get('error', '')} | "
                   f"{s.get('error', '')} |" + " |" * 11)
      continue
    lines.append(
        f"| {r['T']:,} | {r['program']} | {d['tokens_per_s']:.0f} | {s['tokens_per_s']:.0f} | "
        f"{s['tokens_per_s'] / d['tokens_per_s']:.2f}x | {mib(d['temp_bytes'])} | "
        f"{mib(s['temp_bytes'])} | {s['temp_bytes'] / d['temp_bytes']:.2f}x | "
        f"{mib(d['rss_bytes'])} | {mib(s['rss_bytes'])} | "
        f"{s['rss_bytes'] / d['rss_bytes']:.2f}x | {d['compile_s']:.1f} | {s['compile_s']:.1f} | "
        f"{d['perplexity']:.2f} | {s['perplexity']:.2f} |")
  report_files.publish(__file__, "\n".join(lines), args.out_md, args.out_json, {"rows": rows})


if __name__ == "__main__":
  main()
