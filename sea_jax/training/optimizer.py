"""AdamW with two parameter groups and a weight-decay mask (SEA_SPEC §2).

Parameters are the pure-dict tree of the model's `nnx.Param`s (`nnx.to_pure_dict`).
Groups: "sea" is every parameter under an attention `core` (the SEA modules: estimator, gates,
position table); "pretrained" is everything else (the OPT weights the student starts from).
Weight decay applies to parameters with 2 or more dimensions: linear and conv kernels, the token
and position embeddings, and SEA's learned position table P (a learned embedding, decayed like
OPT's own). LayerNorm scales/biases and every bias (1-D) are never decayed (the reference decays
LayerNorm weights by accident; SEA_SPEC §6). SEA's fixed random features are not an `nnx.Param`
and never reach the optimizer.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

GROUPS = ("sea", "pretrained")
SEA_MARKER = "core"  # an attention layer's `core` holds SEA's own modules


def param_label(path: tuple) -> str:
  """"sea" for a parameter under an attention core, else "pretrained"."""
  return "sea" if SEA_MARKER in path else "pretrained"


def _key_name(entry) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return str(entry)


def _path(key_path) -> tuple:
  return tuple(_key_name(k) for k in key_path)


def param_labels(params: Any) -> Any:
  """The group label of every leaf of `params` (same tree, strings as leaves)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: param_label(_path(p)), params)


def decays(leaf: Any) -> bool:
  """Whether weight decay applies: kernels and embeddings (ndim >= 2), not norms or biases."""
  return len(leaf.shape) >= 2


def decay_mask(params: Any) -> Any:
  """Same tree as `params`, True where weight decay applies (shape-only, so it also works on the
  partial trees `optax.multi_transform` hands to each group)."""
  return jax.tree.map(decays, params)


SCHEDULES = ("constant", "cosine")


def lr_schedule(lr: float, schedule: str = "constant", warmup_steps: int = 0,
                total_steps: int = 0, final_fraction: float = 0.1):
  """A float (constant, no warmup) or an optax schedule: linear warmup from 0 over
  `warmup_steps`, then constant or a cosine decay to `final_fraction * lr` at `total_steps`."""
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
  if schedule == "constant" and warmup_steps == 0:
    return float(lr)
  if schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps),
                                 optax.constant_schedule(lr)], [warmup_steps])
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps,
                                            max(total_steps, warmup_steps + 1),
                                            end_value=final_fraction * lr)


def make_optimizer(learning_rates: Mapping[str, float], weight_decay: float,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
                   schedule: str = "constant", warmup_steps: int = 0, total_steps: int = 0
                   ) -> optax.GradientTransformation:
  """AdamW per group, decay masked by `decay_mask`; learning rates by `lr_schedule`
  (the paper's distillation: constant, no warmup).

  learning_rates: {"sea": lr, "pretrained": lr}.
  """
  missing = [g for g in GROUPS if g not in learning_rates]
  if missing:
    raise ValueError(f"learning rates missing for group(s) {missing}")
  transforms = {g: optax.adamw(lr_schedule(float(learning_rates[g]), schedule, warmup_steps,
                                           total_steps), b1=b1, b2=b2, eps=eps,
                               weight_decay=weight_decay, mask=decay_mask)
                for g in GROUPS}
  return optax.multi_transform(transforms, param_labels)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any,
                        param_shardings: Any, mesh) -> Any:
  """The sharding of every optimizer-state leaf: a leaf that mirrors a parameter (Adam's mu/nu,
  found by the trailing dict-key path and shape) takes that parameter's sharding; the rest
  (step counts) are replicated."""
  flat_sh = {_path(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
  shapes = {_path(p): tuple(x.shape) for p, x in
            jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, P())

  def one(key_path, leaf):
    keys = []
    for entry in reversed(key_path):  # the trailing run of dict keys is the parameter's path
      if not isinstance(entry, jax.tree_util.DictKey):
        break
      keys.append(entry.key)
    path = tuple(reversed(keys))
    if path in flat_sh and shapes[path] == tuple(leaf.shape):
      return flat_sh[path]
    return replicated

  return jax.tree_util.tree_map_with_path(one, abstract_opt)
