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
from sea_jax.config import ConfigError, load_config
from sea_jax.errors import UserError
from sea_jax.families import model_class, name_table

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


def abstract_model(config) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graph and its state as ShapeDtypeStructs (nothing allocated)."""
  model = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(config.sea.seed)))
  return nnx.split(model)


def init_state(config, mesh: Mesh | None = None) -> nnx.State:
  """A freshly initialised state, created directly in its sharding when a mesh is given."""
  def init():
    return nnx.state(build_model(config, nnx.Rngs(config.sea.seed)))
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


def restore_params(folder: str, abstract: nnx.State, mesh: Mesh | None) -> tuple[dict, list[tuple]]:
  """Reads what the checkpoint has of `abstract` -> (pure dict, missing paths)."""
  path = os.path.abspath(os.path.join(folder, PARAMS_DIR))
  try:
    meta = ocp.StandardCheckpointer().metadata(path)
    saved_tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
  except Exception as e:  # noqa: BLE001 - Orbax raises many kinds here
    raise CheckpointError(f"cannot read the checkpoint {path} ({_reason(e)}); "
                          f"{CORRUPT_HINT}") from None
  saved = {tuple(str(k) for k in p): v for p, v in flatten(dict(saved_tree)).items()}
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

  `overrides` replace config fields (e.g. attention="sea", dtype="bfloat16").
  """
  config = apply_overrides(load_config(folder), **overrides)
  graphdef, abstract = abstract_model(config)
  restored, missing = restore_params(folder, abstract, mesh)
  return assemble(config, graphdef, abstract, restored, missing, mesh)


def assemble(config, graphdef, abstract, restored: dict, missing: list[tuple],
             mesh: Mesh | None):
  """Merges restored parameters with fresh ones for `missing` paths (attention cores only)."""
  not_fresh = [p for p in missing if not any(m in p for m in FRESH_OK_MARKERS)]
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
  """Replaces config fields; keys "sea_<field>" replace fields of the SEA settings."""
  sea = {k[len("sea_"):]: v for k, v in overrides.items() if k.startswith("sea_")}
  top = {k: v for k, v in overrides.items() if not k.startswith("sea_")}
  config = dataclasses.replace(config, **top)
  if sea:
    config = dataclasses.replace(config, sea=dataclasses.replace(config.sea, **sea))
  config.validate()
  return config


def read_hf_config(folder: str):
  """The family config of a Hugging Face folder; a bad config.json is a ConvertError."""
  if not os.path.isfile(os.path.join(folder, "config.json")):
    raise hf_io.ConvertError(f"no config.json in {folder}")
  try:
    return load_config(folder)
  except ConfigError as e:
    raise hf_io.ConvertError(str(e)) from None


def source_config(path: str):
  """The config stored at `path` (a sea-jax model folder, a HF folder or a hub id)."""
  if is_model_folder(path):
    return load_config(path)
  return read_hf_config(hf_io.resolve_source(path))


def read_hf_params(folder: str, config, put) -> dict:
  """A HF folder's tensors for the dense model of `config`, each through `put(path, array)`
  -> flat {path: put's result}; shapes checked against the model (`hf_io.hf_params`)."""
  _, abstract = abstract_model(dataclasses.replace(config, attention="dense"))
  want = flatten(nnx.to_pure_dict(abstract))
  return hf_io.hf_params(folder, name_table(config), want, put, tied=config.tie_word_embeddings)


def load_pretrained(path: str, mesh: Mesh | None = None, **overrides):
  """A sea-jax model folder, a Hugging Face folder of any family (converted on the fly, tensor
  by tensor straight into its sharding) or a hub id -> the family's model on `mesh`."""
  if is_model_folder(path):
    return load_model(path, mesh, **overrides)
  folder = hf_io.resolve_source(path)
  config = apply_overrides(read_hf_config(folder), **overrides)
  graphdef, abstract = abstract_model(config)
  shardings = flatten(nnx.to_pure_dict(shd.state_shardings(abstract, mesh))) if mesh is not None else None
  wanted = flatten(nnx.to_pure_dict(abstract))

  def put(p, array):
    value = jnp.asarray(array, wanted[p].dtype)
    return jax.device_put(value, shardings[p]) if shardings is not None else value

  flat = read_hf_params(folder, config, put)
  missing = [p for p in wanted if p not in flat]
  return assemble(config, graphdef, abstract, unflatten(flat), missing, mesh)
