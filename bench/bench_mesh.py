"""SEA on a device mesh: what `sharding.per_shard` changes in one data-parallel eval step.

One jitted `evaluate.window_losses` step of a small SEA OPT with random weights, parameters
replicated and the batch split over `--mesh` (default data=8, on 8 virtual CPU devices unless
real ones exist), compiled twice: with the ambient mesh (`sharding.ambient`: sparse attention
and the grouped top-k run per device shard) and without it (XLA partitions them itself).
Reports all-gathers in the compiled program, XLA's temp memory per device, the loss and the
wall time (best of `--repeats`). Prints a Markdown table.

  python bench/bench_mesh.py [--mesh data=8] [--T 2048] [--batch 8] [--out FILE]
"""
from __future__ import annotations

import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sea_jax import checkpoint  # noqa: E402
from sea_jax import sharding as shd  # noqa: E402
from sea_jax.config import OPTConfig, SEAConfig  # noqa: E402
from sea_jax.evaluate import window_losses  # noqa: E402
from bench import report_files  # noqa: E402


def build(args):
  cfg = OPTConfig(vocab_size=args.vocab, hidden_size=256, num_hidden_layers=2,
                  num_attention_heads=4, ffn_dim=1024, max_position_embeddings=args.T,
                  word_embed_proj_dim=256, dropout=0.0, attention="sea",
                  sea=SEAConfig(K=64, k=16, sparse_impl=args.sparse_impl))
  return nnx.split(checkpoint.build_model(cfg, nnx.Rngs(0)))


def measure(graph, state, ids, mesh, *, per_shard: bool, repeats: int) -> dict:
  def step(state, ids):
    with shd.ambient(mesh if per_shard else None):  # None: a no-op context
      return window_losses(nnx.merge(graph, state), ids, None)

  compiled = jax.jit(step).lower(state, ids).compile()
  loss = float(np.mean(jax.device_get(compiled(state, ids))))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(state, ids))
    times.append(time.perf_counter() - start)
  return dict(gathers=compiled.as_text().count("all-gather"),
              temp_mib=compiled.memory_analysis().temp_size_in_bytes / 2**20,
              loss=loss, seconds=min(times))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--mesh", default="data=8", help="mesh axes, as train.py's --mesh")
  parser.add_argument("--T", type=int, default=2048, help="tokens per window")
  parser.add_argument("--batch", type=int, default=8, help="windows per step")
  parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size")
  parser.add_argument("--sparse-impl", default="xla", help="SEAConfig.sparse_impl")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs of each step")
  parser.add_argument("--out", help="also write the table to this file")
  args = parser.parse_args(argv)
  report_files.claim(__file__, args.out)

  mesh = shd.make_mesh(args.mesh)
  graph, state = build(args)
  state = jax.device_put(state, shd.replicated(mesh))
  ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.T)).astype(np.int32)
  ids = jax.device_put(ids, shd.batch_sharding(mesh))
  rows = [("XLA partitions the step (no ambient mesh)",
           measure(graph, state, ids, mesh, per_shard=False, repeats=args.repeats)),
          ("`per_shard` (ambient mesh)",
           measure(graph, state, ids, mesh, per_shard=True, repeats=args.repeats))]
  device = jax.devices()[0]
  lines = [f"Device: {platform.machine()}, {jax.device_count()} {device.platform} devices "
           f"({os.cpu_count()} cores), mesh {args.mesh}; jax {jax.__version__}; "
           f"{datetime.date.today()}. 2-layer SEA OPT (d_model 256, 4 heads, K = 64, k = 16, "
           f"sparse_impl={args.sparse_impl!r}), batch {args.batch} x {args.T} tokens.", "",
           "| step | all-gathers | temp MiB per device | mean loss | s (best of "
           f"{args.repeats}) |", "|---|---|---|---|---|"]
  for name, r in rows:
    lines.append(f"| {name} | {r['gathers']} | {r['temp_mib']:.0f} | {r['loss']:.6f} | "
                 f"{r['seconds']:.2f} |")
  table = "\n".join(lines)
  print(table)
  report_files.write_markdown(__file__, args.out, table)


if __name__ == "__main__":
  main()
