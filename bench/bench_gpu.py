"""Every accelerator figure in one call: correctness of the Pallas kernel on the device, sparse
attention against dense (XLA, cuDNN), and whole-model eval tokens/s, within a time budget.

  python bench/bench_gpu.py --out-dir $OUT [--budget-s 420]          # on the GPU
  python bench/bench_gpu.py --quick --out-dir /tmp/q                  # CPU: proves it runs

Sections, in order of priority (a section that would start past the budget is skipped, and the
Markdown is rewritten after every row, so a run cut short still leaves its figures):
  1. correctness: Pallas kernel vs the float32 dense reference, forward and gradients, bf16
     inputs, relative L2 error (the kernels' first run on real hardware);
  2. attention at T = 2k, 8k, then 4k, 16k, 32k: Pallas, pure-JAX sparse ("xla": tile list),
     dense XLA and cuDNN (`jax.nn.dot_product_attention`), forward and forward+backward,
     median ms, compiled temp + output MiB, visited fraction of causal key blocks;
     opt-125m head shapes (H = 12, d = 64, K = 256, k = 64), bf16, "sea" (coherent) masks;
  3. whole-model eval: opt-125m-shaped random model, bf16, T = 2048, batch 8, mean NLL of
     the logits: dense (`dense_impl="auto"`) vs SEA with each sparse_impl.
Writes OUT_DIR/bench_gpu.md and OUT_DIR/bench_gpu.json. On the lent GPU machines run it with the
image's own jax and flax (a carried flax 0.12.8 does not import under jax 0.11.2).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import report_files  # noqa: E402
from bench.bench_sparse_attention import _fmt_mib, _fmt_ms, dense_fn, make_mask, measure  # noqa: E402


class Report:
  """Rows per section, rewritten to Markdown and JSON after every addition."""

  def __init__(self, out_dir: str, header: list[str]):
    self.out_dir, self.header, self.sections = out_dir, header, {}
    # new, empty, or a folder this benchmark wrote before; nothing else is overwritten
    report_files.claim_folder(__file__, out_dir, "--out-dir",
                              also_ours=("bench_gpu.md", "bench_gpu.json"))

  def add(self, section: str, columns: list[str], row: list) -> None:
    self.sections.setdefault(section, (columns, []))[1].append([str(x) for x in row])
    print(f"[{section}] " + " | ".join(str(x) for x in row), flush=True)
    self.write()

  def note(self, section: str, text: str) -> None:
    self.sections.setdefault(section, ([], []))[1].append(text)
    print(f"[{section}] {text}", flush=True)
    self.write()

  def write(self) -> None:
    lines = list(self.header) + [""]
    for name, (columns, rows) in self.sections.items():
      lines += [f"## {name}", ""]
      table = [r for r in rows if isinstance(r, list)]
      if table:
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(r) + " |" for r in table]
      lines += [""] + [f"- {r}" for r in rows if isinstance(r, str)] + [""]
    with open(os.path.join(self.out_dir, "bench_gpu.md"), "w") as f:
      f.write("\n".join(lines))
    with open(os.path.join(self.out_dir, "bench_gpu.json"), "w") as f:
      json.dump({k: {"columns": c, "rows": r} for k, (c, r) in self.sections.items()}, f, indent=1)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def correctness(report: Report, args) -> None:
  from pallas_kernels import sparse_attention as pallas_sparse
  from pallas_kernels import sparse_attention_reference
  T, H, d = args.check_T, args.heads, args.head_dim
  keys = jax.random.split(jax.random.PRNGKey(1), 5)
  shape = (1, H, T, d)
  q = (jax.random.normal(keys[0], shape) * d**-0.5).astype(jnp.bfloat16)
  k = jax.random.normal(keys[1], shape).astype(jnp.bfloat16)
  v = jax.random.normal(keys[2], shape).astype(jnp.bfloat16)
  g = jax.random.normal(keys[3], shape, jnp.float32)
  cm = make_mask(keys[4], "sea", 1, H, T, args.K, args.k)
  cols = ["implementation", "out", "dq", "dk", "dv"]

  def grads(fn, *xs):
    out, vjp = jax.vjp(fn, *xs)
    return (out, *vjp(g.astype(out.dtype)))

  f32 = lambda x: x.astype(jnp.float32)
  ref = jax.jit(lambda q, k, v: grads(lambda q, k, v: sparse_attention_reference(q, k, v, cm),
                                      q, k, v))(f32(q), f32(k), f32(v))
  from sea_jax.ops import sparse_attention as xla_sparse
  for name, fn in [("pallas (bf16)", lambda q, k, v: pallas_sparse(q, k, v, cm,
                                                                   interpret=args.interpret)),
                   ("jax-sparse (bf16)", lambda q, k, v: xla_sparse(q, k, v, cm))]:
    try:
      got = jax.jit(lambda q, k, v: grads(fn, q, k, v))(q, k, v)
      report.add("1. correctness", cols, [name] + [f"{rel_err(a, b):.2e}" for a, b in zip(got, ref)])
    except Exception as e:  # noqa: BLE001 (report the failure, go on with the rest)
      report.note("1. correctness", f"{name} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
  report.note("1. correctness", f"T = {T}, H = {H}, d = {d}, K = {args.K}, k = {args.k}; "
              "relative L2 error against sparse_attention_reference in float32 "
              "(bf16 inputs upcast); bf16 rounding of the output alone is ~3e-3")


def attention_methods(args) -> dict:
  from pallas_kernels import sparse_attention as pallas_sparse
  from sea_jax.ops import sparse_attention as xla_sparse
  out = {"pallas": lambda q, k, v, cm: pallas_sparse(q, k, v, cm, interpret=args.interpret),
         "jax-sparse": lambda q, k, v, cm: xla_sparse(q, k, v, cm),
         "dense-xla": dense_fn("xla")}
  if jax.default_backend() == "gpu":
    out["dense-cudnn"] = dense_fn("cudnn")
  return out


def attention_rows(report: Report, args, T: int, deadline: float) -> None:
  from pallas_kernels import build_block_map
  H, d = args.heads, args.head_dim
  key = jax.random.PRNGKey(T)
  kq, kk, kv, kg, km = jax.random.split(key, 5)
  shape = (1, H, T, d)
  q = (jax.random.normal(kq, shape) * d**-0.5).astype(jnp.bfloat16)
  k = jax.random.normal(kk, shape).astype(jnp.bfloat16)
  v = jax.random.normal(kv, shape).astype(jnp.bfloat16)
  g = jax.random.normal(kg, shape).astype(jnp.bfloat16)
  cm = make_mask(km, "sea", 1, H, T, args.K, args.k)
  bmap = build_block_map(cm, block_q=64, block_k=64)
  visited = float(bmap.visited_fraction(causal_tiles=True))
  kept = float(jnp.mean(cm))
  cols = ["T", "method", "fwd ms", "fwd+bwd ms", "fwd MiB", "fwd+bwd MiB", "visited 64x64 tiles",
          "kept cells"]
  for name, fn in attention_methods(args).items():
    if time.perf_counter() > deadline:
      report.note("2. attention", f"T = {T} {name}: skipped (time budget)")
      continue
    iters = args.iters if T <= 8192 else max(2, args.iters // 2)
    res = measure(fn, q, k, v, cm, g, iters, 1)
    report.add("2. attention", cols, [T, name, _fmt_ms(res["fwd"][0]), _fmt_ms(res["fwdbwd"][0]),
                                      _fmt_mib(res["fwd"][1]), _fmt_mib(res["fwdbwd"][1]),
                                      f"{visited:.3f}" if not name.startswith("dense") else "",
                                      f"{kept:.4f}" if not name.startswith("dense") else ""])


def eval_rows(report: Report, args, deadline: float) -> None:
  try:
    _eval_rows(report, args, deadline)
  except Exception as e:  # noqa: BLE001 (an import or build failure: report it, go on)
    report.note("3. whole-model eval", f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")


def _eval_rows(report: Report, args, deadline: float) -> None:
  import dataclasses

  from flax import nnx

  from sea_jax import checkpoint
  from sea_jax.config import OPTConfig, SEAConfig
  T, B = args.eval_T, args.eval_batch
  base = OPTConfig(num_hidden_layers=args.eval_layers, max_position_embeddings=T, dropout=0.0,
                   dtype="bfloat16", param_dtype="float32")
  variants = [("dense (dense_impl auto)", base)]
  for impl in ("pallas", "xla", "blocked"):
    variants.append((f"SEA sparse_impl={impl} (K={args.K}, k={args.k}, untrained)",
                     dataclasses.replace(base, attention="sea",
                                         sea=SEAConfig(K=args.K, k=args.k, sparse_impl=impl))))
  ids = jax.random.randint(jax.random.PRNGKey(0), (B, T), 0, base.vocab_size)
  cols = ["model", "tokens/s", "ms per batch", "vs dense", "compiled temp MiB"]
  dense_tps = None
  for name, cfg in variants:
    if time.perf_counter() > deadline:
      report.note("3. whole-model eval", f"{name}: skipped (time budget)")
      continue
    try:
      graph, state = nnx.split(checkpoint.build_model(cfg, nnx.Rngs(0)))

      @jax.jit
      def nll(state, ids):
        logits = nnx.merge(graph, state)(ids).logits.astype(jnp.float32)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

      compiled = nll.lower(state, ids).compile()
      temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
      jax.block_until_ready(compiled(state, ids))
      times = []
      for _ in range(args.eval_iters):
        start = time.perf_counter()
        jax.block_until_ready(compiled(state, ids))
        times.append(time.perf_counter() - start)
      sec = float(np.median(times))
      tps = B * T / sec
      dense_tps = dense_tps or tps
      report.add("3. whole-model eval", cols, [name, f"{tps:,.0f}", f"{sec * 1e3:.1f}",
                                               f"{tps / dense_tps:.2f}x", f"{temp:,.0f}"])
      del graph, state, compiled
    except Exception as e:  # noqa: BLE001
      report.note("3. whole-model eval", f"{name} failed: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:300]}")
  report.note("3. whole-model eval", f"opt-125m shape ({args.eval_layers} layers, random weights), "
              f"bf16 compute, fp32 params, T = {T}, batch {B}, median of {args.eval_iters} "
              "calls of the jitted mean NLL")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--out-dir", default="bench_gpu_out", help="where bench_gpu.md/.json go")
  p.add_argument("--budget-s", type=float, default=420.0,
                 help="no new measurement starts after this many seconds")
  p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192, 4096, 16384, 32768],
                 help="attention lengths, in the order they run")
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--K", type=int, default=256)
  p.add_argument("--k", type=int, default=64)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--check-T", type=int, default=2048, help="length of the correctness check")
  p.add_argument("--eval-T", type=int, default=2048)
  p.add_argument("--eval-batch", type=int, default=8)
  p.add_argument("--eval-layers", type=int, default=12)
  p.add_argument("--eval-iters", type=int, default=5)
  p.add_argument("--eval-after", type=int, default=2,
                 help="the whole-model eval runs after this many attention lengths")
  p.add_argument("--quick", action="store_true", help="tiny sizes, interpreted kernels (CPU)")
  args = p.parse_args(argv)
  args.interpret = jax.default_backend() == "cpu"
  if args.quick:
    args.seq_lens, args.heads, args.K, args.k, args.iters = [256], 2, 16, 4, 1
    args.check_T, args.eval_T, args.eval_batch, args.eval_layers, args.eval_iters = 256, 256, 1, 1, 1
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  start = time.perf_counter()
  deadline = start + args.budget_s
  import flax
  dev = jax.devices()[0]
  report = Report(args.out_dir, [
      "# sea-jax accelerator benchmark", "",
      f"- device: {dev.platform} / {getattr(dev, 'device_kind', '?')}; jax {jax.__version__}, "
      f"flax {flax.__version__}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
      f"- command: python bench/bench_gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}",
  ])
  correctness(report, args)
  for i, T in enumerate(args.seq_lens):
    if i == args.eval_after:
      eval_rows(report, args, deadline)
    if time.perf_counter() > deadline:
      report.note("2. attention", f"T = {T}: skipped (time budget)")
      continue
    attention_rows(report, args, T, deadline)
  if len(args.seq_lens) <= args.eval_after:
    eval_rows(report, args, deadline)
  report.note("timing", f"whole run {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
