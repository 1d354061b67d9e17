"""Benchmark SEA sparse attention: Pallas kernel vs pure-JAX sparse vs dense attention.

  python bench/bench_sparse_attention.py --out-md bench.md --out-png bench.png   # GPU
  python bench/bench_sparse_attention.py --quick --out-md q.md --out-png q.png  # CPU check

Times (median of --iters, after a compile + warm-up call) the forward and forward+backward
of: the Pallas kernel (`pallas_kernels.sparse_attention`), the pure-JAX
`sea_jax.ops.sparse_attention`, and dense causal attention (`jax.nn.dot_product_attention`,
implementation "xla" and "cudnn" where present). Memory is XLA's compiled estimate
(temp + output bytes of the jitted function; inputs excluded), which does not depend on
what ran before. Masks: "sea" (smooth logits over (t, bin), neighbouring rows pick similar
columns, grouped top-k across heads with budget c_t = round(H k K / (t+1))) and "random"
(same budgets, i.i.d. scores). Also reports the fraction of causal key blocks visited.
Full mode: N=1, H=12, d=64, K=256, k=64, bf16, T = 2k..32k.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import report_files  # noqa: E402
from pallas_kernels import BlockSizes, build_block_map  # noqa: E402
from sea_jax import safe_write  # noqa: E402
from pallas_kernels import sparse_attention as pallas_sparse_attention  # noqa: E402

MiB = 2.0**20


# ---------------------------------------------------------------- masks

def _row_budget(T: int, H: int, K: int, k: int) -> jax.Array:
  t = jnp.arange(1, T + 1, dtype=jnp.int32)
  return jnp.clip(jnp.round(H * k * K / t).astype(jnp.int32), 1, H * K)


def _nonempty(T: int, K: int) -> jax.Array:
  t = jnp.arange(T, dtype=jnp.int32)[:, None]
  b = jnp.arange(K + 1, dtype=jnp.int32)[None, :]
  starts = (2 * b * (t + 1) + K) // (2 * K)
  return starts[:, 1:] > starts[:, :-1]


def _grouped_topk(scores: jax.Array, k: int) -> jax.Array:
  """scores (N,H,T,K) -> bool mask; per (n, t) the top c_t of the H*K non-empty cells."""
  try:
    from sea_jax.sea.topk import grouped_topk_mask
    return grouped_topk_mask(jax.nn.sigmoid(scores), k)   # the SEA layer's own top-k
  except ImportError:
    N, H, T, K = scores.shape
    ne = _nonempty(T, K)
    s = jnp.where(ne[None, None], scores, -jnp.inf).transpose(0, 2, 1, 3).reshape(N, T, H * K)
    rank = jnp.argsort(jnp.argsort(-s, axis=-1), axis=-1)
    keep = rank < _row_budget(T, H, K, k)[None, :, None]
    return keep.reshape(N, T, H, K).transpose(0, 2, 1, 3) & ne[None, None]


def make_mask(key, kind: str, N: int, H: int, T: int, K: int, k: int) -> jax.Array:
  """bool (N,H,T,K) compressed mask, 'sea' (smooth) or 'random'."""
  k1, k2, k3 = jax.random.split(key, 3)
  if kind == "random":
    scores = jax.random.uniform(k1, (N, H, T, K))
  elif kind == "sea":
    # A per-head profile over bins, smoothed along bins, plus a slow random walk over rows.
    base = jax.random.normal(k1, (N, H, 1, K))
    kernel = jnp.ones((5,)) / 5.0
    base = jax.vmap(lambda r: jnp.convolve(r, kernel, mode="same"))(base.reshape(-1, K))
    base = base.reshape(N, H, 1, K) * 3.0
    steps = jax.random.normal(k2, (N, H, T, K), jnp.float32) * (3.0 / np.sqrt(T))
    scores = base + jnp.cumsum(steps, axis=2) + 0.1 * jax.random.normal(k3, (N, H, T, K))
  else:
    raise ValueError(kind)
  return jax.jit(_grouped_topk, static_argnums=1)(scores, k)


# ---------------------------------------------------------------- methods

def dense_fn(impl: str):
  def f(q, k, v, cm):
    del cm
    tr = lambda x: jnp.swapaxes(x, 1, 2)          # (N,H,T,d) -> (N,T,H,d)
    out = jax.nn.dot_product_attention(tr(q), tr(k), tr(v), scale=1.0, is_causal=True,
                                       implementation=impl)
    return tr(out)
  return f


def methods(args):
  bs = BlockSizes(args.block_q, args.block_k)
  out = {"pallas": lambda q, k, v, cm: pallas_sparse_attention(
      q, k, v, cm, interpret=args.interpret, block_sizes=bs)}
  try:
    from sea_jax.ops import sparse_attention as xla_sparse
    out["jax-sparse"] = lambda q, k, v, cm: xla_sparse(q, k, v, cm, query_block=args.query_block)
  except ImportError as e:
    print(f"skipping jax-sparse: {e}")
  out["dense-xla"] = dense_fn("xla")
  if jax.default_backend() == "gpu":
    out["dense-cudnn"] = dense_fn("cudnn")
  return out


def _mem_bytes(compiled) -> float:
  try:
    ma = compiled.memory_analysis()
    return float(ma.temp_size_in_bytes + ma.output_size_in_bytes)
  except Exception:   # noqa: BLE001 (not every backend reports it)
    return float("nan")


def time_fn(fn, args_, iters: int, warmup: int):
  """(median seconds, compiled memory bytes) of jit(fn)(*args_)."""
  compiled = jax.jit(fn).lower(*args_).compile()
  mem = _mem_bytes(compiled)
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args_))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args_))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), mem


def measure(fn, q, k, v, cm, g, iters, warmup):
  res = {}
  fwd = lambda q, k, v, cm: fn(q, k, v, cm)

  def fwd_bwd(q, k, v, cm, g):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, cm), q, k, v)
    return out, vjp(g)

  for name, f, a in [("fwd", fwd, (q, k, v, cm)), ("fwdbwd", fwd_bwd, (q, k, v, cm, g))]:
    try:
      res[name] = time_fn(f, a, iters, warmup)
    except Exception as e:   # noqa: BLE001 (OOM, unsupported implementation...)
      msg = str(e).lower()
      tag = "OOM" if ("resource_exhausted" in msg or "out of memory" in msg) else "n/a"
      print(f"    {name}: {tag} ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
      res[name] = (tag, tag)
  return res


# ---------------------------------------------------------------- report

def _fmt_ms(x):
  return x if isinstance(x, str) else f"{x * 1e3:.2f}"


def _fmt_mib(x):
  return x if isinstance(x, str) else ("?" if np.isnan(x) else f"{x / MiB:.1f}")


def write_markdown(path, rows, args):
  dev = jax.devices()[0]
  lines = [
      "# SEA sparse attention benchmark", "",
      f"- device: {dev.platform} / {getattr(dev, 'device_kind', '?')}",
      f"- jax {jax.__version__}, date {datetime.datetime.now().isoformat(timespec='seconds')}",
      f"- N={args.batch}, H={args.heads}, d={args.head_dim}, K={args.K}, k={args.k}, "
      f"dtype={args.dtype}, blocks {args.block_q}x{args.block_k}, interpret={args.interpret}",
      "- time: median ms over the iterations; mem: XLA compiled temp + output MiB "
      "(inputs excluded); visited: fraction of causal key blocks the kernel visits", "",
      "| T | mask | method | fwd ms | fwd+bwd ms | fwd MiB | fwd+bwd MiB | visited |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(f"| {r['T']} | {r['mask']} | {r['method']} | {_fmt_ms(r['fwd'][0])} | "
                 f"{_fmt_ms(r['fwdbwd'][0])} | {_fmt_mib(r['fwd'][1])} | "
                 f"{_fmt_mib(r['fwdbwd'][1])} | {r['visited']} |")
  report_files.write_markdown(__file__, path, "\n".join(lines))


def write_plot(path, rows):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  series = sorted({(r["method"], r["mask"]) for r in rows})
  for ax, key, title in [(axes[0], "fwd", "forward"), (axes[1], "fwdbwd", "forward + backward")]:
    for method, mask in series:
      pts = [(r["T"], r[key][0]) for r in rows
             if r["method"] == method and r["mask"] == mask and not isinstance(r[key][0], str)]
      if pts:
        xs, ys = zip(*sorted(pts))
        label = method if mask == "-" else f"{method} ({mask})"
        ax.plot(xs, np.array(ys) * 1e3, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("ms")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(f"SEA sparse attention, {jax.devices()[0].device_kind}, jax {jax.__version__}")
  fig.tight_layout()
  import io
  png = io.BytesIO()  # the PNG's Software text chunk names this benchmark (report_files)
  fig.savefig(png, format="png", dpi=120,
              metadata={"Software": safe_write.written_by(report_files.script_name(__file__))})
  safe_write.write_output_file(path, png.getvalue(), report_files.script_name(__file__))


# ---------------------------------------------------------------- main

def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out-md", default="bench_sparse_attention.md")
  p.add_argument("--out-png", default="bench_sparse_attention.png")
  p.add_argument("--quick", action="store_true",
                 help="tiny CPU run through the Pallas interpreter (proves the script works)")
  p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
  p.add_argument("--masks", nargs="+", default=["sea", "random"])
  p.add_argument("--methods", nargs="+", default=None, help="subset of method names")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--K", type=int, default=256)
  p.add_argument("--k", type=int, default=64)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--block-q", type=int, default=64)
  p.add_argument("--block-k", type=int, default=64)
  p.add_argument("--query-block", type=int, default=128, help="pure-JAX sparse query block")
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  args.interpret = False
  if args.quick:
    args.seq_lens, args.heads, args.K, args.k = [64, 128], 2, 16, 2
    args.block_q = args.block_k = 16
    args.query_block, args.iters, args.warmup = 32, 1, 0
  if jax.default_backend() == "cpu":
    args.interpret = True
  return args


def main(argv=None):
  args = parse_args(argv)
  report_files.claim(__file__, args.out_md, args.out_png)
  dtype = jnp.dtype(args.dtype)
  print(f"devices: {jax.devices()}  jax {jax.__version__}  interpret={args.interpret}")
  meths = methods(args)
  if args.methods:
    meths = {m: f for m, f in meths.items() if m in args.methods}
  rows = []
  key = jax.random.PRNGKey(args.seed)
  for T in args.seq_lens:
    key, kq, kk, kv, kg, km = jax.random.split(key, 6)
    shape = (args.batch, args.heads, T, args.head_dim)
    q = (jax.random.normal(kq, shape) * args.head_dim**-0.5).astype(dtype)
    k = jax.random.normal(kk, shape).astype(dtype)
    v = jax.random.normal(kv, shape).astype(dtype)
    g = jax.random.normal(kg, shape).astype(dtype)
    dense_done = False
    for mask in args.masks:
      cm = make_mask(km, mask, args.batch, args.heads, T, args.K, args.k)
      bmap = build_block_map(cm, block_q=args.block_q, block_k=args.block_k)
      causal = args.block_q == args.block_k
      visited = f"{float(bmap.visited_fraction(causal_tiles=causal)):.3f}"
      kept = float(jnp.mean(cm))
      print(f"T={T} mask={mask}: {kept:.3%} of compressed cells kept, "
            f"key blocks visited {visited}")
      for name, fn in meths.items():
        is_dense = name.startswith("dense")
        if is_dense and dense_done:
          continue
        print(f"  {name} ...", flush=True)
        res = measure(fn, q, k, v, cm, g, args.iters, args.warmup)
        rows.append(dict(T=T, mask="-" if is_dense else mask, method=name,
                         visited=visited if name == "pallas" else "",
                         fwd=res["fwd"], fwdbwd=res["fwdbwd"]))
        print(f"    fwd {_fmt_ms(res['fwd'][0])} ms, fwd+bwd {_fmt_ms(res['fwdbwd'][0])} ms, "
              f"mem {_fmt_mib(res['fwd'][1])} / {_fmt_mib(res['fwdbwd'][1])} MiB")
      dense_done = True
      del cm, bmap
  write_markdown(args.out_md, rows, args)
  write_plot(args.out_png, rows)
  print(f"wrote {args.out_md} and {args.out_png}")


if __name__ == "__main__":
  main()
