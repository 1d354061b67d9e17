"""Benchmark one SEA distillation step (student + frozen teacher + chunked losses + AdamW).

  python bench/bench_train_step.py                      # opt-125m shapes, T=2048, batch 1
  python bench/bench_train_step.py --layers 2 --steps 1 # quicker on a small CPU

Reports tokens/s of the jitted `sea_jax.training` step (median over --steps after one warm-up
step), XLA's compiled memory estimate (temp bytes: activations and scratch; argument bytes:
params, optimizer state, teacher, batch), compile time and the host's peak RSS; then the
compiled temp memory of value_and_grad of one layer's attention loss, chunked
(`losses.attention_layer_loss`, O(block * T)) vs dense (`losses.dense_attention_layer_loss`,
whole T x T maps). Prints Markdown tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sea_jax import losses  # noqa: E402
from sea_jax import sharding as shd  # noqa: E402
from sea_jax.config import OPTConfig, SEAConfig  # noqa: E402
from sea_jax.training import models, optimizer  # noqa: E402
from sea_jax.training.step import StepSpec, base_rng, build_train_step, init_opt_state  # noqa: E402

MiB = 2.0**20


def opt125m(layers: int, dtype: str, remat: bool, K: int, k: int) -> OPTConfig:
  return OPTConfig(num_hidden_layers=layers, hidden_size=768, num_attention_heads=12,
                   ffn_dim=3072, max_position_embeddings=2048, word_embed_proj_dim=768,
                   dropout=0.1, dtype=dtype, remat=remat, attention="sea",
                   sea=SEAConfig(K=K, k=k, sparse_impl="auto"))


def compiled_memory(compiled) -> dict[str, float]:
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - some backends have none
    return {}
  if m is None:
    return {}
  return {"temp": m.temp_size_in_bytes / MiB, "args": m.argument_size_in_bytes / MiB,
          "out": m.output_size_in_bytes / MiB}


def bench_step(args) -> dict:
  mesh = shd.make_mesh(None, jax.devices()[:1])
  student_cfg = opt125m(args.layers, args.dtype, args.remat, args.K, args.k)
  teacher_cfg = dataclasses.replace(student_cfg, attention="dense", dropout=0.0, remat=False)
  student, teacher = models.ModelBridge(student_cfg), models.ModelBridge(teacher_cfg)
  tx = optimizer.make_optimizer({"sea": 1e-4, "pretrained": 2e-6}, 0.01)
  p_sh, _ = student.shardings(mesh)
  opt_sh = optimizer.opt_state_shardings(tx, student.abstract_params, p_sh, mesh)
  B, T = args.batch, args.seq_len
  spec = StepSpec("distill", batch_size=B, micro_batch_size=B, seq_len=T, K=args.K)
  step = build_train_step(spec, student, teacher, tx, mesh, opt_sh)

  result = {"layers": args.layers, "T": T, "B": B, "dtype": args.dtype, "remat": args.remat}
  if args.compile_only:  # abstract arguments: nothing allocated, nothing run
    sp, sr = student.abstract(mesh)
    state = {"params": sp, "rest": sr, "opt": jax.eval_shape(tx.init, sp),
             "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.eval_shape(base_rng, 0)}
    tp, tr = teacher.abstract(mesh)
    t0 = time.perf_counter()
    compiled = step.fn.lower(state, {"params": tp, "rest": tr},
                             jax.ShapeDtypeStruct((B, T + 1), jnp.int32)).compile()
    return {**result, "compile_s": time.perf_counter() - t0, **compiled_memory(compiled),
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MiB}

  timed = time_compiled_step(step, student, teacher, tx, opt_sh, mesh, B, T, args.steps,
                             token_high=50000)
  return {**result, "compile_s": timed["compile_s"], "step_s": timed["step_s"],
          "tokens_per_s": B * T / timed["step_s"], "loss": timed["loss"], **timed["memory"],
          "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MiB}


def time_compiled_step(step, student, teacher, tx, opt_sh, mesh, B: int, T: int, steps: int,
                       token_high: int) -> dict:
  """Compiles `step` (a `build_train_step` result) on fresh weights and a random (B, T+1)
  batch of token ids in [4, token_high), runs one warm-up call and `steps` timed ones:
  {"compile_s", "step_s" (median), "loss", "memory" (compiled_memory)}."""
  params, rest = models.fresh_weights(student, mesh)
  tp, tr = models.fresh_weights(teacher, mesh)
  state = {"params": params, "rest": rest, "opt": init_opt_state(tx, params, opt_sh),
           "step": jnp.int32(0), "rng": base_rng(0)}
  teacher_state = {"params": tp, "rest": tr}
  batch = jax.device_put(np.random.default_rng(0).integers(4, token_high, (B, T + 1), np.int32),
                         step.batch_sharding)

  t0 = time.perf_counter()
  compiled = step.fn.lower(state, teacher_state, batch).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(steps + 1):  # the first call is a warm-up
    t0 = time.perf_counter()
    state, metrics = compiled(state, teacher_state, batch)
    jax.block_until_ready(metrics)
    if i:
      times.append(time.perf_counter() - t0)
  return {"compile_s": compile_s, "step_s": statistics.median(times),
          "loss": float(metrics["loss"]), "memory": compiled_memory(compiled)}


def bench_layer_loss(args) -> list[dict]:
  """Compiled temp memory of value_and_grad of one layer's attention loss, chunked vs dense."""
  B, H, T, d, K = args.batch, 12, args.seq_len, 64, args.K
  f32 = jnp.float32
  shapes = {"q": (B, H, T, d), "k": (B, H, T, d), "context": (B, H, T, d)}
  teacher = {n: jax.ShapeDtypeStruct(s, f32) for n, s in shapes.items()}
  student = dict(teacher, est_logits=jax.ShapeDtypeStruct((B, H, T, K), f32))

  def make(fn):
    def loss(s, t):
      return fn(t, s, K=K)["total"]
    return jax.jit(jax.value_and_grad(loss))

  rows = []
  impls = [("chunked (query_block 128)", losses.attention_layer_loss)]
  if hasattr(losses, "dense_attention_layer_loss"):
    impls.append(("dense T x T", losses.dense_attention_layer_loss))
  for name, fn in impls:
    mem = compiled_memory(make(fn).lower(student, teacher).compile())
    rows.append({"impl": name, **mem})
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--seq-len", type=int, default=2048)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--K", type=int, default=256)
  p.add_argument("--k", type=int, default=64)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--remat", action="store_true")
  p.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up")
  p.add_argument("--skip-step", action="store_true", help="only the layer-loss memory table")
  p.add_argument("--compile-only", action="store_true",
                 help="compile the step on abstract inputs: memory estimate, no timing")
  args = p.parse_args(argv)

  dev = jax.devices()[0]
  print(f"device: {dev.platform} {getattr(dev, 'device_kind', '')}, jax {jax.__version__}, "
        f"{os.cpu_count()} host cores\n")
  if not args.skip_step:
    r = bench_step(args)
    print("| layers | T | batch | dtype | remat | tokens/s | step s | compile s | temp MiB "
          "| args MiB | host peak RSS MiB | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    print(f"| {r['layers']} | {r['T']} | {r['B']} | {r['dtype']} | {r['remat']} | "
          f"{r.get('tokens_per_s', nan):.1f} | {r.get('step_s', nan):.2f} | "
          f"{r['compile_s']:.1f} | "
          f"{r.get('temp', float('nan')):.0f} | {r.get('args', float('nan')):.0f} | "
          f"{r['rss']:.0f} | {r.get('loss', nan):.3f} |\n")
  print(f"Per-layer attention loss, value_and_grad, B={args.batch} H=12 T={args.seq_len} d=64 "
        f"K={args.K} (compiled temp memory):\n")
  print("| implementation | temp MiB | args MiB |")
  print("|---|---|---|")
  for row in bench_layer_loss(args):
    print(f"| {row['impl']} | {row.get('temp', float('nan')):.1f} | "
          f"{row.get('args', float('nan')):.1f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
