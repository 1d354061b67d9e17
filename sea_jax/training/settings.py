"""The resolved settings of a training run, shared by `cli` (flags) and `loop` (the run): the
from-scratch config, what a resumed run must share with the one that wrote its checkpoints,
and the batch layout on the mesh."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import Any

from sea_jax.config import ConfigError, LlamaConfig, OPTConfig, config_from_hf_dict
from sea_jax.errors import UserError


class TrainError(UserError, ValueError):
  """Bad flags or inputs; printed as one line."""


def config_file(path: str) -> str | None:
  """PATH/config.json or PATH itself when that file exists, else None."""
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  return path if os.path.isfile(path) else None


def scratch_config(args: argparse.Namespace):
  """The dense config of a from-scratch pretrain run (--init-config of any family and/or shape
  flags; without --init-config an OPT)."""
  if args.init_config:
    with open(config_file(args.init_config)) as f:
      try:
        hf = json.load(f)
      except json.JSONDecodeError as e:
        raise TrainError(f"--init-config is not valid JSON: {e}") from None
    hf.setdefault("model_type", "opt")
    try:
      base = config_from_hf_dict(hf)
    except ConfigError as e:
      raise TrainError(f"--init-config: {e}") from None
    if isinstance(base, LlamaConfig):
      return _scratch_llama(base, args)
  else:
    base = OPTConfig()
    if args.d_model is None or args.layers is None or args.heads is None:
      raise TrainError("pretraining from scratch without --init-config needs --layers, "
                       "--d-model and --heads")
  d = args.d_model or base.hidden_size
  fields = dict(hidden_size=d, word_embed_proj_dim=d if args.d_model else base.word_embed_proj_dim,
                num_hidden_layers=args.layers or base.num_hidden_layers,
                num_attention_heads=args.heads or base.num_attention_heads,
                ffn_dim=args.ffn or (4 * d if args.d_model else base.ffn_dim),
                max_position_embeddings=args.max_positions or base.max_position_embeddings,
                vocab_size=args.vocab_size or _tokenizer_vocab(args) or base.vocab_size)
  return dataclasses.replace(base, **fields)


def _tokenizer_vocab(args: argparse.Namespace) -> int | None:
  """--tokenizer's size rounded up to a multiple of 64 (None without --tokenizer)."""
  if getattr(args, "tokenizer", None) is None:
    return None
  from sea_jax.data import load_tokenizer
  return -(-len(load_tokenizer(args.tokenizer)) // 64) * 64


def _scratch_llama(base: LlamaConfig, args: argparse.Namespace) -> LlamaConfig:
  """A Llama-family --init-config with the shape flags applied (--ffn: intermediate_size;
  --d-model also sets head_dim = d_model / heads)."""
  heads = args.heads or base.num_attention_heads
  fields = dict(hidden_size=args.d_model or base.hidden_size,
                num_hidden_layers=args.layers or base.num_hidden_layers,
                num_attention_heads=heads,
                intermediate_size=args.ffn or base.intermediate_size,
                max_position_embeddings=args.max_positions or base.max_position_embeddings,
                vocab_size=args.vocab_size or _tokenizer_vocab(args) or base.vocab_size)
  if args.d_model or args.heads:
    fields["head_dim"] = fields["hidden_size"] // heads
  if heads % base.num_key_value_heads:
    raise TrainError(f"--heads {heads} is not a multiple of the config's num_key_value_heads "
                     f"{base.num_key_value_heads}")
  return dataclasses.replace(base, **fields)


def essentials(args: argparse.Namespace, config) -> dict[str, Any]:
  """The settings a resumed run must share with the run that wrote the checkpoints (the
  model's shape fields are its family's `shape_fields`)."""
  out = {"mode": args.mode, "seq_len": args.seq_len, "batch_size": args.batch_size,
         "seed": args.seed}
  out.update({f: getattr(config, f) for f in config.shape_fields})
  # The LR schedule, when not the paper's constant one (so runs made before it resume as they were)
  if getattr(args, "lr_schedule", "constant") != "constant":
    out["lr_schedule"] = args.lr_schedule
  if getattr(args, "warmup_steps", 0):
    out["warmup_steps"] = args.warmup_steps
  if getattr(args, "freeze_base", False):
    out["trainable"] = "sea"
  if config.attention == "sea":
    out["sea_K"] = config.sea.K
    out["sea_nbf"] = config.sea.nbf
    if config.sea.position_rows is not None:
      out["sea_position_rows"] = config.sea.position_rows
    if getattr(args, "sea_k_range", None) is not None:
      out["sea_k_train"] = list(args.sea_k_range)
  return out


def check_same_essentials(saved: dict, current: dict, where: str) -> None:
  diffs = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
           if saved.get(k) != current.get(k)]
  if diffs:
    raise TrainError(f"cannot resume from {where}: it was written with different settings "
                     f"({'; '.join(diffs)}); use the same flags or another --out")


def batch_layout(args: argparse.Namespace, mesh_shape: dict[str, int]) -> int:
  """Checks batch/micro-batch against the data x fsdp size; returns the micro batch."""
  shards = math.prod(mesh_shape[a] for a in ("data", "fsdp"))
  micro = args.micro_batch_size or args.batch_size
  if args.batch_size % shards:
    raise TrainError(f"--batch-size {args.batch_size} is not divisible by the data x fsdp "
                     f"size {shards} of the mesh")
  if args.batch_size % micro:
    raise TrainError(f"--batch-size {args.batch_size} is not divisible by "
                     f"--micro-batch-size {micro}")
  if micro % shards:
    raise TrainError(f"--micro-batch-size {micro} is not divisible by the data x fsdp size "
                     f"{shards} of the mesh (each accumulation step spreads over every device)")
  return micro


