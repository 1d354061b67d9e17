"""WikiText-2 perplexity of a causal LM (OPT or Llama family; dense, SEA or Performer), jitted and sharded.

ppl = exp(mean over windows of the window's mean next-token cross-entropy), over non-overlapping
windows from token 0 with the last partial window dropped (SEA_SPEC §4).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource
import sys
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sea_jax import bundle, flags
from sea_jax.decoder import lm_logits
from sea_jax import sharding as shd


LOSS_ROWS = 512  # positions whose (rows, V) logits exist at once in `window_losses`


def window_losses(model: nnx.Module, windows: jax.Array, sea_k: int | None) -> jax.Array:
  """windows (B, T) int -> (B,) mean next-token cross-entropy of each window (fp32), the whole
  model in one traced function (what `LayerwiseLosses` computes a layer at a time)."""
  out = model(windows, sea_k=sea_k, output_hidden_states=True)
  return head_losses(model, out.hidden_states[-1], windows)


def head_losses(model: nnx.Module, h: jax.Array, windows: jax.Array) -> jax.Array:
  """h (B, T, E) the last hidden state (after the final norm), windows (B, T) -> (B,) losses.

  The logits are formed LOSS_ROWS positions at a time (the model's own logits go unused and
  XLA drops them), so the head costs O(LOSS_ROWS·V) memory instead of O(T·V): at T = 8,192
  and SmolLM2's 49,152 tokens that is 0.1 GB, not 1.6 GB."""
  h = h[:, :-1]
  targets = windows[:, 1:]
  B, n = targets.shape
  rows = min(LOSS_ROWS, n)
  chunks = -(-n // rows)
  pad = chunks * rows - n
  h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(B, chunks, rows, -1)
  tg = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, chunks, rows)
  table = model.head_table()

  def chunk_losses(args):
    h_c, t_c = args  # (B, rows, E), (B, rows)
    logits = lm_logits(h_c, table, h_c.dtype).astype(jnp.float32)
    picked = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked

  nll = jax.lax.map(chunk_losses, (jnp.moveaxis(h, 1, 0), jnp.moveaxis(tg, 1, 0)))
  nll = jnp.moveaxis(nll, 0, 1).reshape(B, chunks * rows)[:, :n]
  return jnp.mean(nll, axis=-1)


def run_layer(layer: nnx.Module, h: jax.Array, args: tuple, sea_k) -> jax.Array:
  """One decoder layer on h (N,T,D) and the family's per-layer inputs (`model.embed`)."""
  return layer(h, *args, sea_k=sea_k)[0]


class LayerwiseLosses:
  """`window_losses` run as three compiled programs: the embedding, one decoder layer, and the
  final norm with the chunked head. Layers of one structure (every layer of a model, unless
  `attention_layers` mixes kinds) share one compiled layer, run once per layer with that
  layer's weights, so compiling costs one layer, not the model's depth: the SmolLM2 student's
  eval step at T = 1,024 is 172k HLO instructions in one program, 5.8k in its layer.

  k: None (the static `static_k` serves) or a traced int32 (a k sweep's one compile).
  Hidden states between layers are constrained to the batch sharding of `mesh`, so one
  executable serves every layer. `temp_bytes`: the largest compiled temp of the programs.
  """

  def __init__(self, model: nnx.Module, mesh: Mesh, static_k: int | None):
    self.mesh, self.static_k = mesh, static_k
    self.graphdef, self.state = nnx.split(model)
    self.layers = [nnx.split(layer) for layer in model.layers]
    self._programs = None  # (embed, {layer graphdef: layer}, head), from `compile`

  def _on_batch(self, h: jax.Array) -> jax.Array:
    return jax.lax.with_sharding_constraint(h, shd.batch_sharding(self.mesh, h.ndim))

  def _embed(self, state, windows):
    N, T = windows.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (N, T))
    with shd.ambient(self.mesh):
      h, args = nnx.merge(self.graphdef, state).embed(windows, positions)
    return self._on_batch(h), args

  def _layer(self, graphdef, state, h, args, k):
    with shd.ambient(self.mesh):  # kernels and the tile list run per device shard
      h = run_layer(nnx.merge(graphdef, state), h, args, self.static_k if k is None else k)
    return self._on_batch(h)

  def _head(self, state, h, windows):
    with shd.ambient(self.mesh):
      model = nnx.merge(self.graphdef, state)
      return head_losses(model, model.final_norm(h), windows)

  def compile(self, windows: jax.Array, k) -> None:
    """Compiles the programs for batches of `windows`' shape (running the embedding once);
    every later call takes batches of that shape (`perplexities` pads the last one)."""
    embed = jax.jit(self._embed).lower(self.state, windows).compile()
    h, args = embed(self.state, windows)
    layer = {}
    for graphdef, state in self.layers:  # one program per distinct layer structure
      if graphdef not in layer:
        layer[graphdef] = jax.jit(self._layer, static_argnums=0).lower(
            graphdef, state, h, args, k).compile()
    head = jax.jit(self._head).lower(self.state, h, windows).compile()
    self._programs = (embed, layer, head)

  def __call__(self, windows: jax.Array, k) -> jax.Array:
    """windows (B, T) -> (B,) mean losses, as `window_losses(model, windows, k)`."""
    if self._programs is None:
      self.compile(windows, k)
    embed, layer, head = self._programs
    h, args = embed(self.state, windows)
    for graphdef, state in self.layers:
      h = layer[graphdef](state, h, args, k)
    return head(self.state, h, windows)

  def temp_bytes(self) -> int:
    embed, layer, head = self._programs
    return max(c.memory_analysis().temp_size_in_bytes for c in (embed, head, *layer.values()))


