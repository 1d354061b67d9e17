"""Text generation for every family (OPT, Llama, Qwen2, Mistral): greedy or top-p sampling.

  python -m sea_jax.generate --model PATH --prompt "Once upon a time" --max-new-tokens 32
  python -m sea_jax.generate --model PATH --prompt-file p.txt --temperature 0.8 --top-p 0.9

Every model decodes with a KV cache: the prompts are left-padded into one batch (N, P); ONE
jitted prefill writes the prompt's first P - 1 columns into a preallocated `attention.KVCache`
(per layer k, v (N, Hkv, L, d), L = P - 1 + max_new_tokens, key mask (N, L), written length,
and each SEA / Performer layer's decode state) and returns only the cache, so no (N, P, V)
logits are ever made; ONE jitted decode step (the tokens, the cache and the step index are
arguments, every shape static, the cache donated) takes the last prompt column (every row's is
real), which draws the first new token, and then each new token, so it compiles once per
(batch, L). Positions follow Hugging Face's generate: cumsum(mask) - 1 over the cache's key
mask, so a left-padded row sees the positions and keys it would see alone.

Dense layers attend to every cached slot. SEA layers (`sea_jax.sea.decode`) prefill by the
full-sequence forward and then step from their state: the Performer branch's running sums,
the estimator CNN's last rows, the new row's Â and grouped top-k over its H·K cells, and
attention over only the keys that row keeps (a static list of `kept_key_bound` pairs), so a
step's attention work follows the kept keys, not the context. Performer layers step from their
running sums.

Sampling: temperature 0 is greedy (argmax, ties to the lower id); otherwise a draw from
softmax(logits / temperature) restricted to the top-p nucleus (the most likely tokens whose
mass reaches top_p, as Hugging Face's TopPLogitsWarper), row n at step i with the key
fold_in(fold_in(key(seed), i), n): a seed reproduces its tokens whatever the batch. A row stops
after its first EOS (the config's eos_token_id: an int or a tuple); the batch stops when every
row has, or after max_new_tokens.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import math
import sys
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sea_jax import sharding as shd
from sea_jax.attention import KVCache
from sea_jax.errors import UserError, add_debug_flag, run_command
from sea_jax.flags import add_model_flags, check_model_flags, model_overrides

TRACES: collections.Counter = collections.Counter()  # traces of each jitted step (tests)


class GenerateError(UserError, ValueError):
  """A generation request that cannot run: an empty prompt, too many tokens, bad sampling."""


# --- checks ---------------------------------------------------------------------------------------

def check_settings(max_new_tokens: int, temperature: float, top_p: float) -> None:
  if max_new_tokens < 1:
    raise GenerateError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
  if not temperature >= 0 or math.isinf(temperature):
    raise GenerateError(f"temperature must be a finite number >= 0, got {temperature}")
  if not 0 < top_p <= 1:
    raise GenerateError(f"top-p must be in (0, 1], got {top_p}")


def check_prompts(prompts: Sequence[Sequence[int]], config, max_new_tokens: int) -> None:
  """Non-empty prompts of in-vocabulary ids that fit max_position_embeddings with the new tokens."""
  if not prompts:
    raise GenerateError("no prompts given")
  limit = config.max_position_embeddings
  for i, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise GenerateError(f"prompt {i} is empty")
    if min(prompt) < 0 or max(prompt) >= config.vocab_size:
      raise GenerateError(f"prompt {i} has token ids outside the model's vocabulary "
                          f"0..{config.vocab_size - 1}")
    if len(prompt) + max_new_tokens > limit:
      raise GenerateError(f"a prompt of {len(prompt)} tokens plus {max_new_tokens} new tokens "
                          f"exceeds the model's max_position_embeddings {limit}")


def eos_ids(config) -> tuple[int, ...]:
  """The config's EOS id(s) as a tuple (empty: never stop early)."""
  eos = getattr(config, "eos_token_id", None)
  if eos is None:
    return ()
  return tuple(eos) if isinstance(eos, (tuple, list)) else (int(eos),)


# --- sampling -------------------------------------------------------------------------------------

