"""SEA's sparse attention and whole SEA layer against XLA dense causal attention, side by side.

Measures, in one run on the default device (opt-125m head shapes: N=1, H=12, d=64, K=256, k=64,
fp32):
  1. `sea_jax.ops.sparse_attention` (tile list), `sparse_attention_reference` (every key) and
     `jax.nn.dot_product_attention(implementation="xla", is_causal=True)`: forward and
     forward+backward wall time, on coherent SEA masks (bench_sparse_attention.make_mask 'sea':
     a smooth per-head profile over bins drifting slowly over rows), with the visited tile
     fraction and the physical limit (kept keys / visible keys);
  2. one whole SEA attention core (Performer branch, estimator CNN, grouped top-k, sparse
     attention, mix; random parameters, its own mask) fwd+bwd against dense, and the forward
     time of each stage at the largest T;
  3. compiled FLOPs (`cost_analysis()["flops"]`) of the SEA core and of dense attention, forward.

  python bench/bench_sea_cpu.py [--lengths 2048 4096 8192] [--sea-only 16384 32768] [--out F]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bench_sparse_attention import make_mask  # noqa: E402
from sea_jax.attention import make_attention_core  # noqa: E402
from sea_jax.config import OPTConfig, SEAConfig  # noqa: E402
from sea_jax.ops import sparse_attention, sparse_attention_reference  # noqa: E402
from sea_jax.ops.sparse import causal_visited_tiles  # noqa: E402
from sea_jax.sea import (causal_linear_attention, causal_mean, grouped_topk_mask,  # noqa: E402
                         masked_bin_softmax, relu_features)
from bench import report_files  # noqa: E402
from bench.timing import best_time  # noqa: E402

N, H, D, K, k = 1, 12, 64, 256, 64
BLOCK = 128


def dense(q, kk, v, cm=None):
  del cm
  tr = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
  return tr(jax.nn.dot_product_attention(tr(q), tr(kk), tr(v), scale=1.0, is_causal=True,
                                         implementation="xla"))


def fwd_bwd(op):
  def loss(q, kk, v, cm, w):
    return jnp.sum(op(q, kk, v, cm).astype(jnp.float32) * w)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def inputs(T: int, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 5)
  q, kk, v, w = (jax.random.normal(keys[i], (N, H, T, D), jnp.float32) for i in range(4))
  return q * D ** -0.5, kk, v, w, make_mask(keys[4], "sea", N, H, T, K, k)


def tile_flops(T: int, visited: float) -> dict[str, float]:
  """Forward FLOPs (the two matmuls) the tile list executes: its ladder rung's tiles x 4·B²·d;
  dense XLA attention's full 4·H·T²·d; and the physical limit is kept keys x 4·d per query."""
  from sea_jax.ops import tile_ladder
  nb = -(-T // BLOCK)
  causal = N * H * nb * (nb + 1) // 2
  need = round(visited * causal)
  rung = next(c for c in tile_ladder(N * H, nb) if c >= need)
  return {"sea_tiles": rung * 4.0 * BLOCK * BLOCK * D, "dense_full": 4.0 * N * H * T * T * D,
          "causal": causal * 4.0 * BLOCK * BLOCK * D}


def mask_stats(cm) -> tuple[float, float]:
  """(visited fraction of causal tiles, kept keys / visible keys)."""
  T = cm.shape[2]
  vis = causal_visited_tiles(cm, BLOCK)
  nb = vis.shape[-1]
  visited = float(jnp.sum(vis)) / (N * H * nb * (nb + 1) / 2)
  from sea_jax.ops import bin_bounds
  starts, ends = bin_bounds(T, K)
  kept = float(jnp.sum(jnp.where(cm, (ends - starts)[None, None], 0)))
  return visited, kept / (N * H * T * (T + 1) / 2)


def sparse_rows(lengths, sea_only, reference_max, repeats):
  rows = []
  for T in [*lengths, *sea_only]:
    q, kk, v, w, cm = inputs(T)
    visited, kept = mask_stats(cm)
    row = {"T": T, "visited": visited, "kept": kept}
    ops = {"sea": lambda *a: sparse_attention(*a, query_block=BLOCK)}
    if T in lengths:
      ops["dense"] = dense
    if T <= reference_max:
      ops["reference"] = lambda *a: sparse_attention_reference(*a, query_block=BLOCK)
    for name, op in ops.items():
      row[f"{name}_fwd"] = best_time(jax.jit(op), (q, kk, v, cm), repeats)
      row[f"{name}_fb"] = best_time(fwd_bwd(op), (q, kk, v, cm, w), repeats)
    rows.append(row)
    print(row, flush=True)
  return rows


def sea_core(T: int):
  config = OPTConfig(hidden_size=H * D, num_attention_heads=H, max_position_embeddings=T,
                     attention="sea", sea=SEAConfig(K=K, k=k, sparse_impl="xla"))
  return make_attention_core(config, 0, rngs=nnx.Rngs(0))


def layer_rows(lengths, repeats):
  rows = []
  for T in lengths:
    q, kk, v, w, _ = inputs(T)
    core = sea_core(T)
    graph, params, rest = nnx.split(core, nnx.Param, ...)

    def sea_op(q, kk, v, cm, params=params, graph=graph, rest=rest):
      del cm
      return nnx.merge(graph, params, rest)(q, kk, v)[0]

    _, aux = jax.jit(lambda q, kk, v: nnx.merge(graph, params, rest)(q, kk, v,
                                                                     return_aux=True))(q, kk, v)
    visited, kept = mask_stats(aux["compressed_mask"])
    row = {"T": T, "visited": visited, "kept": kept,
           "sea_fb": best_time(fwd_bwd(sea_op), (q, kk, v, None, w), repeats),
           "dense_fb": best_time(fwd_bwd(dense), (q, kk, v, None, w), repeats)}
    rows.append(row)
    print(row, flush=True)
  return rows


def stage_times(T: int, repeats: int) -> dict[str, float]:
  """Forward wall time of each stage of one SEA core, each jitted alone on real inputs."""
  q, kk, v, _, _ = inputs(T)
  core = sea_core(T)
  W = core.features[...]
  pos = jnp.broadcast_to(core.positions[...][:T], (N, H, T, D))
  v_cat = jnp.concatenate([pos, v], axis=-1)
  performer = jax.jit(lambda q, kk, v_cat: causal_linear_attention(
      relu_features(q, W), relu_features(kk, W), v_cat, core.performer_chunk))
  c_perf = performer(q, kk, v_cat)
  z_in = jnp.concatenate([c_perf, v], axis=-1)
  graph, state = nnx.split(core.estimator)
  estimator = jax.jit(lambda z: nnx.merge(graph, state)(z))
  logits, s_prob, s_mix = estimator(z_in)
  topk = jax.jit(lambda lg: grouped_topk_mask(masked_bin_softmax(lg), k))
  mask = topk(logits)
  sparse = jax.jit(lambda q, kk, v, m: sparse_attention(q, kk, v, m, query_block=BLOCK))
  c_sparse = sparse(q, kk, v, mask)
  mix = jax.jit(lambda c, v, a, b: b[..., None] * (a[..., None] * c)
                + (1 - b[..., None]) * causal_mean(v))
  return {"performer": best_time(performer, (q, kk, v_cat), repeats),
          "estimator": best_time(estimator, (z_in,), repeats),
          "top-k": best_time(topk, (logits,), repeats),
          "sparse": best_time(sparse, (q, kk, v, mask), repeats),
          "mix": best_time(mix, (c_sparse, v, s_prob, s_mix), repeats)}


def flops_rows(lengths, dense_max):
  rows = []
  for T in lengths:
    core = sea_core(T)
    graph, params, rest = nnx.split(core, nnx.Param, ...)
    qkv = jax.ShapeDtypeStruct((N, H, T, D), jnp.float32)
    sea_fn = jax.jit(lambda p, q, kk, v: nnx.merge(graph, p, rest)(q, kk, v)[0])
    flops = lambda c: (c.cost_analysis() or {}).get("flops", float("nan"))  # noqa: E731
    sea_f = flops(sea_fn.lower(params, qkv, qkv, qkv).compile())
    dense_f = (flops(jax.jit(dense).lower(qkv, qkv, qkv).compile()) if T <= dense_max
               else 4.0 * N * H * T * T * D)  # its two T x T matmuls, when too big to compile
    rows.append({"T": T, "sea": sea_f, "dense": dense_f, "dense_compiled": T <= dense_max})
    print(rows[-1], flush=True)
  return rows


def markdown(sparse, layers, stages, stage_T, flops) -> str:
  dev = jax.devices()[0]
  out = [f"Device: {platform.machine()}, {os.cpu_count()} cores, backend {dev.platform}; "
         f"jax {jax.__version__}; {datetime.date.today().isoformat()}. N={N}, H={H}, d={D}, "
         f"K={K}, k={k}, fp32, tiles {BLOCK}×{BLOCK}; best of the repeats; ratios are to XLA "
         "dense causal attention in the same run.", "",
         "**Sparse attention alone** (coherent SEA masks):", "",
         "| T | kept / visible keys | visited causal tiles | SEA fwd s | dense fwd s | fwd ratio "
         "| SEA fwd+bwd s | dense fwd+bwd s | fwd+bwd ratio | reference fwd+bwd s |",
         "|---|---|---|---|---|---|---|---|---|---|"]
  fmt = lambda r, key: f"{r[key]:.3f}" if key in r else "–"  # noqa: E731
  ratio = lambda r, a, b: f"{r[a] / r[b]:.2f}×" if a in r and b in r else "–"  # noqa: E731
  for r in sparse:
    out.append(f"| {r['T']} | {r['kept']:.3f} | {r['visited']:.3f} | {fmt(r, 'sea_fwd')} | "
               f"{fmt(r, 'dense_fwd')} | {ratio(r, 'sea_fwd', 'dense_fwd')} | {fmt(r, 'sea_fb')} | "
               f"{fmt(r, 'dense_fb')} | {ratio(r, 'sea_fb', 'dense_fb')} | {fmt(r, 'reference_fb')} |")
  out += ["", "**Whole SEA attention core** (random parameters, its own estimated mask) vs dense, "
          "fwd+bwd:", "", "| T | kept / visible keys | visited causal tiles | SEA core s | dense s "
          "| ratio |", "|---|---|---|---|---|---|"]
  for r in layers:
    out.append(f"| {r['T']} | {r['kept']:.3f} | {r['visited']:.3f} | {r['sea_fb']:.3f} | "
               f"{r['dense_fb']:.3f} | {r['sea_fb'] / r['dense_fb']:.2f}× |")
  if stages:
    total = sum(stages.values())
    out += ["", f"**Stages of one SEA core, forward, T = {stage_T}** (each jitted alone):", "",
            "| stage | s | share |", "|---|---|---|"]
    out += [f"| {name} | {s:.3f} | {s / total:.0%} |" for name, s in stages.items()]
  out += ["", "**Sparse attention's executed FLOPs, forward** (the tile list's rung × 4·B²·d; "
          "XLA's `cost_analysis()` counts a loop body once, so it cannot see them), against XLA "
          "dense attention (4·H·T²·d: it computes every score, then masks) and the physical "
          "limit (kept keys / visible keys of causal attention):", "",
          "| T | SEA tiles GFLOP | dense GFLOP | SEA / dense | SEA / causal dense | "
          "physical limit (kept / visible) |", "|---|---|---|---|---|---|"]
  for r in sparse:
    f = tile_flops(r["T"], r["visited"])
    out.append(f"| {r['T']} | {f['sea_tiles'] / 1e9:.1f} | {f['dense_full'] / 1e9:.1f} | "
               f"{f['sea_tiles'] / f['dense_full']:.3f} | {f['sea_tiles'] / f['causal']:.3f} | "
               f"{r['kept']:.3f} |")
  out += ["", "**Compiled FLOPs of the whole SEA core, forward** (`cost_analysis()`: the "
          "Performer, estimator and top-k, plus one tile of the sparse loop; dense past its "
          "compile limit is 4·N·H·T²·d, marked *):", "",
          "| T | SEA core GFLOP | dense GFLOP | SEA / dense |", "|---|---|---|---|"]
  for r in flops:
    star = "" if r["dense_compiled"] else "*"
    out.append(f"| {r['T']} | {r['sea'] / 1e9:.2f} | {r['dense'] / 1e9:.2f}{star} | "
               f"{r['sea'] / r['dense']:.3f} |")
  return "\n".join(out) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192],
                 help="T for every measurement, dense included (default 2048 4096 8192)")
  p.add_argument("--sea-only", type=int, nargs="*", default=[16384],
                 help="T for SEA's sparse attention alone (default 16384)")
  p.add_argument("--reference-max", type=int, default=4096,
                 help="largest T at which the every-key reference is timed (default 4096)")
  p.add_argument("--layer-lengths", type=int, nargs="*", default=[4096, 8192])
  p.add_argument("--stage-T", type=int, default=8192)
  p.add_argument("--flops-lengths", type=int, nargs="*", default=[2048, 4096, 8192, 16384, 32768])
  p.add_argument("--dense-max", type=int, default=16384,
                 help="largest T at which dense attention is compiled for FLOPs (default 16384)")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--out", help="write the markdown tables here too")
  args = p.parse_args(argv)
  report_files.claim(__file__, args.out)
  sparse = sparse_rows(args.lengths, args.sea_only, args.reference_max, args.repeats)
  layers = layer_rows(args.layer_lengths, args.repeats)
  stages = stage_times(args.stage_T, args.repeats) if args.stage_T else {}
  print(stages, flush=True)
  flops = flops_rows(args.flops_lengths, args.dense_max)
  md = markdown(sparse, layers, stages, args.stage_T, flops)
  print(md)
  report_files.write_markdown(__file__, args.out, md)


if __name__ == "__main__":
  main()
