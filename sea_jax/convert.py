"""Hugging Face OPT checkpoints <-> sea-jax model folders.

  python -m sea_jax.convert SRC DST                # HF folder (or hub id) -> model folder
  python -m sea_jax.convert SRC DST --attention sea # ... as a SEA student (fresh, seeded SEA modules)
  python -m sea_jax.convert SRC DST --to-hf        # model folder -> HF folder (safetensors)

Tensors stream one by one (safetensors without torch; `pytorch_model.bin` via
`torch.load(weights_only=True, mmap=True)`), so peak host memory is about one copy of the model.
Names map through one table of patterns; every transpose is guarded by a shape check, and
unmapped, duplicate or missing tensors are errors.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from typing import Callable, Iterator

import numpy as np

from sea_jax.config import ConfigError, OPTConfig, SEAConfig, load_config
from sea_jax.errors import UserError, add_debug_flag, run_command
from sea_jax.safe_write import atomic_folder, check_destination

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
SHARD_BYTES = 2 * 1024**3


class ConvertError(UserError, RuntimeError):
  """A source checkpoint that cannot be converted; the message names the problem."""


# --- the name table ---------------------------------------------------------------------------
# (HF regex, our path template, transpose?). HF Linear weights are (out, in); ours are (in, out).
_LAYER = r"decoder\.layers\.(\d+)\."
NAME_TABLE: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    (r"decoder\.embed_tokens\.weight", ("embed_tokens",), False),
    (r"decoder\.embed_positions\.weight", ("embed_positions",), False),
    (r"decoder\.project_in\.weight", ("project_in", "kernel"), True),
    (r"decoder\.project_out\.weight", ("project_out", "kernel"), True),
    (r"decoder\.final_layer_norm\.weight", ("final_layer_norm", "scale"), False),
    (r"decoder\.final_layer_norm\.bias", ("final_layer_norm", "bias"), False),
    (_LAYER + r"self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight",
     ("layers", "{0}", "self_attn", "{1}", "kernel"), True),
    (_LAYER + r"self_attn\.(q_proj|k_proj|v_proj|out_proj)\.bias",
     ("layers", "{0}", "self_attn", "{1}", "bias"), False),
    (_LAYER + r"(fc1|fc2)\.weight", ("layers", "{0}", "{1}", "kernel"), True),
    (_LAYER + r"(fc1|fc2)\.bias", ("layers", "{0}", "{1}", "bias"), False),
    (_LAYER + r"(self_attn_layer_norm|final_layer_norm)\.weight", ("layers", "{0}", "{1}", "scale"), False),
    (_LAYER + r"(self_attn_layer_norm|final_layer_norm)\.bias", ("layers", "{0}", "{1}", "bias"), False),
)
TIED_HEAD = "lm_head.weight"


def hf_to_path(name: str) -> tuple[tuple, bool] | None:
  """HF tensor name -> (our pure-dict path, transpose?), or None for the tied LM head."""
  bare = name[len("model."):] if name.startswith("model.") else name
  if bare == TIED_HEAD:
    return None
  for pattern, template, transpose in NAME_TABLE:
    m = re.fullmatch(pattern, bare)
    if m:
      path = tuple(int(part.format(*m.groups())) if part == "{0}" else part.format(*m.groups())
                   for part in template)
      return path, transpose
  raise ConvertError(f"unmapped tensor {name!r}: not part of an OPT checkpoint")


def path_to_hf(path: tuple) -> tuple[str, bool]:
  """Our pure-dict path -> (HF name, transpose?)."""
  for pattern, template, transpose in NAME_TABLE:
    if len(template) != len(path):
      continue
    groups = [str(value) for part, value in zip(template, path) if part in ("{0}", "{1}")]
    fixed_match = all(part == value for part, value in zip(template, path)
                      if part not in ("{0}", "{1}"))
    if fixed_match:
      name = _fill(pattern, groups)
      if re.fullmatch(pattern, name):
        return "model." + name, transpose
  raise ConvertError(f"no Hugging Face name for parameter {'.'.join(map(str, path))}")


def _fill(pattern: str, groups: list[str]) -> str:
  """Replaces each regex group of `pattern` by the next of `groups` and unescapes dots."""
  out, i = pattern, 0
  for group in re.findall(r"\([^)]*\)", pattern):
    out = out.replace(group, groups[i], 1)
    i += 1
  return out.replace("\\.", ".")


# --- reading Hugging Face folders ----------------------------------------------------------------

def resolve_source(src: str) -> str:
  """A local folder, or a hub id downloaded when the hub is reachable."""
  if os.path.isdir(src):
    return src
  if os.path.exists(src):
    raise ConvertError(f"{src} is a file; expected a Hugging Face model folder")
  if src.count("/") > 1 or src.startswith((".", "/")):
    raise ConvertError(f"no such folder: {src}")
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"])
  except Exception as e:  # noqa: BLE001 - offline, unknown repo, ...
    raise ConvertError(f"{src!r} is not a local folder and could not be fetched from the "
                       f"Hugging Face hub ({type(e).__name__}); pass a local model folder") from None


def weight_files(folder: str) -> list[str]:
  """The checkpoint files of a HF folder: safetensors preferred, single or sharded."""
  for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                             ("pytorch_model.bin.index.json", "pytorch_model.bin")):
    index = os.path.join(folder, index_name)
    if os.path.isfile(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise ConvertError(f"{index} is not a valid index file ({e})") from None
      files = sorted(set(weight_map.values()))
      missing = [p for p in files if not os.path.isfile(os.path.join(folder, p))]
      if missing:
        raise ConvertError(f"{index} lists {len(missing)} missing shard(s), e.g. {missing[0]}")
      return [os.path.join(folder, p) for p in files]
    if os.path.isfile(os.path.join(folder, single)):
      return [os.path.join(folder, single)]
  raise ConvertError(f"no model.safetensors or pytorch_model.bin (single or sharded) in {folder}")


def iter_tensors(files: list[str]) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, float32/float16 numpy array) one tensor at a time."""
  for path in files:
    if path.endswith(".safetensors"):
      yield from _iter_safetensors(path)
    else:
      yield from _iter_torch_bin(path)


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                       "BOOL": "bool"}