@dataclasses.dataclass
class EvalResult:
  perplexity: float
  mean_nll: float
  windows: int
  seconds: float


def peak_device_memory() -> int | None:
  """Peak bytes in use on the local devices where the backend reports it (GPU/TPU), else None."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - CPU backends may raise or return None
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def host_peak_rss() -> int:
  """Peak resident memory of this process in bytes."""
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def perplexity(model: nnx.Module, windows: np.ndarray, *, batch_size: int, mesh: Mesh,
               sea_k: int | None = None, progress: bool = True, desc: str = "eval") -> EvalResult:
  """Perplexity over `windows` (W, T); batches are split over the mesh's data x fsdp axes."""
  [(_, result)] = perplexities(model, windows, [sea_k], batch_size=batch_size, mesh=mesh,
                               progress=progress, desc=desc)
  return result


def perplexities(model: nnx.Module, windows: np.ndarray, ks: Sequence[int | None], *,
                 batch_size: int, mesh: Mesh, progress: bool = True,
                 desc: str = "eval") -> Iterator[tuple[int | None, EvalResult]]:
  """(k, perplexity over `windows` (W, T) at SEA k) for each k of `ks`, as each is done.

  One compile serves the whole list (`LayerwiseLosses`: the embedding, one layer, the head).
  A single k (None: the model's own) is static in the eval step; several are one traced int32
  argument, whose grouped top-k is the exact radix select:
  the same kept cells as the static path, so the same perplexities (tests/test_sea_model.py)."""
  from tqdm import tqdm
  num_windows = windows.shape[0]
  per_step = shd.batch_shards(mesh)
  if batch_size % per_step:
    raise ValueError(f"--batch-size {batch_size} must be a multiple of the data x fsdp mesh "
                     f"size {per_step}")
  step = LayerwiseLosses(model, mesh, ks[0] if len(ks) == 1 else None)

  def k_argument(k):
    return None if len(ks) == 1 else jnp.int32(k)

  batch_sharding = shd.batch_sharding(mesh)

  def global_batch(first: int) -> tuple[jax.Array, int]:
    batch = windows[first:first + batch_size]
    real = batch.shape[0]
    if real < batch_size:  # pad the last batch by repeating windows; their losses are dropped
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
    return jax.make_array_from_callback(batch.shape, batch_sharding,
                                        lambda index: batch[index]), real

  # every batch has this shape, and every k is the same (static or traced) argument
  step.compile(global_batch(0)[0], k_argument(ks[0]))
  for k in ks:
    losses = []
    start = time.perf_counter()  # `seconds` counts evaluation, not compilation
    bar = tqdm(total=num_windows, desc=desc if len(ks) == 1 else f"{desc} k={k}", unit="win",
               file=sys.stderr, disable=not progress)
    for first in range(0, num_windows, batch_size):
      batch, real = global_batch(first)
      window_loss = np.asarray(jax.device_get(step(batch, k_argument(k))))[:real]
      losses.append(window_loss)
      bar.update(real)
      bar.set_postfix(ppl=f"{math.exp(float(np.concatenate(losses).mean())):.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    mean_nll = float(np.concatenate(losses).astype(np.float64).mean())
    yield k, EvalResult(perplexity=math.exp(mean_nll), mean_nll=mean_nll, windows=num_windows,
                        seconds=seconds)


def parse_k_list(text: str | None) -> list[int | None]:
  """"16,32,64" -> [16, 32, 64]; None -> [None] (the model's own k). Each k must be >= 1."""
  values = flags.parse_k_list(text)
  if values is None:
    return [None]
  flags.check_model_flags(argparse.Namespace(sea_k=values))
  return values


def summary(result: EvalResult, **fields) -> dict:
  """The JSON line's content."""
  evaluated = fields.get("windows", result.windows) * fields["seq_len"]
  return {
      "perplexity": result.perplexity,
      "mean_nll": result.mean_nll,
      **fields,
      "evaluated_tokens": evaluated,
      "seconds": round(result.seconds, 3),
      "tokens_per_s": evaluated / result.seconds if result.seconds > 0 else None,
      "peak_memory_bytes": peak_device_memory(),
      "host_peak_rss_bytes": host_peak_rss(),
  }


def window_slice(windows: np.ndarray, max_windows: int | None) -> np.ndarray:
  if max_windows is None:
    return windows
  if max_windows < 1:
    raise ValueError(f"--max-windows must be >= 1, got {max_windows}")
  return windows[:max_windows]


__all__: Sequence[str] = ("perplexity", "window_losses", "parse_k_list", "summary", "EvalResult")


def check_args(args) -> dict[str, str]:
  """Flag checks that need no model (fail fast, before anything is loaded); returns the
  contents of each --text-file, read once here."""
  if args.batch_size is not None and args.batch_size < 1:
    raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
  if args.max_windows is not None and args.max_windows < 1:
    raise ValueError(f"--max-windows must be >= 1, got {args.max_windows}")
  if args.seq_len is not None and args.seq_len < 2:
    raise ValueError(f"--seq-len must be at least 2, got {args.seq_len}")
  flags.check_model_flags(args)
  return {path: read_text_file(path) for path in args.text_file or ()}


def read_text_file(path: str) -> str:
  """--text-file's contents (`data.read_text_file`)."""
  from sea_jax.data import read_text_file as read
  return read(path, "--text-file")


def check_sea_K(path: str, sea_K: int | None) -> None:
  """--sea-K only shapes fresh SEA modules: a SEA student keeps the K it was trained with."""
  from sea_jax import checkpoint
  from sea_jax.config import ConfigError, load_config
  if sea_K is None or not checkpoint.is_model_folder(path):
    return
  cfg = load_config(path)
  if cfg.attention == "sea" and cfg.sea.K != sea_K:
    raise ConfigError(f"{path} is a SEA student trained with K = {cfg.sea.K}; --sea-K {sea_K} "
                      "applies only to fresh SEA modules on a dense model (use --sea-k to "
                      "change k at inference)")


def _sources(args) -> list[tuple[str, str | None]]:
  """(name, path) of each text to score: the protocol's WikiText-2 split, or the text files."""
  if args.text_file:
    return [(path, path) for path in args.text_file]
  return [(args.protocol, None)]


def _source_tokens(tokenizer, args, path: str | None, texts: dict[str, str]):
  from sea_jax import data
  if path is None:
    return data.protocol_tokens(tokenizer, args.protocol, source=args.data_source)
  return data.encode(tokenizer, texts[path])


def run_eval(args) -> int:
  """eval.py: `_run_eval` under the one error policy (sea_jax.errors); returns the exit code."""
  from sea_jax.errors import run_command
  return run_command(lambda: _run_eval(args), debug=getattr(args, "debug", False),
                     user_errors=(ValueError,))


def _run_eval(args) -> int:
  """Evaluates each model (and each k) and prints one JSON line per run."""
  import json
  from sea_jax import checkpoint, data
  from sea_jax.config import ConfigError
  texts = check_args(args)
  ks = parse_k_list(args.sea_k)
  paths = args.model or bundle.bundled_model_paths()
  if not args.model:  # the default job: the student's window, a documented slice of the split
    args.seq_len = args.seq_len or bundle.SEQ_LEN
    if args.max_windows is None and not args.all_windows:
      args.max_windows = bundle.WINDOWS
      print(f"note: the default run scores the first {bundle.WINDOWS} windows of "
            f"{args.seq_len} tokens; --all-windows scores the whole split", file=sys.stderr)
  mesh = shd.make_mesh(args.mesh)
  token_cache: dict[str, np.ndarray] = {}
  for path in paths:
    check_sea_K(path, args.sea_K)
    model = checkpoint.load_pretrained(path, mesh, **flags.model_overrides(args))
    cfg = model.config
    seq_len = args.seq_len or min(cfg.max_position_embeddings, 2048)
    if seq_len > cfg.max_position_embeddings:
      raise ConfigError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings "
                        f"{cfg.max_position_embeddings}")
    if cfg.attention != "sea" and args.sea_k is not None:
      print(f"note: --sea-k has no effect on {cfg.attention} attention ({path})",
            file=sys.stderr)
    for k in ks:
      if cfg.attention == "sea" and k is not None and k >= seq_len:
        print(f"note: --sea-k {k} >= --seq-len {seq_len}: every visible key is kept",
              file=sys.stderr)
    tokenizer = checkpoint.model_tokenizer(path)
    checkpoint.check_tokenizer_fits(tokenizer, cfg, path)
    tok_name = data.tokenizer_name(tokenizer)
    for source, text_path in _sources(args):
      key = f"{data.tokenizer_fingerprint(tokenizer)}:{source}:{args.data_source}"
      if key not in token_cache:
        token_cache[key] = _source_tokens(tokenizer, args, text_path, texts)
      tokens = token_cache[key]
      if tokens.size and int(tokens.max()) >= cfg.vocab_size:
        raise ConfigError(f"the tokenizer produces ids up to {int(tokens.max())} but the "
                          f"model's vocab_size is {cfg.vocab_size}: tokenizer and model do "
                          "not match")
      if tokens.size < seq_len:
        what = f"--text-file {text_path}" if text_path else f"the {source} split"
        raise ValueError(f"{what} has {tokens.size} tokens, shorter than one window of "
                         f"--seq-len {seq_len}")
      windows = window_slice(data.eval_windows(tokens, seq_len), args.max_windows)
      batch_size = args.batch_size or shd.batch_shards(mesh)
      if text_path is None:
        where = dict(protocol=args.protocol, split=data.PROTOCOLS[args.protocol].split,
                     text=None, bos=data.protocol_bos(tokenizer, args.protocol))
      else:
        where = dict(protocol="text-file", split=None, text=text_path, bos=None)
      sweep = perplexities(model, windows, ks if cfg.attention == "sea" else [None],
                           batch_size=batch_size, mesh=mesh, progress=not args.no_progress,
                           desc=f"{os.path.basename(os.path.normpath(path))} {cfg.attention}")
      for k, result in sweep:  # one line per k for SEA only
        sea_k = (k if k is not None else cfg.sea.k) if cfg.attention == "sea" else None
        line = summary(result, model=path, model_type=getattr(cfg, "model_type", cfg.family),
                       **where, tokenizer=tok_name, seq_len=seq_len,
                       tokens=int(tokens.size), windows=int(windows.shape[0]),
                       attention=cfg.attention, sea_k=sea_k,
                       sea_K=cfg.sea.K if cfg.attention == "sea" else None,
                       dtype=cfg.dtype, batch_size=batch_size, devices=len(mesh.devices.flat),
                       backend=jax.default_backend())
        print(json.dumps(line), flush=True)
  return 0