def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array,
           top_p: jax.Array) -> jax.Array:
  """logits (N, V) fp32 -> (N,) int32: argmax at temperature 0, else a top-p draw per row."""
  def greedy(_):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw(_):
    scaled = logits / temperature
    order = jnp.argsort(-scaled, axis=-1)  # most likely first (stable: lower id on ties)
    ranked = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    ranked = jnp.where(before < top_p, ranked, -jnp.inf)
    keys = jax.vmap(lambda n: jax.random.fold_in(key, n))(jnp.arange(logits.shape[0]))
    choice = jax.vmap(jax.random.categorical)(keys, ranked)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

  return jax.lax.cond(temperature > 0, draw, greedy, None)


# --- the jitted steps -----------------------------------------------------------------------------

def _constrain(cache: KVCache, mesh: Mesh | None) -> KVCache:
  """The cache's arrays with batch rows over data x fsdp (kv heads over tensor when it divides)."""
  if mesh is None:
    return cache

  def put(a, axes):
    spec = shd.logical_to_spec(axes, a.shape, mesh)
    return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec))
  kv = ("batch", "kv_heads", None, "head_dim")
  return KVCache(k=tuple(put(a, kv) for a in cache.k), v=tuple(put(a, kv) for a in cache.v),
                 key_mask=put(cache.key_mask, ("batch", None)),
                 length=jax.lax.with_sharding_constraint(cache.length, NamedSharding(mesh, P())),
                 states=cache.states)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "sea_k", "mesh"))
def _prefill(graphdef, state, ids, mask, *, max_len, sea_k, mesh):
  """ids, mask (N, T) left-padded -> a cache of max_len slots holding them (T may be 0).

  Only the cache is returned, so XLA drops the LM head: no (N, T, V) logits.
  """
  TRACES["prefill"] += 1
  model = nnx.merge(graphdef, state)
  cache = _constrain(KVCache.zeros(model.config, ids.shape[0], max_len), mesh)
  if ids.shape[1] > 0:
    with shd.ambient(mesh):
      _, cache = model(ids, mask, sea_k=sea_k, cache=cache)
  return _constrain(cache, mesh)


@functools.partial(jax.jit, static_argnames=("graphdef", "sea_k", "mesh"),
                   donate_argnames=("cache",))
def _decode(graphdef, state, tokens, cache, key, step, temperature, top_p, *, sea_k, mesh):
  """tokens (N,) after the cache's slots -> (next tokens (N,), their logits (N, V), cache)."""
  TRACES["decode"] += 1
  model = nnx.merge(graphdef, state)
  with shd.ambient(mesh):
    out, cache = model(tokens[:, None], None, sea_k=sea_k, cache=cache)
  logits = out.logits[:, 0]
  tokens = sample(logits, jax.random.fold_in(key, step), temperature, top_p)
  return tokens, logits, _constrain(cache, mesh)


# --- the loop -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Step:
  """One new token per row: tokens (N,) int32 (a finished row's are meaningless), the logits
  (N, V) fp32 they were drawn from, done (N,) bool (the row has produced its EOS, maybe now),
  seconds: this step's wall time, compilation excluded."""
  index: int
  tokens: np.ndarray
  logits: jax.Array
  done: np.ndarray
  seconds: float


def _pad_id(config) -> int:
  pad = getattr(config, "pad_token_id", None)
  return int(pad) if pad is not None and 0 <= pad < config.vocab_size else 0


def _batch(prompts, mesh: Mesh | None) -> list[list[int]]:
  """The prompts, the last repeated until the batch divides the mesh's data x fsdp size."""
  rows = [list(map(int, p)) for p in prompts]
  per_step = 1 if mesh is None else shd.batch_shards(mesh)
  return rows + [rows[-1]] * (-len(rows) % per_step)


def _put(array: np.ndarray, mesh: Mesh | None, state) -> jax.Array:
  """On the batch sharding of `mesh`, else on the model's device (replicated over its mesh if
  it has one); committed either way, as the steps' outputs are, so the second step reuses the
  first one's executable."""
  if mesh is not None:
    return jax.device_put(array, shd.batch_sharding(mesh, array.ndim))
  where = getattr(jax.tree.leaves(state)[0], "sharding", None)
  if isinstance(where, NamedSharding):
    return jax.device_put(array, NamedSharding(where.mesh, P()))
  devices = sorted(where.device_set, key=lambda d: d.id) if where is not None else jax.devices()
  return jax.device_put(array, devices[0])


