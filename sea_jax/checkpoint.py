"""Model folders on disk: config.json + an Orbax checkpoint of the parameters + tokenizer files.

A model folder (what `python -m sea_jax.convert` writes and `eval.py --model` reads):
  config.json        Hugging Face config of its family (OPT, Llama, ...), SEA settings under "sea_jax"
  params/            Orbax checkpoint of the model's pure-dict state (one array per variable)
  vocab.json, ...    tokenizer files

Restoring builds the model abstractly (`nnx.eval_shape`), computes every variable's sharding on
the mesh and lets Orbax read each device's shard directly, so a model larger than one device
still loads. Variables the checkpoint lacks (SEA modules added to a dense checkpoint) are freshly
initialised from `config.sea.seed`; any other missing variable is an error.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from sea_jax import hf_io
from sea_jax import sharding as shd
from sea_jax.config import ConfigError, config_from_hf_dict, load_config
from sea_jax.errors import UserError
from sea_jax.families import model_class, name_table
from sea_jax.layers import SeedKeys

PARAMS_DIR = "params"
FRESH_OK_MARKERS = ("core",)  # subtrees an attention swap may add (the attention core's own state)


class CheckpointError(UserError, RuntimeError):
  """A checkpoint that is missing, corrupt or does not fit the model."""


def _reason(e: Exception) -> str:
  """A readable first line of an Orbax / TensorStore error, or just its type."""
  line = str(e).splitlines()[0].strip() if str(e).strip() else ""
  if not line or "pybind11" in line or "object at 0x" in line or "NoneType" in line:
    return type(e).__name__
  return line[:200]


CORRUPT_HINT = ("its files are damaged or incomplete: convert or export the model again (a "
                "training run can re-export it from its checkpoints)")


def is_model_folder(path: str) -> bool:
  return os.path.isdir(os.path.join(path, PARAMS_DIR)) and os.path.isfile(os.path.join(path, "config.json"))


def flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
  """Nested dict -> {path tuple: leaf}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def unflatten(flat: dict[tuple, Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def path_str(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def build_model(config, rngs: nnx.Rngs):
  """The model of `config`'s family (OPTForCausalLM, LlamaForCausalLM, ...)."""
  return model_class(config)(config, rngs=rngs)


def seeded_model(config):
  """The model of `config` with the initial values `nnx.Rngs(config.sea.seed)` would draw, at a
  tracing cost linear in its parameter count (`layers.SeedKeys`)."""
  return build_model(config, SeedKeys(config.sea.seed))


def abstract_model(config) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graph and its state as ShapeDtypeStructs (nothing allocated)."""
  model = nnx.eval_shape(lambda: seeded_model(config))
  return nnx.split(model)


def init_state(config, mesh: Mesh | None = None) -> nnx.State:
  """A freshly initialised state, created directly in its sharding when a mesh is given."""
  def init():
    return nnx.state(seeded_model(config))
  if mesh is None:
    return jax.jit(init)()
  _, abstract = abstract_model(config)
  return jax.jit(init, out_shardings=shd.state_shardings(abstract, mesh))()


def save_params(state_or_dict: Any, folder: str) -> None:
  """Writes the pure-dict parameters to `folder/params` (Orbax; replaces an existing one)."""
  tree = state_or_dict
  if isinstance(tree, nnx.State):
    tree = nnx.to_pure_dict(tree)
  ckpt = ocp.StandardCheckpointer()
  try:
    ckpt.save(os.path.abspath(os.path.join(folder, PARAMS_DIR)), tree, force=True)
    ckpt.wait_until_finished()
  finally:  # a failed save (full disk) must not leave writer threads behind the caller's cleanup
    with contextlib.suppress(Exception):
      ckpt.close()


def write_config(config, folder: str) -> None:
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config.to_hf_dict(), f, indent=2)


def saved_arrays(folder: str) -> dict[tuple, Any]:
  """{path (str keys): array metadata (shape, dtype)} of what `folder/params` holds."""
  path = os.path.abspath(os.path.join(folder, PARAMS_DIR))
  try:
    meta = ocp.StandardCheckpointer().metadata(path)
    saved_tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
  except Exception as e:  # noqa: BLE001 - Orbax raises many kinds here
    raise CheckpointError(f"cannot read the checkpoint {path} ({_reason(e)}); "
                          f"{CORRUPT_HINT}") from None
  return {tuple(str(k) for k in p): v for p, v in flatten(dict(saved_tree)).items()}


def restore_params(folder: str, abstract: nnx.State, mesh: Mesh | None) -> tuple[dict, list[tuple]]:
  """Reads what the checkpoint has of `abstract` -> (pure dict, missing paths)."""
  path = os.path.abspath(os.path.join(folder, PARAMS_DIR))
  saved = saved_arrays(folder)
  want = flatten(nnx.to_pure_dict(abstract))
  shardings = (flatten(nnx.to_pure_dict(shd.state_shardings(abstract, mesh))) if mesh is not None
               else {p: jax.sharding.SingleDeviceSharding(jax.devices()[0]) for p in want})
  present, missing = {}, []
  for p, leaf in want.items():
    entry = saved.get(tuple(str(k) for k in p))
    if entry is None:
      missing.append(p)
      continue
    if tuple(entry.shape) != tuple(leaf.shape):
      raise CheckpointError(f"{path_str(p)}: checkpoint has shape {tuple(entry.shape)}, "
                            f"model expects {tuple(leaf.shape)}")
    present[p] = leaf
  target = unflatten(present)
  restore_args = unflatten({p: ocp.ArrayRestoreArgs(sharding=shardings[p], dtype=present[p].dtype)
                            for p in present})
  try:
    restored = ocp.PyTreeCheckpointer().restore(
        path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                          partial_restore=True))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"the checkpoint {path} cannot be restored ({_reason(e)}); "
                          f"{CORRUPT_HINT}") from None
  return restored, missing


def load_model(folder: str, mesh: Mesh | None = None, **overrides):
  """Loads a model folder into its family's model, sharded on `mesh` (or on one device).

  `overrides` replace config fields (e.g. attention="sea", dtype="bfloat16"). A folder with a
  `base.json` (a SEA student shipped as its SEA parameters alone) takes every other parameter
  from the base it names, after checking the base's sha256 (`read_base_params`).
  """
  config = apply_overrides(load_config(folder), **overrides)
  graphdef, abstract = abstract_model(config)
  restored, missing = restore_params(folder, abstract, mesh)
  if missing and os.path.isfile(os.path.join(folder, BASE_FILE)):
    from_base = read_base_params(folder, config, abstract, mesh,
                                 [p for p in missing if not _fresh_ok(p)])
    flat = flatten(restored)
    flat.update(from_base)
    restored = unflatten(flat)
    missing = [p for p in missing if p not in from_base]
  return assemble(config, graphdef, abstract, restored, missing, mesh)


BASE_FILE = "base.json"  # {"source": path or short name, "sha256": the base's digest}


def _fresh_ok(path: tuple) -> bool:
  return any(m in path for m in FRESH_OK_MARKERS)


def base_source_path(folder: str) -> str:
  """The `source` that `folder/base.json` names (a GGUF short name, a path)."""
  return read_base_record(folder)["source"]


def read_base_record(folder: str) -> dict:
  path = os.path.join(folder, BASE_FILE)
  try:
    with open(path) as f:
      record = json.load(f)
    if not isinstance(record.get("source"), str) or not isinstance(record.get("sha256"), str):
      raise ValueError("needs the strings 'source' and 'sha256'")
  except (OSError, ValueError, AttributeError) as e:
    raise CheckpointError(f"{path} cannot be read ({e}); it names the base model this SEA "
                          "student needs") from None
  return record


def source_digest(path: str) -> str | None:
  """What identifies a base model: a GGUF file's sha256, or the sha256 that a model folder
  converted from one records in its source.json; None when neither applies."""
  if is_model_folder(path):
    try:
      with open(os.path.join(path, SOURCE_FILE)) as f:
        return json.load(f).get("sha256")
    except (OSError, ValueError, AttributeError):
      return None
  from sea_jax import gguf_io
  gguf_path = gguf_io.resolve_gguf(path)
  return gguf_io.gguf_digest(gguf_path) if gguf_path else None


def write_base_record(folder: str, source: str) -> None:
  """`folder/base.json` naming `source` (GGUF short name, GGUF path or a model folder converted
  from a GGUF) by its digest."""
  digest = source_digest(source)
  if digest is None:
    raise CheckpointError(f"{source} is not a GGUF model (or a folder converted from one): a "
                          "student shipped without its base needs a base it can verify")
  with open(os.path.join(folder, BASE_FILE), "w") as f:
    json.dump({"source": source, "sha256": digest}, f, indent=2)


def read_base_params(folder: str, config, abstract, mesh: Mesh | None, paths: list[tuple]) -> dict:
  """The parameters `paths` of `folder`'s base model (base.json), sharded like `abstract`;
  a missing base or one with another sha256 is a CheckpointError naming both."""
  record = read_base_record(folder)
  source_path, want_digest = record["source"], record["sha256"]
  try:
    digest = source_digest(source_path)
  except hf_io.ConvertError as e:
    raise CheckpointError(f"{folder} is a SEA student of the base {source_path!r}, which "
                          f"cannot be found: {e}") from None
  if digest is None:
    raise CheckpointError(f"{folder} is a SEA student of the base {source_path!r}, which is "
                          "not a GGUF model here")
  if digest != want_digest:
    raise CheckpointError(f"{folder} is a SEA student of a base with sha256 {want_digest[:16]}..., "
                          f"but {source_path!r} has sha256 {digest[:16]}...: not the same "
                          "model")
  wanted = flatten(nnx.to_pure_dict(abstract))
  shardings = (flatten(nnx.to_pure_dict(shd.state_shardings(abstract, mesh)))
               if mesh is not None else None)
  needed = set(paths)

  def put(p, array):
    if p not in needed:
      return None
    value = jnp.asarray(array, wanted[p].dtype)
    return jax.device_put(value, shardings[p]) if shardings is not None else value

  if is_model_folder(source_path):
    base_config = load_config(source_path)
    _, base_abstract = abstract_model(dataclasses.replace(base_config, attention="dense"))
    restored, _ = restore_params(source_path, base_abstract, mesh)
    flat = flatten(restored)
  else:
    flat = read_source_params(open_source(source_path), config, put)
  return {p: flat[p] for p in paths if p in flat}


def assemble(config, graphdef, abstract, restored: dict, missing: list[tuple],
             mesh: Mesh | None):
  """Merges restored parameters with fresh ones for `missing` paths (attention cores only)."""
  not_fresh = [p for p in missing if not _fresh_ok(p)]
  if not_fresh:
    names = ", ".join(path_str(p) for p in not_fresh[:5])
    raise CheckpointError(f"checkpoint lacks {len(not_fresh)} parameter(s) the model needs: {names}")
  flat = flatten(restored)
  if missing:
    fresh = flatten(nnx.to_pure_dict(init_state(config, mesh)))
    for p in missing:
      flat[p] = fresh[p]
  state = abstract
  nnx.replace_by_pure_dict(state, unflatten(flat))
  return nnx.merge(graphdef, state)


def apply_overrides(config, **overrides):
  """Replaces config fields; keys "sea_<field>" replace fields of the SEA settings. A K asked
  for (sea_K) beyond the model's positions is a ConfigError: a row never has more keys to
  compress, and the estimator's (K/4, K) pooling matrix grows as K squared."""
  sea = {k[len("sea_"):]: v for k, v in overrides.items() if k.startswith("sea_")}
  positions = overrides.get("max_position_embeddings", config.max_position_embeddings)
  sea_model = overrides.get("attention", config.attention) == "sea"
  if sea_model and sea.get("K") is not None and sea["K"] > positions:
    raise ConfigError(f"SEA K={sea['K']} exceeds the model's {positions} positions: a row has "
                      "at most that many keys to compress")
  top = {k: v for k, v in overrides.items() if not k.startswith("sea_")}
  config = dataclasses.replace(config, **top)
  if sea:
    config = dataclasses.replace(config, sea=dataclasses.replace(config.sea, **sea))
  config.validate()
  return config


def open_source(path: str):
  """The weights `path` names: a GGUF file (a .gguf path or a short name such as
  "smollm2-135m", `gguf_io.resolve_gguf`) or a Hugging Face folder / hub id. Both answer
  `hf_config()`, `tensors()` and `save_tokenizer(dst)`."""
  from sea_jax import gguf_io
  gguf_path = gguf_io.resolve_gguf(path)
  if gguf_path is not None:
    return gguf_io.open_gguf(gguf_path)
  return hf_io.HFFolder(hf_io.resolve_source(path))


def source_config(source):
  """The family config of a weight source (`open_source`); a bad config is a ConvertError."""
  try:
    return config_from_hf_dict(source.hf_config())
  except ConfigError as e:
    raise hf_io.ConvertError(f"{source.path}: {e}") from None


def read_hf_config(folder: str):
  """The family config of a Hugging Face folder; a bad config.json is a ConvertError."""
  return source_config(hf_io.HFFolder(folder))


def stored_config(path: str):
  """The config stored at `path` (a sea-jax model folder, a GGUF file or short name, a HF
  folder or a hub id)."""
  if is_model_folder(path):
    return load_config(path)
  return source_config(open_source(path))


SOURCE_FILE = "source.json"  # where a converted folder's weights came from


def write_source_record(source, folder: str) -> None:
  """`folder/source.json`: the converted source's path and, for a GGUF file, its sha256 (what
  a SEA student shipped without its base records and checks, `base_record`)."""
  record = {"format": source.kind, "path": os.path.abspath(source.path)}
  if source.kind == "gguf":
    record["sha256"] = source.digest()
  with open(os.path.join(folder, SOURCE_FILE), "w") as f:
    json.dump(record, f, indent=2)


def model_tokenizer(path: str):
  """The tokenizer of any model path: a model folder's (or, for a student shipped without its
  base, the base's), a GGUF file's, a HF folder's; the bundled OPT tokenizer otherwise."""
  from sea_jax import data
  if os.path.isdir(path):
    if not data.has_tokenizer_files(path) and os.path.isfile(os.path.join(path, BASE_FILE)):
      return model_tokenizer(base_source_path(path))
    return data.load_tokenizer(path)
  from sea_jax import gguf_io
  gguf_path = gguf_io.resolve_gguf(path)
  if gguf_path is not None:
    return gguf_io.open_gguf(gguf_path).tokenizer()
  return data.load_tokenizer(None)


def check_tokenizer_fits(tokenizer, config, path: str) -> None:
  """A tokenizer whose ids run past the model's vocabulary cannot feed it: one ConfigError line
  (a model folder without tokenizer files gets the bundled OPT tokenizer, 50,265 ids)."""
  size = len(tokenizer)
  if size > config.vocab_size:
    raise ConfigError(f"the tokenizer of {path} has {size} tokens but the model's vocab_size is "
                      f"{config.vocab_size}: tokenizer and model do not match (a folder without "
                      "tokenizer files gets the bundled OPT tokenizer)")


def read_source_params(source, config, put) -> dict:
  """A weight source's tensors for the dense model of `config`, each through
  `put(path, array)` -> flat {path: put's result}; shapes checked (`hf_io.map_tensors`)."""
  _, abstract = abstract_model(dataclasses.replace(config, attention="dense"))
  want = flatten(nnx.to_pure_dict(abstract))
  return hf_io.map_tensors(source.tensors(), name_table(config), want, put,
                           tied=config.tie_word_embeddings)


def load_pretrained(path: str, mesh: Mesh | None = None, **overrides):
  """A sea-jax model folder, a GGUF file (or short name), a Hugging Face folder of any family
  or a hub id -> the family's model on `mesh` (a source other than a model folder is converted
  on the fly, tensor by tensor straight into its sharding)."""
  if is_model_folder(path):
    return load_model(path, mesh, **overrides)
  source = open_source(path)
  config = apply_overrides(source_config(source), **overrides)
  graphdef, abstract = abstract_model(config)
  shardings = flatten(nnx.to_pure_dict(shd.state_shardings(abstract, mesh))) if mesh is not None else None
  wanted = flatten(nnx.to_pure_dict(abstract))

  def put(p, array):
    value = jnp.asarray(array, wanted[p].dtype)
    return jax.device_put(value, shardings[p]) if shardings is not None else value

  flat = read_source_params(source, config, put)
  missing = [p for p in wanted if p not in flat]
  return assemble(config, graphdef, abstract, unflatten(flat), missing, mesh)
