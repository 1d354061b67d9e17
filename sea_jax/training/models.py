"""Models as pure-dict pytrees for training: split into trainable params and the rest.

A `ModelBridge` holds a model's graph and abstract state; the train step works on two pure
dicts, `params` (the trained `nnx.Param`s: all of them, or the SEA modules alone over a frozen
base) and `rest` (everything else, e.g. SEA's fixed random features), and rebuilds the module
inside traced functions with `bridge.merge(params, rest)`.
"""
from __future__ import annotations

import dataclasses
import os

import jax
from flax import nnx
from jax.sharding import Mesh

from sea_jax import checkpoint as ckpt
from sea_jax import sharding as shd
from sea_jax.config import ModelConfig


def merge_dicts(a: dict, b: dict) -> dict:
  """Deep union of two nested dicts with disjoint leaves (params + rest -> full state)."""
  out = dict(a)
  for key, value in b.items():
    out[key] = merge_dicts(out[key], value) if isinstance(value, dict) and key in out else value
  return out


TRAINABLE = ("all", "sea")  # what a run trains: every parameter, or the SEA modules alone


def trainable_filter(trainable: str):
  """The nnx filter of the trained variables: every `nnx.Param`, or ("sea", a frozen base)
  only the Params under an attention `core` (estimator, gates, position table)."""
  if trainable == "all":
    return nnx.Param
  if trainable == "sea":
    return nnx.All(nnx.Param, nnx.PathContains(ckpt.FRESH_OK_MARKERS[0]))
  raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")


class ModelBridge:
  """Graph + abstract state of the model of `config` (any family); nothing allocated.

  abstract_params / abstract_rest: pure dicts of ShapeDtypeStructs; shardings(mesh) gives the
  matching NamedSharding trees. `trainable="sea"` puts every parameter outside the attention
  cores into `rest` (a frozen base): the optimizer, its state and the gradients then hold the
  SEA modules alone.
  """

  def __init__(self, config: ModelConfig, trainable: str = "all"):
    self.config = config
    self.trainable = trainable
    self._filter = trainable_filter(trainable)
    model = nnx.eval_shape(lambda: ckpt.seeded_model(config))
    self.graphdef, self._params, self._rest = nnx.split(model, self._filter, ...)
    self.abstract_params = nnx.to_pure_dict(self._params)
    self.abstract_rest = nnx.to_pure_dict(self._rest)

  def merge(self, params: dict, rest: dict) -> nnx.Module:
    """A module whose variables are `params` and `rest` (works on tracers)."""
    p = jax.tree.map(lambda v: v, self._params)  # fresh Variables for this trace
    r = jax.tree.map(lambda v: v, self._rest)
    nnx.replace_by_pure_dict(p, params)
    nnx.replace_by_pure_dict(r, rest)
    return nnx.merge(self.graphdef, p, r)

  def shardings(self, mesh: Mesh) -> tuple[dict, dict]:
    """(params shardings, rest shardings) from the one logical-axis table."""
    return (nnx.to_pure_dict(shd.state_shardings(self._params, mesh)),
            nnx.to_pure_dict(shd.state_shardings(self._rest, mesh)))

  def abstract(self, mesh: Mesh) -> tuple[dict, dict]:
    """ShapeDtypeStructs carrying their shardings (restore targets)."""
    ps, rs = self.shardings(mesh)
    with_sh = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return (jax.tree.map(with_sh, self.abstract_params, ps),
            jax.tree.map(with_sh, self.abstract_rest, rs))

  def split(self, model: nnx.Module) -> tuple[dict, dict]:
    """A live model -> (params, rest) pure dicts."""
    _, params, rest = nnx.split(model, self._filter, ...)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def load_weights(path: str, bridge: ModelBridge, mesh: Mesh, overrides: dict) -> tuple[dict, dict]:
  """Loads `path` (model folder / HF folder) with `overrides` into (params, rest) on `mesh`;
  SEA modules a dense checkpoint lacks are freshly initialised."""
  model = ckpt.load_pretrained(path, mesh, **overrides)
  if model.config != bridge.config:
    raise ValueError(f"loaded config differs from the expected one: {model.config} vs "
                     f"{bridge.config}")
  return bridge.split(model)


def fresh_weights(bridge: ModelBridge, mesh: Mesh) -> tuple[dict, dict]:
  """A newly initialised model (seed config.sea.seed), created in its sharding."""
  state = ckpt.init_state(bridge.config, mesh)
  model = nnx.merge(ckpt.abstract_model(bridge.config)[0], state)
  return bridge.split(model)


def export_model(folder: str, bridge: ModelBridge, params: dict, rest: dict,
                 tokenizer_src: str | None, *, is_writer: bool) -> None:
  """Writes a model folder (config.json, params/, tokenizer) that `eval.py --model` reads.

  Every process takes part in the (collective) parameter save; only `is_writer` writes the
  config and tokenizer files.
  """
  from sea_jax import hf_io
  config = dataclasses.replace(bridge.config, dtype="float32", remat=False)
  if is_writer:
    os.makedirs(folder, exist_ok=True)
  ckpt.save_params(merge_dicts(params, rest), folder)
  if is_writer:
    ckpt.write_config(config, folder)
    if tokenizer_src and os.path.isdir(tokenizer_src):
      hf_io.copy_tokenizer(tokenizer_src, folder)
    else:
      from sea_jax.data import load_tokenizer, save_tokenizer
      tokenizer = ckpt.model_tokenizer(tokenizer_src) if tokenizer_src else load_tokenizer(None)
      save_tokenizer(tokenizer, folder)
    if tokenizer_src and ckpt.source_digest(tokenizer_src) is not None:
      ckpt.write_base_record(folder, tokenizer_src)  # the base it was distilled from