def _cached_steps(graphdef, state, config, rows, max_new_tokens, key, knobs, sea_k, mesh):
  """The prefill writes every prompt token but the last; the decode step takes the last one
  (step 0: the first new token) and then each new token -> (tokens, logits, seconds) per
  step, step 0's seconds including the prefill."""
  P_len = max(len(r) for r in rows)
  ids = np.full((len(rows), P_len), _pad_id(config), np.int32)
  mask = np.zeros((len(rows), P_len), np.int32)
  for n, r in enumerate(rows):  # left padding, as Hugging Face pads for generation
    ids[n, P_len - len(r):] = r
    mask[n, P_len - len(r):] = 1
  head, head_mask = _put(ids[:, :-1], mesh, state), _put(mask[:, :-1], mesh, state)
  tokens = _put(ids[:, -1], mesh, state)  # every row's last column is real (left padding)
  static = dict(max_len=P_len - 1 + max_new_tokens, sea_k=sea_k, mesh=mesh)
  _prefill.lower(graphdef, state, head, head_mask, **static).compile()  # compiles untimed
  start = time.perf_counter()
  cache = jax.block_until_ready(_prefill(graphdef, state, head, head_mask, **static))
  prefill_s = time.perf_counter() - start
  _decode.lower(graphdef, state, tokens, cache, key, 0, *knobs, sea_k=sea_k, mesh=mesh).compile()
  for i in range(max_new_tokens):
    start = time.perf_counter()
    tokens, logits, cache = _decode(graphdef, state, tokens, cache, key, i, *knobs, sea_k=sea_k,
                                    mesh=mesh)
    host = np.asarray(tokens)  # waits for the step
    yield host, logits, time.perf_counter() - start + (prefill_s if i == 0 else 0.0)


def stream(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
           temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
           sea_k: int | None = None, eos_token_ids: Sequence[int] | None = None,
           mesh: Mesh | None = None) -> Iterator[Step]:
  """Generates for a batch of token-id prompts (any lengths), one `Step` per new token, until
  every row has produced an EOS id (default: the config's) or after max_new_tokens.

  sea_k: SEA's keys per query per head (None = the model's k). mesh: the batch (and the cache)
  is split over its data x fsdp axes (the model should be loaded on the same mesh).
  """
  config = model.config
  check_settings(max_new_tokens, temperature, top_p)
  check_prompts(prompts, config, max_new_tokens)
  eos = np.asarray(eos_ids(config) if eos_token_ids is None else tuple(eos_token_ids), np.int64)
  graphdef, state = nnx.split(model)
  rows = _batch(prompts, mesh)
  key = jax.random.key(seed)
  knobs = (jnp.float32(temperature), jnp.float32(top_p))
  steps = _cached_steps(graphdef, state, config, rows, max_new_tokens, key, knobs, sea_k, mesh)
  done = np.zeros(len(prompts), bool)
  for index, (tokens, logits, seconds) in enumerate(steps):
    if len(rows) > len(prompts):  # the mesh's filler rows
      tokens, logits = tokens[:len(prompts)], logits[:len(prompts)]
    done = done | np.isin(tokens, eos)
    yield Step(index=index, tokens=tokens, logits=logits, done=done.copy(), seconds=seconds)
    if done.all():
      return


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             sea_k: int | None = None, eos_token_ids: Sequence[int] | None = None,
             mesh: Mesh | None = None) -> list[list[int]]:
  """The new token ids of each prompt, up to and including its first EOS (see `stream`)."""
  out: list[list[int]] = [[] for _ in prompts]
  finished = np.zeros(len(prompts), bool)
  for step in stream(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_p=top_p, seed=seed, sea_k=sea_k, eos_token_ids=eos_token_ids,
                     mesh=mesh):
    for n in np.flatnonzero(~finished):
      out[n].append(int(step.tokens[n]))
    finished = step.done
  return out


# --- the command ----------------------------------------------------------------------------------

