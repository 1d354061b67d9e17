"""Compiled temp memory (and CPU wall time) of one attention layer's forward + backward.

For SEA (pure-JAX sparse path) and dense attention at opt-125m head shapes (N=1, H=12, d=64,
K=256, k=64): `jax.jit(grad).lower(...).compile().memory_analysis().temp_size_in_bytes`, i.e.
XLA's planned scratch memory, without running. Prints a Markdown table.

  python bench/bench_sea_memory.py [--lengths 2048 4096 8192 16384] [--dense-max 8192]
                                   [--time-max 2048] [--out FILE]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sea_jax.attention import make_attention_core  # noqa: E402
from sea_jax.config import OPTConfig, SEAConfig  # noqa: E402
from bench import report_files  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
  heads: int = 12
  head_dim: int = 64
  K: int = 256
  k: int = 64


def fwd_bwd(kind: str, T: int, shape: Shape = Shape()):
  """(jitted grad fn, args): grad of sum(context) w.r.t. the layer's params and q, k, v."""
  config = OPTConfig(hidden_size=shape.heads * shape.head_dim, num_attention_heads=shape.heads,
                     max_position_embeddings=T, attention=kind,
                     sea=SEAConfig(K=shape.K, k=shape.k, sparse_impl="xla"))
  core = make_attention_core(config, 0, rngs=nnx.Rngs(0))
  graph, params, rest = nnx.split(core, nnx.Param, ...)

  def loss(params, q, k, v, rest):
    context, _ = nnx.merge(graph, params, rest)(q, k, v)
    return jnp.sum(context.astype(jnp.float32))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  qkv = jax.ShapeDtypeStruct((1, shape.heads, T, shape.head_dim), jnp.float32)
  return grad, (params, qkv, qkv, qkv, rest)


def temp_bytes(kind: str, T: int, shape: Shape = Shape()) -> int:
  """XLA's planned temp bytes for one fwd+bwd (compiled, not run)."""
  grad, args = fwd_bwd(kind, T, shape)
  return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes


def wall_seconds(kind: str, T: int, shape: Shape = Shape(), repeats: int = 3) -> float:
  """Best-of-`repeats` wall time of one compiled fwd+bwd on the default device."""
  grad, (params, qkv, _, _, rest) = fwd_bwd(kind, T, shape)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal(qkv.shape), jnp.float32) for _ in range(3))
  q = q * shape.head_dim ** -0.5
  jax.block_until_ready(grad(params, q, k, v, rest))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(grad(params, q, k, v, rest))
    best = min(best, time.perf_counter() - start)
  return best


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
  parser.add_argument("--dense-max", type=int, default=16384,
                      help="largest T at which dense attention is compiled")
  parser.add_argument("--time-max", type=int, default=2048,
                      help="largest T at which fwd+bwd is also run and timed")
  parser.add_argument("--out", help="also write the table to this file")
  args = parser.parse_args(argv)
  report_files.claim(__file__, args.out)

  device = jax.devices()[0]
  lines = [f"Attention layer fwd+bwd, N=1 H=12 d=64 K=256 k=64 (fp32). device: "
           f"{device.platform} ({device.device_kind}), jax {jax.__version__}, "
           f"{datetime.date.today().isoformat()}", "",
           "| T | SEA temp MiB | dense temp MiB | dense / SEA | SEA fwd+bwd s | dense fwd+bwd s |",
           "|---|---|---|---|---|---|"]
  print("\n".join(lines), flush=True)
  for T in args.lengths:
    sea = temp_bytes("sea", T)
    dense = temp_bytes("dense", T) if T <= args.dense_max else None
    timed = T <= args.time_max
    sea_s = f"{wall_seconds('sea', T):.3f}" if timed else "–"
    dense_s = f"{wall_seconds('dense', T):.3f}" if timed and dense is not None else "–"
    mib = lambda b: "–" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    ratio = "–" if dense is None else f"{dense / sea:.1f}×"
    line = f"| {T} | {mib(sea)} | {mib(dense)} | {ratio} | {sea_s} | {dense_s} |"
    lines.append(line)
    print(line, flush=True)
  report_files.write_markdown(__file__, args.out, "\n".join(lines))


if __name__ == "__main__":
  main()
