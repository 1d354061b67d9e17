"""train.py's command line: flags, their validation, and the resolved run plan.

Every flag has a default and a --help line; the resolved settings go to OUT/train_config.json.
Bad input is a `TrainError` (one line, no traceback, exit code 2).
"""
from __future__ import annotations

import argparse
import math
import os

from sea_jax.errors import add_debug_flag
from sea_jax.flags import FlagError, add_model_flags, check_model_flags
from sea_jax.training.settings import TrainError, config_file
from sea_jax.training.step import MODES

EPILOG = """\
exit codes: 0 done (OUT/final written); 1 non-finite loss (nothing saved past the last good
checkpoint); 2 bad input; 130/143 stopped by SIGINT/SIGTERM after saving a checkpoint at the
step reached (re-run the same command to resume).

multi-host: run the same command on every host with --coordinator HOST:PORT --num-processes N
--process-id I (on a Cloud TPU pod no flags are needed: jax.distributed is started from the
TPU environment). Every host reads only its rows of each batch.
"""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="train.py", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Distil a SEA student from a frozen dense OPT teacher (SEA_SPEC §2), or "
                  "pretrain a dense OPT with plain cross-entropy (--mode pretrain).")
  g = p.add_argument_group("run")
  g.add_argument("--mode", choices=MODES, default="distill",
                 help="distill: SEA student vs frozen dense teacher (SEA_SPEC §2); layerwise: "
                      "the attention warm-up, every SEA layer on its teacher layer's own q, k, "
                      "v with L_approx + L_context (implies --freeze-base); pretrain: dense "
                      "model, CE only (default: distill)")
  g.add_argument("--out", required=True, help="output folder: checkpoints, metrics.jsonl, "
                 "train_config.json, final/ (re-running the same command resumes)")
  g.add_argument("--steps", type=int, required=True, help="optimizer steps in total")
  g.add_argument("--seed", type=int, default=0,
                 help="seeds the data order, dropout and fresh parameters (default 0)")

  g = p.add_argument_group("models")
  g.add_argument("--teacher", help="dense OPT teacher: sea-jax model folder, Hugging Face OPT "
                                   "folder or hub id (distill mode; the student starts from it)")
  g.add_argument("--init-from", help="start the student (distill) or the model (pretrain) from "
                                     "this model folder / HF folder instead")
  g.add_argument("--init-config", help="pretrain from scratch with this HF config.json (file or "
                                       "folder); the shape flags below override its fields")
  g.add_argument("--layers", type=int, help="pretrain from scratch: decoder layers")
  g.add_argument("--d-model", type=int, help="pretrain from scratch: hidden size")
  g.add_argument("--heads", type=int, help="pretrain from scratch: attention heads")
  g.add_argument("--ffn", type=int, help="pretrain from scratch: FFN inner size (default 4 d)")
  g.add_argument("--max-positions", type=int, help="pretrain from scratch: max positions "
                                                   "(default 2048)")
  g.add_argument("--vocab-size", type=int, help="pretrain from scratch: vocabulary (default: "
                                                "the tokenizer's size, 50272 for OPT's)")
  g.add_argument("--tokenizer", help="pretrain from scratch: a Hugging Face tokenizer folder "
                                     "(e.g. from recipes/prepare_corpus.py), copied into the "
                                     "model folder (default: the bundled OPT tokenizer)")
  g.add_argument("--freeze-base", action="store_true",
                 help="distill: train only the SEA modules (estimator, gates, position table) "
                      "on the frozen pretrained weights; the optimizer holds nothing else "
                      "(default: train every weight, as the paper)")
  add_model_flags(
      g, "attention", "sea_k", "sea_K", "sea_position_rows", "sea_pooled_keys", "sparse_impl",
      "dense_impl",
      "dtype",
      attention=dict(choices=("sea", "performer"), default="sea",
                     help="distill: the student's attention; performer is the paper's linear "
                          "baseline (default sea)"),
      dtype=dict(default="float32", help="compute dtype; parameters and optimizer state stay "
                                         "float32 (default float32)"))
  g.add_argument("--sea-k-train", metavar="LO,HI",
                 help="dynamic-k training: draw SEA's k for each update log-uniformly from "
                      "[LO, HI] (the student still evaluates at --sea-k by default; default: "
                      "train at --sea-k only, as the paper)")
  g.add_argument("--dropout", type=float, default=0.1,
                 help="dropout in the trained model (default 0.1; the teacher has none)")
  g.add_argument("--remat", action="store_true", help="rematerialise each decoder layer in "
                                                      "the backward pass (less memory)")

  g = p.add_argument_group("data")
  g.add_argument("--seq-len", type=int, default=2048, help="tokens per window (default 2048)")
  g.add_argument("--batch-size", type=int, default=32,
                 help="global batch in windows per optimizer step (default 32)")
  g.add_argument("--micro-batch-size", type=int,
                 help="windows per accumulation step, over all devices (default: the batch)")
  g.add_argument("--train-text", nargs="+", metavar="FILE",
                 help="local training text files (default: wikitext-2-raw-v1 train via "
                      "`datasets`)")
  g.add_argument("--wikitext-raw", action="store_true",
                 help="read --train-text files as WikiText raw rows (e.g. wiki.train.raw)")
  g.add_argument("--cache-dir", help="token cache folder (default OUT/cache)")

  g = p.add_argument_group("optimizer")
  g.add_argument("--lr-sea", type=float, default=1e-4,
                 help="distill: learning rate of the SEA modules (default 1e-4)")
  g.add_argument("--lr-pretrained", type=float, default=2e-6,
                 help="distill: learning rate of the pretrained OPT weights (default 2e-6)")
  g.add_argument("--lr", type=float, default=1e-3,
                 help="pretrain: learning rate of every parameter (default 1e-3)")
  g.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                 help="constant (the paper's distillation) or cosine decay to 0.1 x the LR at "
                      "--steps (default constant)")
  g.add_argument("--warmup-steps", type=int, default=0,
                 help="linear LR warm-up from 0 over this many steps (default 0)")
  g.add_argument("--weight-decay", type=float, default=0.01,
                 help="AdamW decay of kernels and embeddings, never norms or biases "
                      "(default 0.01)")

  g = p.add_argument_group("devices and checkpoints")
  add_model_flags(g, "mesh")
  g.add_argument("--save-every", type=int, default=500, help="checkpoint period in steps "
                                                             "(default 500)")
  g.add_argument("--keep", type=int, default=3, help="checkpoints kept (default 3)")
  g.add_argument("--log-every", type=int, default=1, help="metrics.jsonl period (default 1)")
  g.add_argument("--no-progress", action="store_true", help="no progress bar")
  g.add_argument("--coordinator", help="multi-host: HOST:PORT of process 0")
  g.add_argument("--num-processes", type=int, help="multi-host: number of processes")
  g.add_argument("--process-id", type=int, help="multi-host: this process's index")
  g.add_argument("--distributed", action="store_true",
                 help="start jax.distributed with the cluster's auto-detection (TPU, SLURM)")
  add_debug_flag(g)
  return p


