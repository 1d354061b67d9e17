"""Long context on this machine: a small Llama-shaped model, dense vs SEA, T = 4k ... 32k.

Model (random weights, built in-process): 4 layers, d_model 256, 8 query heads over 2 kv heads,
head dim 32, SwiGLU 1024, llama3 RoPE (theta 5e5), vocab 4096; SEA with K = 256, k = 64 (XLA
tile-list sparse attention). Measured side by side in one run, batch 1, fp32:
  1. forward (logits) wall time and compiled temp bytes (`memory_analysis()`), dense attention
     on the `dense_impl="auto"` path (chunked beyond 2048 tokens; never T x T) and SEA;
  2. one distillation step (dense teacher forward, SEA student forward + backward with the
     paper's loss, chunked per-layer terms, AdamW update) wall time and compiled temp bytes.

  python bench/bench_long_context.py [--lengths 4096 8192 16384 32768] [--distill 8192 32768]
                                     [--out F]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from sea_jax import checkpoint, losses  # noqa: E402
from sea_jax.config import LlamaConfig, SEAConfig  # noqa: E402
from bench import report_files  # noqa: E402
from bench.timing import best_time  # noqa: E402

VOCAB = 4096
LLAMA3 = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
          ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))


def config(attention: str, T: int) -> LlamaConfig:
  return LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024,
                     num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                     head_dim=32, max_position_embeddings=max(T, 32768), rope_theta=5e5,
                     rope_scaling=LLAMA3, attention=attention,
                     sea=SEAConfig(K=256, k=64, sparse_impl="xla"))


def forward_row(attention: str, T: int, repeats: int) -> dict:
  graph, state = nnx.split(checkpoint.build_model(config(attention, T), nnx.Rngs(0)))
  ids = jax.random.randint(jax.random.key(T), (1, T), 0, VOCAB)
  run = jax.jit(lambda s, x: nnx.merge(graph, s)(x).logits)
  compiled = run.lower(state, ids).compile()
  return {"temp": compiled.memory_analysis().temp_size_in_bytes,
          "seconds": best_time(compiled, (state, ids), repeats)}


def distill_row(T: int) -> dict:
  """One jitted distillation update of a SEA student from its dense teacher (same weights)."""
  teacher = checkpoint.build_model(config("dense", T), nnx.Rngs(0))
  student = checkpoint.build_model(config("sea", T), nnx.Rngs(0))
  t_graph, t_state = nnx.split(teacher)
  s_graph, params, rest = nnx.split(student, nnx.Param, ...)
  opt = optax.adamw(1e-4)
  opt_state = opt.init(params)
  ids = jax.random.randint(jax.random.key(T), (1, T), 0, VOCAB)

  def loss_fn(params, rest, t_state, ids):
    t_out = nnx.merge(t_graph, t_state)(ids, output_hidden_states=True, return_attn_aux=True)
    t_out = jax.tree.map(jax.lax.stop_gradient, t_out)
    s_out = nnx.merge(s_graph, params, rest)(ids, output_hidden_states=True,
                                             return_attn_aux=True)
    targets = jnp.concatenate([ids[:, 1:], jnp.full((1, 1), -1, ids.dtype)], axis=1)
    total, _ = losses.distillation_loss(t_out, s_out, targets, K=256)
    return total

  @jax.jit
  def step(params, opt_state, rest, t_state, ids):
    loss, grads = jax.value_and_grad(loss_fn)(params, rest, t_state, ids)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  compiled = step.lower(params, opt_state, rest, t_state, ids).compile()
  start = time.perf_counter()
  out = jax.block_until_ready(compiled(params, opt_state, rest, t_state, ids))
  seconds = time.perf_counter() - start
  return {"temp": compiled.memory_analysis().temp_size_in_bytes, "seconds": seconds,
          "loss": float(out[2])}


def markdown(fwd: list[dict], distill: list[dict]) -> str:
  mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
  lines = [f"Long context, small Llama (4 layers, d_model 256, 8 q / 2 kv heads, head dim 32, "
           f"vocab {VOCAB}), batch 1, fp32; {platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores, jax {jax.__version__}, {datetime.date.today()}; "
           "`python bench/bench_long_context.py`", "",
           "| T | dense fwd s | SEA fwd s | SEA / dense time | dense temp MiB | SEA temp MiB |",
           "|---|---|---|---|---|---|"]
  for r in fwd:
    lines.append(f"| {r['T']:,} | {r['dense']['seconds']:.2f} | {r['sea']['seconds']:.2f} | "
                 f"{r['sea']['seconds'] / r['dense']['seconds']:.2f}x | {mib(r['dense']['temp'])} | "
                 f"{mib(r['sea']['temp'])} |")
  if distill:
    lines += ["", "| T | distillation step s | compiled temp MiB | loss |", "|---|---|---|---|"]
    for r in distill:
      lines.append(f"| {r['T']:,} | {r['seconds']:.1f} | {mib(r['temp'])} | {r['loss']:.3f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--lengths", type=int, nargs="*", default=[4096, 8192, 16384, 32768],
                 help="T of the forward rows (default 4096 8192 16384 32768)")
  p.add_argument("--distill", type=int, nargs="*", default=[8192, 32768],
                 help="T of the one-step distillation rows (default 8192 32768)")
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--out", help="write the markdown table here too")
  args = p.parse_args(argv)
  report_files.claim(__file__, args.out)
  fwd = []
  for T in args.lengths:
    row = {"T": T, **{a: forward_row(a, T, args.repeats) for a in ("dense", "sea")}}
    print(row, flush=True)
    fwd.append(row)
  distill = []
  for T in args.distill:
    row = {"T": T, **distill_row(T)}
    print(row, flush=True)
    distill.append(row)
  md = markdown(fwd, distill)
  print(md)
  report_files.write_markdown(__file__, args.out, md)


if __name__ == "__main__":
  main()
