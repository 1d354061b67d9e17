"""Hugging Face checkpoint I/O shared by every model family, below `checkpoint` and `convert`.

  NameTable      one family's HF tensor names <-> our parameter paths (regex patterns)
  resolve_source a local folder, or a hub id downloaded when the hub is reachable
  weight_files   a folder's safetensors / pytorch_model.bin files (single or sharded)
  iter_tensors   (name, float32 array) one tensor at a time (safetensors without torch)
  hf_params      a folder's tensors streamed into our paths, every shape checked
  write_hf_weights  safetensors shards (+ index) of our parameters under HF names
  copy_tokenizer the tokenizer files of a folder (validated), or the bundled OPT tokenizer
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Callable, Iterator

import numpy as np

from sea_jax.errors import UserError

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
SHARD_BYTES = 2 * 1024**3


class ConvertError(UserError, RuntimeError):
  """A source checkpoint that cannot be converted; the message names the problem."""


# --- name tables ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NameTable:
  """One family's tensor names. `entries`: (regex on the bare HF name, our path template,
  transpose?); "{0}" in a template is the layer number (an int), "{1}" the second group.
  HF Linear weights are (out, in), ours (in, out): those entries transpose.
  `prefix` ("model.") is stripped from HF names before matching and added back, except for
  `top_level` names (the LM head); `tied_head` names a tensor skipped when the head is tied;
  `ignored` patterns are buffers some checkpoints carry (e.g. rotary inv_freq)."""
  family: str
  entries: tuple[tuple[str, tuple[str, ...], bool], ...]
  prefix: str = "model."
  top_level: tuple[str, ...] = ("lm_head.weight",)
  tied_head: str = "lm_head.weight"
  ignored: tuple[str, ...] = ()

  def _bare(self, name: str) -> str:
    return name[len(self.prefix):] if name.startswith(self.prefix) else name

  def is_ignored(self, name: str) -> bool:
    return any(re.fullmatch(p, self._bare(name)) for p in self.ignored)

  def hf_to_path(self, name: str, *, tied: bool) -> tuple[tuple, bool] | None:
    """HF tensor name -> (our pure-dict path, transpose?); None for a tied head or a buffer."""
    bare = self._bare(name)
    if (tied and bare == self.tied_head) or self.is_ignored(name):
      return None
    for pattern, template, transpose in self.entries:
      m = re.fullmatch(pattern, bare)
      if m:
        path = tuple(int(part.format(*m.groups())) if part == "{0}" else part.format(*m.groups())
                     for part in template)
        return path, transpose
    raise ConvertError(f"unmapped tensor {name!r}: not part of a {self.family} checkpoint")

  def path_to_hf(self, path: tuple) -> tuple[str, bool]:
    """Our pure-dict path -> (HF name, transpose?)."""
    for pattern, template, transpose in self.entries:
      if len(template) != len(path):
        continue
      groups = [str(value) for part, value in zip(template, path) if part in ("{0}", "{1}")]
      fixed_match = all(part == value for part, value in zip(template, path)
                        if part not in ("{0}", "{1}"))
      if fixed_match:
        name = _fill(pattern, groups)
        if re.fullmatch(pattern, name):
          return (name if name in self.top_level else self.prefix + name), transpose
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


class HFFolder:
  """A Hugging Face model folder as a weight source (what `gguf_io.GGUFModel` is for a GGUF
  file): `hf_config()` its config.json dict, `tensors()` (name, float32 array) one at a time,
  `save_tokenizer(dst)` its tokenizer files (or the bundled OPT tokenizer)."""

  kind = "hf"

  def __init__(self, folder: str):
    self.path = folder

  def hf_config(self) -> dict:
    path = os.path.join(self.path, "config.json")
    if not os.path.isfile(path):
      raise ConvertError(f"no config.json in {self.path}")
    try:
      with open(path) as f:
        hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ConvertError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
      raise ConvertError(f"{path} does not hold a JSON object")
    return hf

  def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
    return iter_tensors(weight_files(self.path))

  def save_tokenizer(self, dst: str) -> None:
    copy_tokenizer(self.path, dst)


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


def hf_params(folder: str, names: NameTable, want: dict, put: Callable[[tuple, np.ndarray], object],
              *, tied: bool) -> dict:
  """Streams a HF folder's tensors through `put(path, array)` -> flat {path: put's result}
  (`map_tensors`)."""
  return map_tensors(iter_tensors(weight_files(folder)), names, want, put, tied=tied)


def map_tensors(tensors: Iterator[tuple[str, np.ndarray]], names: NameTable, want: dict,
                put: Callable[[tuple, np.ndarray], object], *, tied: bool) -> dict:
  """(HF name, array) pairs through `put(path, array)` -> flat {path: put's result}.

  want: {path: ShapeDtypeStruct} of the dense model. Checks every shape against it and that no
  parameter is missing or duplicated; `tied`: the LM head is the token embedding.
  """
  out: dict = {}
  for name, array in tensors:
    mapped = names.hf_to_path(name, tied=tied)
    if mapped is None:
      continue
    path, transpose = mapped
    if path not in want:
      raise ConvertError(f"tensor {name!r} does not fit this config (no parameter "
                         f"{'.'.join(map(str, path))})")
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
    shown = ", ".join(names.path_to_hf(p)[0] for p in missing[:4])
    raise ConvertError(f"{len(missing)} tensor(s) missing from the checkpoint, e.g. {shown}")
  return out


def write_hf_weights(flat: dict, names: NameTable, dst: str) -> int:
  """Writes `flat` {path: array} under HF names as safetensors (sharded above SHARD_BYTES, with
  an index) into `dst`; parameters without a HF name (SEA modules) are skipped: their count."""
  from safetensors.numpy import save

  def save_file(tensors, path, metadata):  # Python's write: a full disk is an OSError with errno
    blob = save(tensors, metadata=metadata)
    with open(path, "wb") as f:
      f.write(blob)
  shards: list[dict[str, np.ndarray]] = [{}]
  size, skipped = 0, 0
  for path, value in flat.items():
    try:
      name, transpose = names.path_to_hf(path)
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
  return skipped


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