def check_flags(args: argparse.Namespace) -> None:
  """Checks that need no model and no devices."""
  positive = ("steps", "seq_len", "batch_size", "save_every", "keep", "log_every")
  shapes = ("layers", "d_model", "heads", "ffn", "max_positions", "vocab_size")
  for name in shapes:  # given (not None) means a real size: 0 is not "not given"
    if getattr(args, name) is not None and getattr(args, name) < 1:
      raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  for name in ("lr", "lr_sea", "lr_pretrained", "weight_decay"):
    value = getattr(args, name)
    if not math.isfinite(value) or value < 0:
      raise TrainError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
  for name in positive:
    if getattr(args, name) < 1:
      raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.warmup_steps < 0:
    raise TrainError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
  if args.micro_batch_size is not None and args.micro_batch_size < 1:
    raise TrainError(f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
  try:
    check_model_flags(args)
  except FlagError as e:
    raise TrainError(str(e)) from None
  args.sea_k_range = parse_k_range(args.sea_k_train)
  if args.sea_k_range is not None and (args.mode == "pretrain" or args.attention != "sea"):
    raise TrainError("--sea-k-train applies to distilling a SEA student only")
  if not 0.0 <= args.dropout < 1.0:
    raise TrainError(f"--dropout must be in [0, 1), got {args.dropout}")
  if args.mode == "layerwise":
    if args.attention != "sea":
      raise TrainError("--mode layerwise trains SEA's estimator: it needs --attention sea")
    args.freeze_base = True
  if args.freeze_base and args.mode == "pretrain":
    raise TrainError("--freeze-base applies to a SEA student (--mode distill or layerwise)")
  if args.freeze_base and args.attention != "sea":
    raise TrainError("--freeze-base trains only the SEA modules: a Performer student has none")
  if args.mode in ("distill", "layerwise"):
    if not args.teacher:
      raise TrainError(f"--mode {args.mode} needs --teacher PATH (a dense model)")
    _check_source(args.teacher, "teacher")
  else:
    shape_flags = (args.layers, args.d_model, args.heads, args.ffn, args.max_positions)
    if not (args.init_from or args.init_config or any(v is not None for v in shape_flags)):
      raise TrainError("--mode pretrain needs --init-from, --init-config or the shape flags "
                       "--layers --d-model --heads [--ffn --max-positions]")
    if args.init_config and not config_file(args.init_config):
      raise TrainError(f"--init-config not found: {args.init_config}")
  if args.init_from:
    _check_source(args.init_from, "init-from")
  if args.tokenizer is not None:
    if args.mode != "pretrain" or args.init_from:
      raise TrainError("--tokenizer applies to pretraining from scratch only (a student or "
                       "--init-from model keeps its own tokenizer)")
    from sea_jax.data import has_tokenizer_files
    if not has_tokenizer_files(args.tokenizer):
      raise TrainError(f"--tokenizer {args.tokenizer} is not a folder with tokenizer files "
                       "(tokenizer.json, vocab.json, ...)")
  for path in args.train_text or ():
    if not os.path.isfile(path):
      raise TrainError(f"training text not found: {path}")


def parse_k_range(text: str | None) -> tuple[int, int] | None:
  """'LO,HI' -> (LO, HI) with 1 <= LO <= HI; None -> None."""
  if text is None:
    return None
  parts = text.split(",")
  try:
    lo, hi = (int(p) for p in parts)
  except ValueError:
    raise TrainError(f"--sea-k-train wants LO,HI (two integers), got {text!r}") from None
  if not 1 <= lo <= hi:
    raise TrainError(f"--sea-k-train wants 1 <= LO <= HI, got {text!r}")
  return lo, hi


def _check_source(path: str, what: str) -> None:
  from sea_jax.gguf_io import GGUFError, resolve_gguf
  try:
    if resolve_gguf(path) is not None:
      return
  except GGUFError as e:
    raise TrainError(f"--{what}: {e}") from None
  looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1 or os.path.exists(path)
  if looks_local and not os.path.isdir(path):
    raise TrainError(f"--{what} not found: {path} is not a model folder")
  if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
    raise TrainError(f"--{what} {path} has no config.json: not a model folder")


def main(argv: list[str] | None = None) -> int:
  """train.py: parse, start jax.distributed if asked, run; user errors are one line, exit 2."""
  import sys
  from sea_jax.errors import run_command
  args = build_parser().parse_args(argv)

  def body() -> int:
    from sea_jax.training.metrics import NonFiniteLossError
    check_flags(args)
    from sea_jax.training import distributed
    try:
      distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                             force_auto=args.distributed)
    except ValueError as e:
      raise TrainError(str(e)) from None
    from sea_jax.training.loop import run
    try:
      return run(args)
    except NonFiniteLossError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      return 1

  return run_command(body, debug=args.debug)
