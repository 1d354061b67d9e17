"""Decode speed and memory, dense vs SEA, at context 2k ... 32k on this machine.

The small Llama-shaped model of `bench_long_context.py` (4 layers, d_model 256, 8 query heads
over 2 kv heads, head dim 32, vocab 4096; SEA K = 256, k = 64), batch 1, fp32, random weights.
One jitted decode step of `sea_jax.generate` (the same function generation runs) at a cache of
`context` written slots: dense attends to every slot; SEA steps from its decode state and
attends to at most `kept_key_bound` (head, key) pairs. A step's cost does not depend on the
cache's values (SEA's pair list has a static length), so the cache is filled with random
k, v and state instead of a prefill of `context` tokens (which `bench_long_context.py` times).
Reported: the median of `--steps` decode steps, tokens/s, the step's compiled temp bytes
(`memory_analysis()`) and the cache's bytes (k, v and SEA's state: the step's arguments).

  python bench/bench_decode.py [--contexts 2048 8192 32768] [--steps 20] [--out F]
  python bench/bench_decode.py --family opt --contexts 2000   # opt-125m's shape, up to 2k
  python bench/bench_decode.py --family real [--dense smollm2-135m] [--student FOLDER]

--family real times the real pair of issue 30: the dense SmolLM2-135M (the installed GGUF) and
its SEA student (default: the bundled one; 30 layers, 9 query heads over 3 kv heads, head dim
64, K = 256, k = 64, pooled keys), loaded as `eval.py` loads them. Contexts past the model's
8,192 positions are timed as well (RoPE extends; a step's cost does not depend on the values).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bench_long_context import config as llama_config  # noqa: E402
from sea_jax.config import OPTConfig, SEAConfig  # noqa: E402
from sea_jax import checkpoint  # noqa: E402
from sea_jax import generate as gen  # noqa: E402
from sea_jax.attention import KVCache  # noqa: E402
from sea_jax.errors import UserError, run_command  # noqa: E402
from sea_jax.sea.decode import kept_key_bound  # noqa: E402
from bench import report_files  # noqa: E402


def random_cache(cfg, context: int, extra: int) -> KVCache:
  """A cache of context + extra slots with `context` written (random values, all real)."""
  cache = KVCache.zeros(cfg, 1, context + extra)
  leaves, tree = jax.tree.flatten(cache)
  keys = jax.random.split(jax.random.key(context), len(leaves))
  leaves = [jax.random.uniform(key, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
            else x for key, x in zip(keys, leaves)]
  cache = jax.tree.unflatten(tree, leaves)
  mask = jnp.zeros((1, context + extra), bool).at[:, :context].set(True)
  return KVCache(k=cache.k, v=cache.v, key_mask=mask, length=jnp.int32(context),
                 states=cache.states)


def opt_config(attention: str, T: int) -> OPTConfig:
  """opt-125m's shape (12 layers, d_model 768, 12 heads, vocab 50272), SEA K = 256, k = 64."""
  del T
  return OPTConfig(attention=attention, dropout=0.0, sea=SEAConfig(K=256, k=64, sparse_impl="xla"))


FAMILIES = {"llama": llama_config, "opt": opt_config}  # family -> config of (attention, T)


def decode_row(attention: str, context: int, steps: int, family: str = "llama",
               loaded: dict | None = None) -> dict:
  """One row's figures for `attention` ("dense" or "sea"): the model is loaded[attention]
  (family "real", loaded once for every context) or a random one of `family`'s shape."""
  if family == "real":
    model = loaded[attention]
  else:
    model = checkpoint.build_model(FAMILIES[family](attention, context + steps + 1),
                                   nnx.Rngs(0))
  cfg = model.config
  graph, state = nnx.split(model)
  cache = random_cache(cfg, context, steps + 1)
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
  tokens = jnp.zeros((1,), jnp.int32)
  key, knobs = jax.random.key(0), (jnp.float32(0.0), jnp.float32(1.0))
  compiled = gen._decode.lower(graph, state, tokens, cache, key, 0, *knobs, sea_k=None,
                               mesh=None).compile()
  times = []
  for i in range(steps + 1):
    start = time.perf_counter()
    tokens, _, cache = gen._decode(graph, state, tokens, cache, key, i, *knobs, sea_k=None,
                                   mesh=None)
    tokens.block_until_ready()
    if i:  # step 0 warms up
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  return {"step_s": step_s, "tokens_per_s": 1.0 / step_s,
          "temp": compiled.memory_analysis().temp_size_in_bytes, "cache": cache_bytes,
          "heads": cfg.num_attention_heads, "K": cfg.sea.K, "k": cfg.sea.k}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768])
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--family", default="llama", choices=sorted(FAMILIES) + ["real"],
                 help="llama: the small long-context Llama; opt: opt-125m's shape (contexts "
                      "below 2048 only); real: SmolLM2-135M and its SEA student")
  p.add_argument("--dense", default="smollm2-135m",
                 help="--family real: the dense model (default: the installed GGUF)")
  p.add_argument("--student", default=None,
                 help="--family real: the SEA student folder (default: the bundled student)")
  p.add_argument("--out", default=None, help="also write the markdown table here")
  args = p.parse_args()
  report_files.claim(__file__, args.out)
  loaded = None
  if args.family == "real":  # both models once, the student checked before any measurement
    from sea_jax import bundle
    student = args.student or bundle.student_folder()
    loaded = {"dense": checkpoint.load_pretrained(args.dense),
              "sea": checkpoint.load_pretrained(student)}
    if loaded["sea"].config.attention != "sea":
      raise UserError(f"--student {student} is not a SEA model")
  mib = 2**20
  lines = [f"Decode ({args.family}), batch 1, fp32 ({datetime.date.today()}, jax {jax.__version__}, "
           f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
           f"{jax.default_backend()}), median of {args.steps} steps:", "",
           "| context | dense step | dense tokens/s | SEA step | SEA tokens/s | SEA / dense "
           "time | SEA kept pairs (bound) / dense keys per layer | dense temp / cache MiB | "
           "SEA temp / cache MiB |", "|---|---|---|---|---|---|---|---|---|"]
  for context in args.contexts:
    d = decode_row("dense", context, args.steps, args.family, loaded)
    s = decode_row("sea", context, args.steps, args.family, loaded)
    H = s["heads"]
    bound = kept_key_bound(context + args.steps + 1, H, s["K"], s["k"])
    lines.append(f"| {context} | {d['step_s'] * 1e3:.2f} ms | {d['tokens_per_s']:.1f} | "
                 f"{s['step_s'] * 1e3:.2f} ms | {s['tokens_per_s']:.1f} | "
                 f"{s['step_s'] / d['step_s']:.2f} | {bound} / {H * (context + 1)} | "
                 f"{d['temp'] / mib:.1f} / {d['cache'] / mib:.1f} | "
                 f"{s['temp'] / mib:.1f} / {s['cache'] / mib:.1f} |")
    print(lines[-1], flush=True)
  text = "\n".join(lines)
  print(text)
  report_files.write_markdown(__file__, args.out, text)
  return 0


if __name__ == "__main__":
  sys.exit(run_command(main))  # bad input (a --student that is not a model): one error line