def _iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """Reads a safetensors file tensor by tensor with plain reads (no mmap), so only the tensor
  being converted is resident; the header is checked against the file size first."""
  import ml_dtypes
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    try:
      (header_len,) = np.frombuffer(f.read(8), "<u8")
      header = json.loads(f.read(int(header_len)))
    except (ValueError, json.JSONDecodeError) as e:
      raise ConvertError(f"{path} is truncated or not a safetensors file ({e})") from None
    base = 8 + int(header_len)
    header.pop("__metadata__", None)
    for name, info in header.items():
      begin, end = info["data_offsets"]
      if base + end > size:
        raise ConvertError(f"{path}: tensor {name!r} ends at byte {base + end} but the file has "
                           f"{size}; the file is truncated")
      dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
      if dtype is None:
        raise ConvertError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
      np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
      f.seek(base + begin)
      data = f.read(end - begin)
      yield name, np.frombuffer(data, np_dtype).reshape(info["shape"]).astype(np.float32)


def _iter_torch_bin(path: str) -> Iterator[tuple[str, np.ndarray]]:
  try:
    import torch
  except ImportError:
    raise ConvertError(f"{path} is a PyTorch .bin checkpoint: `pip install torch==2.13.0` "
                       "(CPU) to read it, or convert it to safetensors") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except Exception as e:  # noqa: BLE001 - truncated zip, pickle errors
    raise ConvertError(f"{path} is truncated or not a PyTorch checkpoint "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
  for name in list(state.keys()):
    tensor = state.pop(name)
    yield name, tensor.to(torch.float32).numpy()


def read_hf_config(folder: str) -> OPTConfig:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise ConvertError(f"no config.json in {folder}")
  try:
    return load_config(folder)
  except ConfigError as e:
    raise ConvertError(str(e)) from None


def hf_params(folder: str, config: OPTConfig, put: Callable[[tuple, np.ndarray], object]) -> dict:
  """Streams a HF folder's tensors through `put(path, array)` -> flat {path: put's result}.

  Checks every shape against the model's and that no parameter is missing or duplicated.
  """
  from sea_jax.checkpoint import abstract_model, flatten, path_str
  dense = dataclasses.replace(config, attention="dense")
  _, abstract = abstract_model(dense)
  import flax.nnx as nnx
  want = flatten(nnx.to_pure_dict(abstract))
  out: dict = {}
  head = None
  for name, array in iter_tensors(weight_files(folder)):
    mapped = hf_to_path(name)
    if mapped is None:
      head = array
      continue
    path, transpose = mapped
    if path not in want:
      raise ConvertError(f"tensor {name!r} does not fit this config (no parameter {path_str(path)})")
    if path in out:
      raise ConvertError(f"tensor {name!r} appears twice")
    expected = tuple(want[path].shape)
    if transpose:
      if array.ndim != 2 or tuple(array.shape[::-1]) != expected:
        raise ConvertError(f"tensor {name!r} has shape {tuple(array.shape)}, expected "
                           f"{expected[::-1]} (transposed to {expected})")
      array = array.T
    elif tuple(array.shape) != expected:
      raise ConvertError(f"tensor {name!r} has shape {tuple(array.shape)}, expected {expected}")
    out[path] = put(path, np.ascontiguousarray(array))
  missing = [p for p in want if p not in out]
  if missing:
    names = ", ".join(path_to_hf(p)[0] for p in missing[:4])
    raise ConvertError(f"{len(missing)} tensor(s) missing from the checkpoint, e.g. {names}")
  if head is not None and config.tie_word_embeddings is False:
    raise ConvertError("untied lm_head.weight is not supported (OPT ties it to embed_tokens)")
  return out


# --- the two directions --------------------------------------------------------------------------

def copy_tokenizer(src: str, dst: str) -> None:
  """Copies the tokenizer files of `src`, or writes the bundled OPT tokenizer."""
  copied = False
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
      copied = True
  from sea_jax.data import TokenizerError, load_tokenizer, save_tokenizer
  if not copied:
    save_tokenizer(load_tokenizer(None), dst)
    return
  try:
    load_tokenizer(dst)  # a truncated tokenizer.json must not become a model folder
  except TokenizerError:
    raise ConvertError(f"the tokenizer files of {src} cannot be loaded; they may be truncated "
                       "or corrupt (nothing was written)") from None


def hf_to_model_folder(src: str, dst: str, *, attention: str = "dense", sea: SEAConfig | None = None,
                       param_dtype: str = "float32") -> OPTConfig:
  """Converts a HF OPT folder (or hub id) into a sea-jax model folder; returns its config."""
  from sea_jax import checkpoint
  import flax.nnx as nnx
  folder = resolve_source(src)
  config = read_hf_config(folder)
  config = dataclasses.replace(config, attention=attention, param_dtype=param_dtype,
                               sea=sea or config.sea)
  config.validate()
  dtype = np.dtype(param_dtype) if param_dtype != "bfloat16" else None
  import jax.numpy as jnp
  cast = (lambda a: a.astype(dtype)) if dtype is not None else (lambda a: jnp.asarray(a, jnp.bfloat16))
  flat = hf_params(folder, config, lambda path, a: cast(a))
  if attention != "dense":
    graphdef, abstract = checkpoint.abstract_model(config)
    want = checkpoint.flatten(nnx.to_pure_dict(abstract))
    missing = [p for p in want if p not in flat]
    fresh = checkpoint.flatten(nnx.to_pure_dict(checkpoint.init_state(config)))
    for p in missing:
      flat[p] = np.asarray(fresh[p])
  with atomic_folder(dst) as tmp:
    tmp = str(tmp)
    checkpoint.save_params(checkpoint.unflatten(flat), tmp)
    checkpoint.write_config(config, tmp)
    copy_tokenizer(folder, tmp)
  return config


def model_folder_to_hf(src: str, dst: str) -> None:
  """Writes a sea-jax model folder's OPT weights as a HF folder (safetensors, sharded if big).

  SEA modules have no Hugging Face counterpart and are left out (with a notice).
  """
  from sea_jax import checkpoint
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


def _write_hf_folder(flat: dict, config: OPTConfig, src: str, dst: str) -> None:
  """The safetensors shards, index, config.json and tokenizer of `model_folder_to_hf`."""
  from safetensors.numpy import save_file
  shards: list[dict[str, np.ndarray]] = [{}]
  size, skipped = 0, 0
  for path, value in flat.items():
    try:
      name, transpose = path_to_hf(path)
    except ConvertError:
      skipped += 1  # SEA modules: no HF counterpart
      continue
    array = np.asarray(value, np.float32) if value.dtype != np.float16 else np.asarray(value)
    array = np.ascontiguousarray(array.T if transpose else array)
    if size + array.nbytes > SHARD_BYTES and shards[-1]:
      shards.append({})
      size = 0
    shards[-1][name] = array
    size += array.nbytes
  if skipped:
    print(f"note: {skipped} SEA tensors have no Hugging Face counterpart and were not written",
          file=sys.stderr)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(dst, fname), metadata={"format": "pt"})
      weight_map.update({n: fname for n in shard})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
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
      description="Convert a Hugging Face OPT checkpoint into a sea-jax model folder (Orbax), "
                  "or back with --to-hf.")
  parser.add_argument("src", help="HF model folder (config.json + safetensors or .bin) or hub id; "
                                  "with --to-hf a sea-jax model folder")
  parser.add_argument("dst", help="output folder")
  parser.add_argument("--to-hf", action="store_true", help="convert a sea-jax folder back to HF")
  parser.add_argument("--attention", default="dense", choices=("dense", "sea", "performer"),
                      help="attention of the written model; sea/performer add fresh, seeded modules")
  parser.add_argument("--sea-K", type=int, default=256, help="SEA compressed width K (multiple of 4)")
  parser.add_argument("--sea-k", type=int, default=64, help="SEA default keys per query per head")
  parser.add_argument("--seed", type=int, default=0, help="seed of the fresh SEA parameters")
  parser.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                      help="storage dtype of the converted parameters")
  add_debug_flag(parser)
  args = parser.parse_args(argv)

  def body() -> int:
    src_local = args.src if os.path.exists(args.src) else None
    need = folder_bytes(src_local) if src_local and os.path.isdir(src_local) else 0
    check_destination(args.dst, [src_local], "destination", min_free_bytes=need)
    if args.to_hf:
      model_folder_to_hf(args.src, args.dst)
    else:
      sea = SEAConfig(K=args.sea_K, k=args.sea_k, seed=args.seed)
      hf_to_model_folder(args.src, args.dst, attention=args.attention, sea=sea,
                         param_dtype=args.param_dtype)
    print(f"wrote {args.dst}", file=sys.stderr)
    return 0

  return run_command(body, debug=args.debug)


if __name__ == "__main__":
  sys.exit(main())
