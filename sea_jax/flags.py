"""The model flags every command shares: each defined once, its choices taken from the constant
the code dispatches on, its range checked once, beside its definition.

  add_model_flags(parser, "attention", "sea_K", "sea_k", ..., attention=("sea", "performer"))
  check_model_flags(args)      every given model flag in its range, else one `FlagError` line
  model_overrides(args)        {config field: value} for `checkpoint.apply_overrides`

Commands: eval.py (`evaluate`), train.py (`training.cli`), `generate`, `visualize`, `convert`.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

from sea_jax.config import (ATTENTION_KINDS, COMPUTE_DTYPES, DENSE_IMPLS, SPARSE_IMPLS,
                            ConfigError, check_sea_K)
from sea_jax.errors import UserError


class FlagError(UserError, ValueError):
  """A flag value out of its range."""


def _positive(name: str) -> Callable[[int], str | None]:
  return lambda v: None if v >= 1 else f"--{name} must be >= 1, got {v}"


def _sea_K(v: int) -> str | None:
  try:
    check_sea_K(v)
  except ConfigError as e:
    return f"--sea-K: {e}"
  return None


def _at_least_2(v: int) -> str | None:
  return None if v >= 2 else f"--sea-position-rows must be >= 2, got {v}"


def parse_k_list(text: str | None) -> list[int] | None:
  """"16,32,64" -> [16, 32, 64] (each >= 1); None -> None."""
  if text is None:
    return None
  values = []
  for part in text.split(","):
    try:
      values.append(int(part))
    except ValueError:
      raise FlagError(f"--sea-k expects integers like 16,32,64; got {text!r}") from None
  return values


def _k_list(values) -> str | None:
  bad = [v for v in (values if isinstance(values, list) else parse_k_list(values)) if v < 1]
  return f"--sea-k must be >= 1, got {bad[0]}" if bad else None


@dataclasses.dataclass(frozen=True)
class Flag:
  """One model flag: its argparse definition, its range check (value -> message or None) and
  the config field it overrides (None: read by the command itself)."""
  option: str
  kwargs: dict
  check: Callable[[Any], str | None] | None = None
  field: str | None = None

  @property
  def dest(self) -> str:
    return self.option.lstrip("-").replace("-", "_")


FLAGS: dict[str, Flag] = {f.dest: f for f in (
    Flag("--attention", dict(choices=ATTENTION_KINDS, help="attention of every layer: dense, "
                             "sea or performer (a dense checkpoint gets fresh, untrained SEA or "
                             "Performer modules; default: the checkpoint's)"),
         field="attention"),
    Flag("--sea-K", dict(type=int, metavar="K", help="SEA compressed width K, a positive "
                         "multiple of 4, for fresh SEA modules (default: the checkpoint's, "
                         "else 256)"),
         _sea_K, "sea_K"),
    Flag("--sea-k", dict(type=int, metavar="k", help="SEA keys per query per head (default: "
                         "the model's k)"),
         _positive("sea-k")),
    Flag("--sea-position-rows", dict(type=int, metavar="R", help="rows of each SEA layer's "
                                     "position table P; fewer rows than the model's positions "
                                     "are read by linear interpolation (default: the "
                                     "checkpoint's, else the positions capped at 8192)"),
         _at_least_2, "sea_position_rows"),
    Flag("--sea-pooled-keys", dict(action=argparse.BooleanOptionalAction, help="mix the "
                                   "pooled-key bin scores (q · each bin's mean key) into SEA's "
                                   "estimator; not in the paper (default: the checkpoint's, "
                                   "else off)"),
         field="sea_pooled_keys"),
    Flag("--sparse-impl", dict(choices=SPARSE_IMPLS, help="SEA sparse attention: xla (tile "
                               "list), blocked (each query block over the keys it can see), "
                               "pallas; default auto: pallas on GPU/TPU, on CPU blocked below "
                               "16 query blocks, xla from there"),
         field="sea_sparse_impl"),
    Flag("--dense-impl", dict(choices=DENSE_IMPLS, help="dense attention: T x T reference, "
                              "chunked (one query block at a time over the keys it can see), "
                              "cudnn (GPU flash), splash (TPU); default auto: cuDNN on GPU in "
                              "bf16, splash on TPU, else chunked"),
         field="dense_impl"),
    Flag("--dtype", dict(choices=COMPUTE_DTYPES, help="compute dtype (default: float32)"),
         field="dtype"),
    Flag("--mesh", dict(metavar="AXIS=N,...", help="device mesh, e.g. data=8 or "
                        "data=2,fsdp=2,tensor=2 (default: every device on data)")),
)}


def add_model_flags(parser, *names: str, **variants: dict) -> None:
  """Adds the model flags `names` (FLAGS keys) to `parser` (or an argument group).

  variants: per flag, argparse settings that replace the shared ones for this command (e.g.
  attention=dict(choices=("sea", "performer"), default="sea"), sea_k=dict(type=str) for a list).
  """
  unknown = set(names) - set(FLAGS) | set(variants) - set(names)
  if unknown:
    raise ValueError(f"unknown model flag(s) {sorted(unknown)}")
  for name in names:
    flag = FLAGS[name]
    parser.add_argument(flag.option, **{**flag.kwargs, **variants.get(name, {})})


def check_model_flags(args: argparse.Namespace) -> None:
  """Every model flag `args` carries, checked against its range: one `FlagError` line."""
  for name, flag in FLAGS.items():
    value = getattr(args, name, None)
    if value is None or flag.check is None:
      continue
    check = _k_list if name == "sea_k" and isinstance(value, (str, list)) else flag.check
    message = check(value)
    if message:
      raise FlagError(message)


def model_overrides(args: argparse.Namespace, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
  """{config field: value} of every model flag given in `args` that overrides a config field
  (`checkpoint.apply_overrides` keys), except the fields in `skip`."""
  out = {}
  for name, flag in FLAGS.items():
    value = getattr(args, name, None)
    if flag.field is not None and value is not None and flag.field not in skip:
      out[flag.field] = value
  return out
