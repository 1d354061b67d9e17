"""Pictures of SEA attention (SEA_SPEC §1.7): teacher attention, estimate, kept mask, overlap.

  python -m sea_jax.visualize --model PATH --text "..." --out DIR [--teacher PATH]
      [--layers 0,3] [--heads 0,1] [--sea-k K] [--max-tokens 256] [--attention sea]
      [--save-arrays]

For each chosen (layer, head) it writes, into DIR:
  layer{L}_head{H}_teacher.png   causal softmax(q·kᵀ) (T,T): the teacher's q, k with --teacher,
                                 else the student's own q, k (the title says which)
  layer{L}_head{H}_estimate.png  Â up-sampled to (T,T): Â[t, bin_t(s)] / |bin_t(s)| for s <= t,
                                 i.e. each bin's probability spread evenly over the keys it
                                 stands for (SEA_SPEC §1.3), so every row sums to 1
  layer{L}_head{H}_mask.png      the kept sparse mask, `expand_mask` of M̂ (T,T)
  layer{L}_head{H}_overlap.png   RGB: red = teacher attention (row-normalised, sqrt), green =
                                 kept mask (yellow = kept and attended, red = attended but
                                 dropped); caption: teacher mass covered by the mask
  layer{L}_head{H}_panel.png     the four above as one 2×2 figure
  summary.json                   per (layer, head): kept keys per row, coverage, file names
With --save-arrays each picture's array is also saved beside it as `.npy`.

This is a picture tool: it materialises (T,T) maps, so T is capped at 1024 tokens.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import warnings

import numpy as np

from sea_jax.errors import UserError, add_debug_flag, run_command
from sea_jax.flags import add_model_flags, check_model_flags

MAX_TOKENS_CAP = 1024
KINDS = ("teacher", "estimate", "mask", "overlap")
TOKEN_TICKS_MAX_T = 32  # label the axes with the tokens themselves up to this length


class VisualizeError(UserError, ValueError):
  """A bad input to the visualiser (reported as one line, exit status 2)."""


# ---------------------------------------------------------------------------- maps


def upsample_estimate(est_probs, T: int | None = None, *, row_offset: int = 0) -> np.ndarray:
  """Â (…,R,K) -> (…,R,T) float32: out[t, s] = Â[t, bin_t(s)] / |bin_t(s)| for s <= t, else 0.

  Row i is query t = row_offset + i (R = T, row_offset = 0 for the whole matrix). Each bin's
  probability is spread evenly over the keys it covers (bins per SEA_SPEC §1.3), so a row of
  the result sums to the mass Â puts on non-empty bins (below 1 in rows with t + 1 < K,
  where `masked_bin_softmax` leaves the empty bins' share out rather than renormalising).
  """
  from sea_jax.ops.bins import bin_bounds, bin_index
  est = np.asarray(est_probs, np.float32)
  R, K = est.shape[-2:]
  T = row_offset + R if T is None else T
  if row_offset + R > T:
    raise ValueError(f"rows {row_offset}..{row_offset + R - 1} do not fit in T={T}")
  t = np.arange(row_offset, row_offset + R)[:, None]
  s = np.arange(T)[None, :]
  bins = np.clip(np.asarray(bin_index(t, s, K)), 0, K - 1)  # (R, T)
  starts, ends = (np.asarray(a)[row_offset:row_offset + R] for a in bin_bounds(row_offset + R, K))
  counts = np.maximum(ends - starts, 1).astype(np.float32)  # (R, K); empty bins hold no keys
  per_key = est / counts  # (…, R, K)
  idx = np.broadcast_to(bins, (*est.shape[:-2], R, T))
  out = np.take_along_axis(per_key, idx, axis=-1)
  return np.where(s <= t, out, 0.0).astype(np.float32)


def causal_softmax(q, k) -> np.ndarray:
  """q (pre-scaled), k (…,T,d) -> (…,T,T) float32 causal softmax(q·kᵀ), 0 above diagonal."""
  import jax
  import jax.numpy as jnp
  from sea_jax.ops.dense import NEG_INF
  T = q.shape[-2]
  q, k = jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)
  scores = jnp.einsum("...td,...sd->...ts", q, k)
  causal = jnp.tril(jnp.ones((T, T), bool))
  probs = jax.nn.softmax(jnp.where(causal, scores, NEG_INF), axis=-1)
  return np.asarray(jnp.where(causal, probs, 0.0), np.float32)


def sea_layers(config) -> list[int]:
  """Indices of the decoder layers whose attention is SEA."""
  return [i for i in range(config.num_hidden_layers) if config.attention_kind(i) == "sea"]


@functools.cache
def _forward():
  """nnx.jit of (model, ids (N,T), sea_k) -> attn_aux, built once per process."""
  from flax import nnx
  return nnx.jit(lambda m, x, k: m(x, sea_k=k, return_attn_aux=True).attn_aux,
                 static_argnums=2)


def attention_maps(model, ids, *, sea_k: int | None = None, teacher=None,
                   layers=None) -> dict[int, dict]:
  """Runs `model` (and the dense `teacher`, if given) on one sequence; (T,T) maps per SEA layer.

  ids: (T,) or (1,T) int. layers: which SEA layers (None = all). Returns {layer: dict} with
    teacher (H,T,T) float32: causal softmax of the teacher's q·kᵀ (the student's own without one)
    teacher_source: "teacher" or "student"
    estimate (H,T,T) float32: `upsample_estimate` of Â; est_probs (H,T,K): Â itself
    mask (H,T,T) bool: `expand_mask` of compressed_mask (H,T,K)
    kept_per_row (H,) mean kept keys per query row; coverage (H,) teacher mass inside the mask,
      mean over rows
  """
  import jax.numpy as jnp
  from sea_jax.ops.dense import repeat_kv
  from sea_jax.ops.sparse import expand_mask
  ids = jnp.asarray(ids, jnp.int32).reshape(1, -1)
  T = ids.shape[1]
  chosen = sea_layers(model.config) if layers is None else list(layers)
  for layer in chosen:
    if model.config.attention_kind(layer) != "sea":
      raise VisualizeError(f"layer {layer} is not a SEA layer")
  aux = _forward()(model, ids, sea_k)
  teacher_aux = _forward()(teacher, ids, None) if teacher is not None else None
  maps = {}
  for layer in chosen:
    a = aux[layer]
    src = teacher_aux[layer] if teacher_aux is not None else a
    q = src["q"][0]
    attn = causal_softmax(q, repeat_kv(src["k"], q.shape[0])[0])
    mask = np.asarray(expand_mask(a["compressed_mask"], T))[0]
    maps[layer] = {
        "teacher": attn,
        "teacher_source": "teacher" if teacher_aux is not None else "student",
        "estimate": upsample_estimate(a["est_probs"][0], T),
        "est_probs": np.asarray(a["est_probs"][0], np.float32),
        "compressed_mask": np.asarray(a["compressed_mask"][0]),
        "mask": mask,
        "kept_per_row": mask.sum(-1).mean(-1).astype(np.float64),
        "coverage": (attn * mask).sum(-1).mean(-1).astype(np.float64),
    }
  return maps


# ---------------------------------------------------------------------------- pictures


def overlap_rgb(attn: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """(T,T) attention and kept mask -> (T,T,3) float32 RGB.

  red = sqrt(A[t,s] / max_s A[t,s]) (each row's peak at full brightness), green = kept,
  blue = 0; above the diagonal (never visible) mid grey.
  """
  T = attn.shape[-1]
  peak = np.maximum(attn.max(-1, keepdims=True), 1e-30)
  rgb = np.zeros((T, T, 3), np.float32)
  rgb[..., 0] = np.sqrt(np.clip(attn / peak, 0.0, 1.0))
  rgb[..., 1] = mask.astype(np.float32)
  rgb[np.triu(np.ones((T, T), bool), 1)] = 0.5
  return rgb


def _log_norm(*maps):
  from matplotlib.colors import LogNorm
  values = np.concatenate([m[m > 0].ravel() for m in maps] + [np.ones(1, np.float32)])
  vmax = float(values.max())
  return LogNorm(vmin=max(float(values.min()), vmax * 1e-5), vmax=vmax, clip=True)


def _upper(T: int) -> np.ndarray:
  return np.triu(np.ones((T, T), bool), 1)


def _axes(ax, T: int, tokens):
  ax.set_xlabel("key s")
  ax.set_ylabel("query t")
  if tokens is not None and T <= TOKEN_TICKS_MAX_T:
    ax.set_xticks(range(T), tokens, rotation=90, fontsize=6)
    ax.set_yticks(range(T), tokens, fontsize=6)


def _draw(fig, ax, kind: str, arrays: dict, norm, title: str, tokens) -> None:
  """One picture of `kind` on `ax` with its colorbar (or legend, for the RGB overlap)."""
  import matplotlib
  from matplotlib.colors import ListedColormap
  from matplotlib.patches import Patch
  T = arrays["mask"].shape[-1]
  hidden = _upper(T)
  if kind in ("teacher", "estimate"):
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    im = ax.imshow(np.ma.masked_array(arrays[kind], hidden), cmap=cmap, norm=norm,
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="probability (log scale)")
  elif kind == "mask":
    cmap = ListedColormap(["white", "navy"]).with_extremes(bad="0.85")
    im = ax.imshow(np.ma.masked_array(arrays["mask"].astype(np.float32), hidden), cmap=cmap,
                   vmin=0, vmax=1, interpolation="nearest")
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, ticks=[0.25, 0.75])
    bar.ax.set_yticklabels(["dropped", "kept"])
  else:
    ax.imshow(arrays["overlap"], interpolation="nearest")
    ax.legend(handles=[Patch(color=(1, 1, 0), label="attended, kept"),
                       Patch(color=(1, 0, 0), label="attended, dropped"),
                       Patch(color=(0, 1, 0), label="kept, little attention")],
              loc="upper right", fontsize=7, framealpha=0.8)
  ax.set_title(title, fontsize=9)
  _axes(ax, T, tokens)


def render(maps: dict, layer: int, head: int, out_dir: str, *, k: int, K: int,
           tokens: list[str] | None = None, save_arrays: bool = False) -> dict:
  """Writes the four pictures and the 2×2 panel of (layer, head); returns what it drew.

  maps: `attention_maps(...)[layer]`. Returns {"files": {kind: file name}, "arrays": {kind:
  array}, "coverage": float, "kept_keys_per_row_mean": float}; arrays are (T,T) (the overlap
  (T,T,3)); the mask array is exactly `expand_mask` of the compressed mask.
  """
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib.figure import Figure
  os.makedirs(out_dir, exist_ok=True)
  attn, mask = maps["teacher"][head], maps["mask"][head]
  arrays = {"teacher": attn, "estimate": maps["estimate"][head], "mask": mask,
            "overlap": overlap_rgb(attn, mask)}
  T = attn.shape[-1]
  coverage = float(maps["coverage"][head])
  kept = float(maps["kept_per_row"][head])
  norm = _log_norm(arrays["teacher"], arrays["estimate"])
  whose = ("the teacher's q·kᵀ" if maps["teacher_source"] == "teacher"
           else "the student's own q·kᵀ (no --teacher)")
  tag = f"layer {layer} head {head}, k={k} K={K} T={T}"
  titles = {
      "teacher": f"dense attention: causal softmax of {whose}\n{tag}",
      "estimate": f"SEA estimate Â[t, bin_t(s)] / |bin| (rows sum to 1)\n{tag}",
      "mask": f"kept sparse mask ({kept:.1f} keys/row on average)\n{tag}",
      "overlap": f"teacher attention (red) vs kept mask (green)\n{tag}",
  }
  caption = f"teacher mass covered by the kept mask: {coverage:.3f} (mean over rows)"
  stem = f"layer{layer}_head{head}"
  files = {}
  for kind in KINDS:
    fig = Figure(figsize=(6.4, 5.6), dpi=120, layout="constrained")
    _draw(fig, fig.add_subplot(), kind, arrays, norm, titles[kind], tokens)
    if kind == "overlap":
      fig.supxlabel(caption, fontsize=9)
    files[kind] = f"{stem}_{kind}.png"
    fig.savefig(os.path.join(out_dir, files[kind]))
    if save_arrays:
      np.save(os.path.join(out_dir, f"{stem}_{kind}.npy"), arrays[kind])
  fig = Figure(figsize=(12.4, 11), dpi=100, layout="constrained")
  for i, kind in enumerate(KINDS):
    _draw(fig, fig.add_subplot(2, 2, i + 1), kind, arrays, norm, titles[kind], tokens)
  fig.suptitle(f"SEA attention, {tag}\n{caption}")
  files["panel"] = f"{stem}_panel.png"
  fig.savefig(os.path.join(out_dir, files["panel"]))
  return {"files": files, "arrays": arrays, "coverage": coverage,
          "kept_keys_per_row_mean": kept}


# ---------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m sea_jax.visualize",
      description="Pictures of a SEA model's attention on one text: the teacher's attention, "
                  "SEA's estimated attention Â up-sampled to T×T, the kept sparse mask and their "
                  "overlap, per chosen layer and head, plus summary.json. Materialises T×T maps: "
                  f"at most {MAX_TOKENS_CAP} tokens.")
  p.add_argument("--model", required=True, metavar="PATH",
                 help="SEA model folder (or a dense sea-jax / Hugging Face folder or hub id with "
                      "--attention sea)")
  text = p.add_mutually_exclusive_group(required=True)
  text.add_argument("--text", help="the text to look at (tokenised without special tokens)")
  text.add_argument("--text-file", metavar="PATH", help="read the text from this file instead")
  p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
  p.add_argument("--teacher", metavar="PATH",
                 help="dense teacher model: its causal softmax(q·kᵀ) on the same tokens is the "
                      "reference picture (default: the student's own q·kᵀ)")
  p.add_argument("--layers", metavar="L,L",
                 help="comma list of SEA layers, e.g. 0,3 (default: first and last SEA layer)")
  p.add_argument("--heads", metavar="H,H",
                 help="comma list of heads, e.g. 0,1 (default: head 0 and the head with the most "
                      "kept cells, per layer)")
  p.add_argument("--max-tokens", type=int, default=256, metavar="N",
                 help=f"truncate the text to this many tokens (default 256, at most "
                      f"{MAX_TOKENS_CAP})")
  add_model_flags(p, "attention", "sea_k", "sea_K",
                  attention=dict(choices=("sea",), help="give a dense checkpoint fresh, "
                                 "UNTRAINED SEA modules (pictures of an undistilled estimator)"))
  p.add_argument("--save-arrays", action="store_true",
                 help="also save each picture's array as .npy beside the PNG")
  add_debug_flag(p)
  return p


def _int_list(text: str | None, flag: str) -> list[int] | None:
  if text is None:
    return None
  try:
    values = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise VisualizeError(f"{flag} expects integers like 0,3; got {text!r}") from None
  if not values:
    raise VisualizeError(f"{flag} is empty")
  return list(dict.fromkeys(values))


VISUALIZE = "python -m sea_jax.visualize"


def _source_config(path: str):
  """The config stored at `path` (sea-jax model folder, HF folder or hub id), before overrides."""
  from sea_jax import checkpoint
  if not os.path.exists(path) and (path.startswith((".", "/")) or path.count("/") > 1):
    raise VisualizeError(f"no such model: {path}")
  return checkpoint.stored_config(path)


def _tokens(args) -> tuple[np.ndarray, bool, list[str]]:
  """(ids (T,) int32 after --max-tokens, whether truncated, one label per token)."""
  from sea_jax import checkpoint, data
  if args.text_file is not None:
    if not os.path.isfile(args.text_file):
      raise VisualizeError(f"no such text file: {args.text_file}")
    with open(args.text_file, encoding="utf-8") as f:
      text = f.read()
  else:
    text = args.text
  tokenizer = checkpoint.model_tokenizer(args.model)
  ids = data.encode(tokenizer, text)
  if ids.size == 0:
    raise VisualizeError("the text is empty after tokenisation")
  truncated = ids.size > args.max_tokens
  if truncated:
    print(f"note: text has {ids.size} tokens; using the first {args.max_tokens} (--max-tokens)",
          file=sys.stderr)
    ids = ids[:args.max_tokens]
  labels = [tokenizer.decode([int(i)]).replace("\n", "\\n") for i in ids]
  return ids, truncated, labels


def _plan(args):
  """Checks the inputs against the stored configs before anything heavy is loaded.

  Returns (overrides for `load_pretrained`, the student's config after them, layers, heads or
  None for the per-layer default).
  """
  import dataclasses
  from sea_jax.safe_write import DestinationError, check_output_folder
  try:
    check_output_folder(args.out, VISUALIZE)
  except DestinationError as e:
    raise VisualizeError(str(e)) from None
  check_model_flags(args)
  if not 1 <= args.max_tokens <= MAX_TOKENS_CAP:
    raise VisualizeError(f"--max-tokens must be in 1..{MAX_TOKENS_CAP} (this tool draws T×T "
                         f"maps), got {args.max_tokens}")
  source = _source_config(args.model)
  overrides = {}
  if args.attention == "sea":
    overrides["attention"] = "sea"
    if source.attention != "sea":
      if args.sea_K is not None:
        overrides["sea_K"] = args.sea_K
      print(f"warning: {args.model} is a {source.attention} checkpoint: its SEA modules are "
            "fresh and UNTRAINED, so the estimate and mask are not yet meaningful",
            file=sys.stderr)
  elif source.attention != "sea" or not sea_layers(source):
    raise VisualizeError(f"{args.model} has no SEA layers (attention={source.attention!r}); "
                         "pass --attention sea to draw fresh, untrained SEA modules")
  if args.sea_K is not None and "sea_K" not in overrides:
    raise VisualizeError("--sea-K only applies to --attention sea on a dense checkpoint")
  cfg = dataclasses.replace(source, attention="sea")
  available = sea_layers(cfg)
  layers = _int_list(args.layers, "--layers")
  if layers is None:
    layers = list(dict.fromkeys([available[0], available[-1]]))
  for layer in layers:
    if not 0 <= layer < cfg.num_hidden_layers:
      raise VisualizeError(f"layer {layer} out of range: the model has layers "
                           f"0..{cfg.num_hidden_layers - 1}")
    if layer not in available:
      raise VisualizeError(f"layer {layer} is not a SEA layer (SEA layers: {available})")
  heads = _int_list(args.heads, "--heads")
  H = cfg.num_attention_heads
  for head in heads or []:
    if not 0 <= head < H:
      raise VisualizeError(f"head {head} out of range: the model has heads 0..{H - 1}")
  if args.teacher is not None:
    shape = lambda c: (c.num_hidden_layers, c.num_attention_heads, c.head_dim)
    teacher = _source_config(args.teacher)
    if shape(teacher) != shape(cfg):
      raise VisualizeError(f"teacher (layers, heads, head dim) {shape(teacher)} differs from "
                           f"the student's {shape(cfg)}")
  return overrides, cfg, layers, heads


def visualize(args) -> dict:
  """The CLI's body: checks, tokenises, loads, runs, draws; returns the summary it writes."""
  from sea_jax import checkpoint
  overrides, _, layers, heads = _plan(args)
  ids, truncated, labels = _tokens(args)
  model = checkpoint.load_pretrained(args.model, **overrides)
  teacher = (checkpoint.load_pretrained(args.teacher, attention="dense")
             if args.teacher is not None else None)
  cfg = model.config
  for m in (model, teacher):
    if m is None:
      continue
    if ids.size > m.config.max_position_embeddings:
      raise VisualizeError(f"{ids.size} tokens exceed the max_position_embeddings "
                           f"{m.config.max_position_embeddings} of a model; pass --max-tokens "
                           f"{m.config.max_position_embeddings} or less")
    if int(ids.max()) >= m.config.vocab_size:
      raise VisualizeError(f"the tokenizer produces id {int(ids.max())} but a model's vocab_size "
                           f"is {m.config.vocab_size}: tokenizer and model do not match")
  k = args.sea_k if args.sea_k is not None else cfg.sea.k
  maps = attention_maps(model, ids, sea_k=k, teacher=teacher, layers=layers)
  summary = {"model": args.model, "teacher": args.teacher, "tokens": int(ids.size),
             "truncated": truncated, "k": k, "K": cfg.sea.K,
             "teacher_source": "teacher" if teacher is not None else "student",
             "maps": {}}
  from sea_jax.safe_write import RunLock, claim_output_folder
  claim_output_folder(args.out, VISUALIZE)
  lock = RunLock(args.out, VISUALIZE).acquire()  # one writer per folder; released at exit
  for layer in layers:
    chosen = heads
    if chosen is None:
      busiest = int(np.argmax(maps[layer]["mask"].sum(axis=(1, 2))))
      chosen = list(dict.fromkeys([0, busiest]))
    for head in chosen:
      drawn = render(maps[layer], layer, head, args.out, k=k, K=cfg.sea.K, tokens=labels,
                     save_arrays=args.save_arrays)
      summary["maps"][f"layer{layer}_head{head}"] = {
          "layer": layer, "head": head,
          "kept_keys_per_row_mean": drawn["kept_keys_per_row_mean"],
          "coverage": drawn["coverage"], "files": drawn["files"]}
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  lock.release()
  return summary


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)

  def body() -> int:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)  # tokenizer/hub chatter; our notes go to stderr
      summary = visualize(args)
    print(f"wrote {len(summary['maps'])} (layer, head) picture sets and summary.json to "
          f"{args.out}", file=sys.stderr)
    return 0

  return run_command(body, debug=args.debug)


if __name__ == "__main__":
  sys.exit(main())
