"""Hugging Face checkpoints <-> sea-jax model folders, for every model family.

  python -m sea_jax.convert SRC DST                # HF folder (or hub id) -> model folder
  python -m sea_jax.convert SRC DST --attention sea # ... as a SEA student (fresh, seeded SEA modules)
  python -m sea_jax.convert SRC DST --to-hf        # model folder -> HF folder (safetensors)

The family (OPT, or Llama / Qwen2 / Mistral) comes from config.json's model_type. Tensors
stream one by one (`sea_jax.hf_io`: safetensors without torch; `pytorch_model.bin` via
`torch.load(weights_only=True, mmap=True)`), so peak host memory is about one copy of the
model. Names map through the family's table (`sea_jax.families`); every transpose is guarded by
a shape check, and unmapped, duplicate or missing tensors are errors.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

from sea_jax import checkpoint
from sea_jax.config import PARAM_DTYPES, SEAConfig, load_config
from sea_jax.errors import add_debug_flag, run_command
from sea_jax.flags import add_model_flags, check_model_flags
from sea_jax.families import name_table
from sea_jax.gguf_io import KNOWN_GGUF
from sea_jax.hf_io import ConvertError, copy_tokenizer, write_hf_weights
from sea_jax.safe_write import atomic_folder, check_destination


# --- the two directions --------------------------------------------------------------------------

def hf_to_model_folder(src: str, dst: str, *, attention: str = "dense", sea: SEAConfig | None = None,
                       param_dtype: str = "float32"):
  """Converts a weight source (a HF folder or hub id of any family, a GGUF file or the short
  name of an installed one, `checkpoint.open_source`) into a sea-jax model folder; returns its
  config."""
  import flax.nnx as nnx
  source = checkpoint.open_source(src)
  config = checkpoint.source_config(source)
  config = dataclasses.replace(config, attention=attention, param_dtype=param_dtype,
                               sea=sea or config.sea)
  config.validate()
  dtype = np.dtype(param_dtype) if param_dtype != "bfloat16" else None
  import jax.numpy as jnp
  cast = (lambda a: a.astype(dtype)) if dtype is not None else (lambda a: jnp.asarray(a, jnp.bfloat16))
  flat = checkpoint.read_source_params(source, config, lambda path, a: cast(a))
  if attention != "dense":
    graphdef, abstract = checkpoint.abstract_model(config)
    want = checkpoint.flatten(nnx.to_pure_dict(abstract))
    missing = [p for p in want if p not in flat]
    fresh = checkpoint.flatten(nnx.to_pure_dict(checkpoint.init_state(config)))
    for p in missing:
      flat[p] = np.asarray(fresh[p])
  with atomic_folder(dst) as tmp:
    tmp = str(tmp)
    source.save_tokenizer(tmp)  # first: a tokenizer that cannot be rebuilt writes nothing
    checkpoint.save_params(checkpoint.unflatten(flat), tmp)
    checkpoint.write_config(config, tmp)
    checkpoint.write_source_record(source, tmp)
  return config


def model_folder_to_hf(src: str, dst: str) -> None:
  """Writes a sea-jax model folder's weights as a HF folder (safetensors, sharded if big).

  SEA modules have no Hugging Face counterpart and are left out (with a notice).
  """
  if not checkpoint.is_model_folder(src):
    raise ConvertError(f"{src} is not a sea-jax model folder (config.json + params/)")
  config = load_config(src)
  _, abstract = checkpoint.abstract_model(config)
  restored, missing = checkpoint.restore_params(src, abstract, None)
  if missing:
    raise ConvertError(f"{src} lacks {len(missing)} parameters, e.g. {checkpoint.path_str(missing[0])}")
  flat = checkpoint.flatten(restored)
  with atomic_folder(dst) as tmp:
    _write_hf_folder(flat, config, src, str(tmp))


def _write_hf_folder(flat: dict, config, src: str, dst: str) -> None:
  """The safetensors shards, index, config.json and tokenizer of `model_folder_to_hf`."""
  skipped = write_hf_weights(flat, name_table(config), dst)
  if skipped:
    print(f"note: {skipped} SEA tensors have no Hugging Face counterpart and were not written",
          file=sys.stderr)
  hf = config.to_hf_dict()
  hf.pop("sea_jax")
  hf["torch_dtype"] = "float32"
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  copy_tokenizer(src, dst)


def folder_bytes(folder: str) -> int:
  """Bytes of every file under `folder`: what a conversion of it writes, about."""
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder)
             for f in files if os.path.isfile(os.path.join(root, f)))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m sea_jax.convert",
      description="Convert a Hugging Face checkpoint (OPT, Llama, Qwen2, Mistral; the family "
                  "comes from config.json) into a sea-jax model folder (Orbax), or back with "
                  "--to-hf.")
  parser.add_argument("src", help="HF model folder (config.json + safetensors or .bin), hub id, "
                                  "GGUF file, or the short name of an installed GGUF model "
                                  f"({', '.join(sorted(KNOWN_GGUF))}); with --to-hf a sea-jax "
                                  "model folder")
  parser.add_argument("dst", help="output folder")
  parser.add_argument("--to-hf", action="store_true", help="convert a sea-jax folder back to HF")
  add_model_flags(parser, "attention", "sea_K", "sea_k",
                  attention=dict(default="dense", help="attention of the written model; "
                                 "sea/performer add fresh, seeded modules (default dense)"),
                  sea_K=dict(help="SEA compressed width K, a positive multiple of 4, at most "
                             "the model's positions (default 256)"),
                  sea_k=dict(default=64, help="SEA default keys per query per head (default "
                             "64)"))
  parser.add_argument("--seed", type=int, default=0, help="seed of the fresh SEA parameters")
  parser.add_argument("--param-dtype", default="float32", choices=PARAM_DTYPES,
                      help="storage dtype of the converted parameters")
  add_debug_flag(parser)
  args = parser.parse_args(argv)

  def body() -> int:
    check_model_flags(args)
    src_local = args.src if os.path.exists(args.src) else None
    need = folder_bytes(src_local) if src_local and os.path.isdir(src_local) else 0
    check_destination(args.dst, [src_local], "destination", min_free_bytes=need)
    if args.to_hf:
      model_folder_to_hf(args.src, args.dst)
    else:
      if args.attention != "dense" and args.sea_K is not None:  # K within the positions
        checkpoint.apply_overrides(checkpoint.stored_config(args.src), attention=args.attention,
                                   sea_K=args.sea_K)
      sea = SEAConfig(K=args.sea_K or SEAConfig.K, k=args.sea_k, seed=args.seed)
      hf_to_model_folder(args.src, args.dst, attention=args.attention, sea=sea,
                         param_dtype=args.param_dtype)
    print(f"wrote {args.dst}", file=sys.stderr)
    return 0

  return run_command(body, debug=args.debug)


if __name__ == "__main__":
  sys.exit(main())