def build_parser() -> argparse.ArgumentParser:
  """eval.py's flags (also `sea-jax-eval`, `python -m sea_jax.evaluate`)."""
  from sea_jax import data
  from sea_jax.errors import add_debug_flag
  p = argparse.ArgumentParser(
      prog="eval.py", description="WikiText-2 (or any text's) perplexity of a dense / SEA / "
      "Performer model (OPT, Llama family, GGUF). One JSON line per evaluation on stdout (the "
      "last one the student's by default); a progress bar on stderr.")
  p.add_argument("--model", action="append",
                 help="sea-jax model folder, GGUF file or short name (smollm2-135m), Hugging "
                      "Face folder, or hub id (repeatable). Default: SmolLM2-135M (the "
                      "installed GGUF) and its bundled SEA student, at --seq-len 1024")
  p.add_argument("--protocol", default="sea", choices=tuple(data.PROTOCOLS),
                 help="sea: validation split, no BOS (the SEA paper); gptq: test split, one "
                      "leading BOS (the tokenizer's; OPT's </s>: GPTQ/SparseGPT numbers). "
                      "Default: sea")
  flags.add_model_flags(
      p, "attention", "sea_k", "sea_K", "sea_pooled_keys", "sparse_impl", "dense_impl", "dtype",
      "mesh",
      sea_k=dict(type=str, metavar="k[,k...]", help="SEA keys per query per head; a comma "
                 "list sweeps k (one JSON line each, one compile for the list). Default: the "
                 "model's k"))
  p.add_argument("--seq-len", type=int,
                 help="window length (default: the model's max positions, at most 2048)")
  p.add_argument("--batch-size", type=int, help="windows per step (default: data x fsdp size)")
  p.add_argument("--text-file", action="append", metavar="PATH",
                 help="perplexity of this UTF-8 text file instead of WikiText-2 (repeatable): "
                      "non-overlapping windows of --seq-len from token 0, last partial window "
                      "dropped, no special tokens")
  p.add_argument("--max-windows", type=int, help="evaluate only the first N windows (quick "
                                                  "checks; the default run without --model: "
                                                  f"the first {bundle.WINDOWS})")
  p.add_argument("--all-windows", action="store_true",
                 help="the default run without --model: score the whole split (261 windows "
                      "of 1,024 tokens of validation: about 45 minutes on 2 cores)")
  p.add_argument("--data-source", choices=("auto", "hf", "bundled"), default="auto",
                 help="WikiText-2 from `datasets` (hf), the bundled raw files, or auto")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  add_debug_flag(p)
  return p


def main(argv: list[str] | None = None) -> int:
  """eval.py / sea-jax-eval: parse, evaluate, exit code."""
  return run_eval(build_parser().parse_args(argv))


if __name__ == "__main__":
  sys.exit(main())
