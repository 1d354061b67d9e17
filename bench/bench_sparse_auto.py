"""Which pure-JAX sparse path `sparse_impl="auto"` should pick on CPU, measured side by side.

  python bench/bench_sparse_auto.py [--lengths 512 1024 2048 4096] [--step | --only-steps | --only-topk]
                                    [--out F]
  python bench/bench_sparse_auto.py --only-full-rung --lengths 2048 4096 8192

1. fwd+bwd of `sparse_attention` (the tile list, "xla") against `blocked_attention` with the
   compressed mask ("blocked": each query block against the keys it can see) and against the
   former blocked path, `sparse_attention_reference` (every query block against all T keys), on
   coherent SEA masks, at the small recipe's heads (N=8, H=8, d=32, K=64, k=32) and opt-125m's
   (N=1, H=12, d=64, K=256, k=64); and, for dense attention at the same heads, the T x T
   `dense_attention` against `blocked_attention` (what dense_impl="auto" runs on CPU);
2. with --step: one whole distillation step of the small recipe (4 layers, d_model 256, 8 heads,
   vocabulary 8192, T=512, batch 8, K=64, k=32: teacher forward, student forward + backward,
   every loss, AdamW) for the dense pre-training step (T x T reference and blocked attention),
   the Performer student and the SEA student with either sparse path;
3. the grouped top-k of one SEA layer's row budgets (N=1 at opt-125m's heads, the recipe's
   batch of 8 at its own): k a Python int (`lax.top_k` on octaves of rows with small budgets,
   the radix select on wide ones), k traced (the radix select) and the two-key sort that the traced path used before.
4. with --only-full-rung: the tile list on every rung against the default, whose every-tile
   rung runs `blocked_attention`, on scattered and coherent masks (`full_rung_rows`).
Ratios are within one run. `sea_jax.sea.layer.AUTO_TILE_MIN_BLOCKS` is set from these figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_sea_cpu import best_time, fwd_bwd  # noqa: E402
from bench_train_step import time_compiled_step  # noqa: E402
from bench_sparse_attention import make_mask  # noqa: E402
from sea_jax.ops.dense import dense_attention  # noqa: E402
from sea_jax.ops.blocked_attention import blocked_attention  # noqa: E402
from sea_jax.ops.sparse import sparse_attention, sparse_attention_reference  # noqa: E402
from bench import report_files  # noqa: E402

SHAPES = {"recipe (N=8, H=8, d=32, K=64, k=32)": (8, 8, 32, 64, 32),
          "opt-125m (N=1, H=12, d=64, K=256, k=64)": (1, 12, 64, 256, 64)}


def path_rows(lengths, repeats):
  rows = []
  for label, (N, H, D, K, k) in SHAPES.items():
    for T in lengths:
      keys = jax.random.split(jax.random.key(0), 5)
      q, kk, v, w = (jax.random.normal(keys[i], (N, H, T, D)) for i in range(4))
      cm = make_mask(keys[4], "sea", N, H, T, K, k)
      args = (q * D ** -0.5, kk, v, cm, w)
      tile = best_time(fwd_bwd(lambda *a: sparse_attention(*a, full_rung="tiles")), args,
                       repeats)
      every = best_time(fwd_bwd(lambda *a: sparse_attention_reference(*a)), args, repeats)
      blocked = best_time(fwd_bwd(lambda q, k, v, m: blocked_attention(q, k, v,
                                                                       compressed_mask=m)),
                          args, repeats)
      dense = best_time(fwd_bwd(lambda q, k, v, m: dense_attention(q, k, v)), args, repeats)
      dense_blocked = best_time(fwd_bwd(lambda q, k, v, m: blocked_attention(q, k, v)),
                                args, repeats)
      rows.append({"shape": label, "T": T, "xla": tile, "every_key": every, "blocked": blocked,
                   "dense": dense, "dense_blocked": dense_blocked})
      print(rows[-1], file=sys.stderr, flush=True)
  return rows


# (H, Hkv, d) of the every-tile rung's table: opt-125m, and the long-context small Llama.
RUNG_SHAPES = {"opt-125m (H=12, d=64)": (12, 12, 64), "small Llama (H=8, Hkv=2, d=32)": (8, 2, 32)}


def full_rung_rows(lengths, repeats):
  """The tile list run on every rung against the default (its every-tile rung handed to
  blocked_attention), on an untrained estimator's kind of mask ("random": scattered bins, nearly
  every tile visited) and a coherent one ("sea"); K=256, k=64, N=1."""
  from sea_jax.ops.sparse import causal_visited_tiles
  rows = []
  for label, (H, Hkv, D) in RUNG_SHAPES.items():
    for T in lengths:
      keys = jax.random.split(jax.random.key(0), 5)
      q, w = (jax.random.normal(keys[i], (1, H, T, D)) for i in (0, 3))
      kk, v = (jax.random.normal(keys[i], (1, Hkv, T, D)) for i in (1, 2))
      for kind in ("random", "sea"):
        cm = make_mask(keys[4], kind, 1, H, T, 256, 64)
        vis = causal_visited_tiles(cm, 128)
        nb = vis.shape[-1]
        row = {"shape": label, "T": T, "mask": kind,
               "visited": float(jnp.sum(vis)) / (H * nb * (nb + 1) / 2)}
        for name, rung in (("tiles", "tiles"), ("default", "blocked")):
          op = lambda q, k, v, m, rung=rung: sparse_attention(q, k, v, m, full_rung=rung)  # noqa: E731
          row[f"{name}_fwd"] = best_time(jax.jit(op), (q * D ** -0.5, kk, v, cm), repeats)
          row[f"{name}_fb"] = best_time(fwd_bwd(op), (q * D ** -0.5, kk, v, cm, w), repeats)
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
  return rows


def full_rung_markdown(rows) -> str:
  lines = [f"Device: {platform.machine()}, {os.cpu_count()} cores, backend "
           f"{jax.default_backend()}; jax {jax.__version__}; {datetime.date.today()}. fp32, "
           "tiles 128 x 128, K=256, k=64, best of the repeats. tiles: every rung is the tile "
           "list; default: the every-tile rung runs blocked_attention.", "",
           "| heads | T | mask | visited causal tiles | tiles fwd s | default fwd s | tiles fwd+bwd s "
           "| default fwd+bwd s | default / tiles, fwd+bwd |", "|---|---|---|---|---|---|---|---|---|"]
  lines += [f"| {r['shape']} | {r['T']} | {r['mask']} | {r['visited']:.3f} | "
            f"{r['tiles_fwd']:.3f} | {r['default_fwd']:.3f} | {r['tiles_fb']:.3f} | "
            f"{r['default_fb']:.3f} | {r['default_fb'] / r['tiles_fb']:.2f} |" for r in rows]
  return "\n".join(lines) + "\n"


def step_time(attention: str, mode: str, impl: str, steps: int, dense_impl: str = "auto") -> float:
  from sea_jax import sharding as shd
  from sea_jax.config import OPTConfig, SEAConfig
  from sea_jax.training import models, optimizer
  from sea_jax.training.step import StepSpec, build_train_step
  cfg = OPTConfig(vocab_size=8192, num_hidden_layers=4, hidden_size=256, num_attention_heads=8,
                  ffn_dim=1024, max_position_embeddings=512, word_embed_proj_dim=256,
                  dropout=0.0, attention=attention, sea=SEAConfig(K=64, k=32, sparse_impl=impl),
                  dense_impl=dense_impl)
  mesh = shd.make_mesh(None, jax.devices()[:1])
  student = models.ModelBridge(cfg)
  teacher = models.ModelBridge(dataclasses.replace(cfg, attention="dense"))
  tx = optimizer.make_optimizer({"sea": 1e-3, "pretrained": 3e-5}, 0.01)
  p_sh, _ = student.shardings(mesh)
  opt_sh = optimizer.opt_state_shardings(tx, student.abstract_params, p_sh, mesh)
  B, T = 8, 512
  step = build_train_step(StepSpec(mode, batch_size=B, micro_batch_size=B, seq_len=T, K=64),
                          student, teacher, tx, mesh, opt_sh)
  return time_compiled_step(step, student, teacher, tx, opt_sh, mesh, B, T, steps,
                            token_high=8000)["step_s"]


def step_rows(steps):
  runs = [("dense pre-training step, T x T reference", "dense", "pretrain", "auto", "reference"),
          ("dense pre-training step (auto: blocked_attention)", "dense", "pretrain", "auto"),
          ("Performer student", "performer", "distill", "auto"),
          ("SEA student, tile list (xla)", "sea", "distill", "xla"),
          ("SEA student, blocked", "sea", "distill", "blocked")]
  rows = []
  for label, attention, mode, impl, *dense_impl in runs:
    s = step_time(attention, mode, impl, steps, *dense_impl)
    rows.append({"run": label, "step_s": s, "tokens_per_s": 8 * 512 / s})
    print(rows[-1], file=sys.stderr, flush=True)
  return rows


def sort_mask(est, k):
  """The former traced-k path: one two-key (score, cell) sort per row."""
  from sea_jax.sea.topk import nonempty_bins, row_budget
  N, H, T, K = est.shape
  nonempty = nonempty_bins(T, K)
  score = jnp.where(nonempty[None, None], est, -1.0).transpose(0, 2, 1, 3).reshape(N, T, H * K)
  cells = jax.lax.broadcasted_iota(jnp.int32, score.shape, 2)
  neg, cells_sorted = jax.lax.sort((-score, cells), dimension=2, num_keys=2)
  last = jnp.broadcast_to(row_budget(T, H, K, k)[None, :, None] - 1, (N, T, 1))
  thr = -jnp.take_along_axis(neg, last, axis=2)
  cell_thr = jnp.take_along_axis(cells_sorted, last, axis=2)
  keep = (score > thr) | ((score == thr) & (cells <= cell_thr))
  return keep.reshape(N, T, H, K).transpose(0, 2, 1, 3) & nonempty[None, None]


def topk_rows(repeats):
  from sea_jax.sea.topk import grouped_topk_mask
  rows = []
  for label, (N, H, T, K, k) in (("recipe", (8, 8, 512, 64, 32)),
                                 ("opt-125m", (1, 12, 2048, 256, 64)),
                                 ("opt-125m", (1, 12, 8192, 256, 64))):
    est = jax.nn.softmax(jax.random.normal(jax.random.key(1), (N, H, T, K)), axis=-1)
    kt = jnp.int32(k)
    static = jax.jit(lambda e, k=k: grouped_topk_mask(e, k))
    traced = jax.jit(grouped_topk_mask)
    old = jax.jit(sort_mask)
    assert bool(jnp.all(static(est) == traced(est, kt))) and bool(jnp.all(old(est, kt) == traced(est, kt)))
    rows.append({"shape": f"{label} N={N} H={H} T={T} K={K} k={k}",
                 "static": best_time(static, (est,), repeats),
                 "select": best_time(traced, (est, kt), repeats),
                 "sort": best_time(old, (est, kt), repeats)})
    print(rows[-1], file=sys.stderr, flush=True)
  return rows


def markdown(paths, steps, topks=()) -> str:
  lines = [f"Device: {platform.machine()}, {os.cpu_count()} cores, backend "
           f"{jax.default_backend()}; jax {jax.__version__}; {datetime.date.today()}. fp32, "
           "query blocks of 128, best of the repeats."]
  if paths:
    lines += ["", "SEA sparse attention, fwd+bwd s:", "",
              "| heads | T | query blocks | tile list (xla) | blocked_attention (blocked) "
              "| every key (former blocked) | xla / blocked |", "|---|---|---|---|---|---|---|"]
  for r in paths:
    lines.append(f"| {r['shape']} | {r['T']} | {-(-r['T'] // 128)} | {r['xla']:.3f} | "
                 f"{r['blocked']:.3f} | {r['every_key']:.3f} | {r['xla'] / r['blocked']:.2f} |")
  if paths:
    lines += ["", "Dense causal attention, fwd+bwd s:", "",
              "| heads | T | T x T reference | blocked_attention | reference / blocked |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['T']} | {r['dense']:.3f} | {r['dense_blocked']:.3f} | "
              f"{r['dense'] / r['dense_blocked']:.2f} |" for r in paths]
  if steps:
    lines += ["", "| small recipe, one step (T=512, batch 8) | s/step | tokens/s |",
              "|---|---|---|"]
    lines += [f"| {r['run']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} |" for r in steps]
  if topks:
    lines += ["", "| grouped top-k, forward | k int: octave hybrid s | k traced: radix select s "
              "| former traced path: sort s | sort / select |", "|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['static']:.3f} | {r['select']:.3f} | {r['sort']:.3f} | "
              f"{r['sort'] / r['select']:.1f}x |" for r in topks]
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
  p.add_argument("--repeats", type=int, default=2, help="timed calls per op (best is kept)")
  p.add_argument("--step", action="store_true", help="also time the small recipe's train steps")
  p.add_argument("--steps", type=int, default=3, help="timed steps per run with --step")
  p.add_argument("--only-topk", action="store_true", help="only the top-k table")
  p.add_argument("--only-steps", action="store_true", help="only the train-step table")
  p.add_argument("--only-full-rung", action="store_true",
                 help="only the every-tile rung table (tile list vs blocked_attention), at "
                      "--lengths")
  p.add_argument("--out", help="write the markdown tables here too")
  args = p.parse_args(argv)
  report_files.claim(__file__, args.out)
  if args.only_full_rung:
    text = full_rung_markdown(full_rung_rows(args.lengths, args.repeats))
  elif args.only_topk:
    text = markdown([], [], topk_rows(args.repeats))
  elif args.only_steps:
    text = markdown([], step_rows(args.steps))
  else:
    text = markdown(path_rows(args.lengths, args.repeats),
                    step_rows(args.steps) if args.step else [], topk_rows(args.repeats))
  print(text)
  report_files.write_markdown(__file__, args.out, text)


if __name__ == "__main__":
  main()