class _TextStream:
  """Prints the decoded new text to stderr as it grows (whole characters only)."""

  def __init__(self, tokenizer):
    self.tokenizer, self.ids, self.shown = tokenizer, [], ""

  def add(self, token: int) -> None:
    self.ids.append(token)
    text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
    if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
      return
    if text.startswith(self.shown):
      print(text[len(self.shown):], end="", file=sys.stderr, flush=True)
    self.shown = text


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m sea_jax.generate",
      description="Generate text with a model folder, a Hugging Face folder or a hub id (any "
                  "family). The prompt is encoded by the model's tokenizer as transformers "
                  "encodes for generation, i.e. with its special tokens (OPT's tokenizer "
                  "prepends </s>). The new text streams to stderr; the last stdout line is one "
                  "JSON object. Every model decodes with a KV cache; SEA layers attend to the "
                  "keys each new row keeps only.")
  p.add_argument("--model", required=True, help="model folder, Hugging Face folder or hub id")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", help="the prompt text")
  src.add_argument("--prompt-file", help="a UTF-8 file whose contents are the prompt (verbatim)")
  p.add_argument("--max-new-tokens", type=int, default=32,
                 help="stop after this many new tokens, or at the model's EOS "
                      "(default: %(default)s)")
  p.add_argument("--temperature", type=float, default=0.0,
                 help="0 = greedy; > 0 samples (default: %(default)s)")
  p.add_argument("--top-p", type=float, default=1.0,
                 help="nucleus mass kept when sampling, in (0, 1] (default: %(default)s)")
  p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: %(default)s)")
  add_model_flags(p, "attention", "sea_k", "dtype", "mesh",
                  dtype=dict(help="compute dtype (default: the model's)"),
                  mesh=dict(help="device mesh, e.g. data=2 or data=2,tensor=2: the model's "
                                 "parameters and the cache are sharded by the logical-axis "
                                 "table (default: one device)"))
  add_debug_flag(p)
  return p




def _run(args) -> int:
  from sea_jax import checkpoint, data
  from sea_jax.evaluate import host_peak_rss, peak_device_memory
  check_settings(args.max_new_tokens, args.temperature, args.top_p)
  check_model_flags(args)
  if args.prompt is not None:
    text = args.prompt
  else:
    text = data.read_text_file(args.prompt_file, "--prompt-file")
  if not text:
    raise GenerateError("the prompt is empty")
  config = checkpoint.apply_overrides(checkpoint.stored_config(args.model), **model_overrides(args))
  tokenizer = checkpoint.model_tokenizer(args.model)
  checkpoint.check_tokenizer_fits(tokenizer, config, args.model)
  prompt = [int(t) for t in tokenizer(text)["input_ids"]]
  check_prompts([prompt], config, args.max_new_tokens)  # before any weight is read
  if config.attention != "sea" and args.sea_k is not None:
    print(f"note: --sea-k has no effect on {config.attention} attention", file=sys.stderr)
  mesh = shd.make_mesh(args.mesh) if args.mesh else None
  model = checkpoint.load_pretrained(args.model, mesh, **model_overrides(args))
  shown = _TextStream(tokenizer)
  new, decode_s, prefill_s, stop = [], 0.0, 0.0, "length"
  for step in stream(model, [prompt], max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                     sea_k=args.sea_k, mesh=mesh):
    new.append(int(step.tokens[0]))
    shown.add(new[-1])
    if step.index == 0:
      prefill_s = step.seconds
    else:
      decode_s += step.seconds
    if step.done[0]:
      stop = "eos"
  print(file=sys.stderr, flush=True)
  cfg = model.config
  line = {
      "model": args.model, "model_type": getattr(cfg, "model_type", cfg.family),
      "prompt_tokens": len(prompt), "new_tokens": new,
      "text": tokenizer.decode(new, skip_special_tokens=True), "stop": stop,
      "attention": cfg.attention,
      "sea_k": (args.sea_k or cfg.sea.k) if cfg.attention == "sea" else None,
      "dtype": cfg.dtype, "temperature": args.temperature,
      "top_p": args.top_p, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
      "prefill_seconds": round(prefill_s, 4), "decode_seconds": round(decode_s, 4),
      "tokens_per_s": (len(new) - 1) / decode_s if decode_s > 0 else None,
      "peak_memory_bytes": peak_device_memory(), "host_peak_rss_bytes": host_peak_rss(),
      "backend": jax.default_backend(), "mesh": dict(mesh.shape) if mesh is not None else None,
  }
  print(json.dumps(line), flush=True)
  return 0


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  return run_command(lambda: _run(args), debug=args.debug)


if __name__ == "__main__":
  sys.exit(main())
