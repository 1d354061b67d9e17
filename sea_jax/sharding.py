"""Device meshes and the one table that maps logical parameter axes onto them.

Mesh axes are `data`, `fsdp`, `tensor`. Each parameter names its logical axes where it is
declared (`sea_jax.layers.param`); `LOGICAL_RULES` maps each logical name to a mesh axis (or
None: replicated). A dimension that the mesh axis does not divide evenly is replicated instead.
Batches are split over `data` x `fsdp`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sea_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: dict[str | None, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "vocab": "tensor",      # embedding rows / LM head columns
    "embed": "fsdp",        # model dimension: FSDP
    "heads": "tensor",      # q/k/v output features, out_proj input features: tensor parallel
    "kv_heads": "tensor",   # k/v output features under grouped-query attention (Llama family)
    "mlp": "tensor",        # FFN inner dimension: tensor parallel
    "positions": None,
    "norm": None,
    "head_dim": None,
    # SEA's estimator parameters are small (O(d^2 + H^2)); they stay replicated.
    "sea_in": None, "sea_hidden": None, "sea_out": None, "sea_channels": None, "sea_width": None,
    None: None,
}


class MeshError(UserError, ValueError):
  """A mesh description that does not fit the devices."""


def parse_mesh(spec: str | None, num_devices: int) -> dict[str, int]:
  """"data=2,fsdp=2,tensor=2" -> {"data": 2, "fsdp": 2, "tensor": 2}; one axis may be -1
  (the rest of the devices); None puts every device on `data`."""
  sizes = {"data": -1, "fsdp": 1, "tensor": 1} if not spec else {"data": 1, "fsdp": 1, "tensor": 1}
  given = set()
  for part in (spec.split(",") if spec else []):
    name, sep, value = part.partition("=")
    name = name.strip()
    if not sep or name not in MESH_AXES:
      raise MeshError(f"bad mesh entry {part!r}: expected NAME=SIZE with NAME in {MESH_AXES}")
    if name in given:
      raise MeshError(f"mesh axis {name!r} is given twice in {spec!r}")
    given.add(name)
    try:
      sizes[name] = int(value)
    except ValueError:
      raise MeshError(f"bad mesh size in {part!r}") from None
  free = [n for n, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise MeshError("at most one mesh axis may be -1")
  known = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % known:
      raise MeshError(f"mesh {spec!r} does not divide {num_devices} devices")
    sizes[free[0]] = num_devices // known
  if any(s < 1 for s in sizes.values()):
    raise MeshError(f"mesh sizes must be >= 1, got {sizes}")
  if math.prod(sizes.values()) != num_devices:
    raise MeshError(f"mesh {sizes} uses {math.prod(sizes.values())} devices, "
                    f"but {num_devices} are available")
  return sizes


def make_mesh(spec: str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over `devices` (default: all devices of all hosts)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # CPU or unusual topologies: plain row-major order
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES)


def batch_shards(mesh: Mesh) -> int:
  """How many ways a batch splits on `mesh` (data x fsdp): batches are multiples of it."""
  return _mesh_axis_size(mesh, BATCH_AXES)


def _mesh_axis_size(mesh: Mesh, axis: str | tuple[str, ...] | None) -> int:
  if axis is None:
    return 1
  names = (axis,) if isinstance(axis, str) else axis
  return math.prod(mesh.shape[n] for n in names)


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: dict = LOGICAL_RULES) -> P:
  """PartitionSpec for an array of `shape` whose dimensions carry logical `axes`."""
  if axes is None:
    return P()
  if len(axes) != len(shape):
    raise MeshError(f"{len(axes)} logical axes {tuple(axes)} for shape {tuple(shape)}")
  spec, used = [], set()
  for name, dim in zip(axes, shape):
    if name not in rules:
      raise MeshError(f"logical axis {name!r} has no sharding rule; add it to LOGICAL_RULES")
    mesh_axis = rules[name]
    names = () if mesh_axis is None else ((mesh_axis,) if isinstance(mesh_axis, str) else mesh_axis)
    if used & set(names):
      raise MeshError(f"logical axes {tuple(axes)} map mesh axis {sorted(used & set(names))} twice")
    size = _mesh_axis_size(mesh, mesh_axis)
    if mesh_axis is None or size == 1 or dim % size:
      spec.append(None)
    else:
      spec.append(mesh_axis)
      used |= set(names)
  return P(*spec)


def variable_axes(var: nnx.Variable) -> tuple[str | None, ...] | None:
  meta = var.get_metadata()
  axes = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
  return tuple(axes) if axes is not None else None


def state_shardings(state: Any, mesh: Mesh, rules: dict = LOGICAL_RULES) -> Any:
  """The NamedSharding of every variable of an nnx State (same tree, shardings as values)."""
  def one(var):
    if not isinstance(var, nnx.Variable):
      return NamedSharding(mesh, P())
    shape = np.shape(var.get_value())
    return var.replace(NamedSharding(mesh, logical_to_spec(variable_axes(var), shape, mesh, rules)))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a (N, T, ...) batch: N over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def ambient(mesh: Mesh | None):
  """Context in which traced code sees `mesh` as the ambient mesh (`get_abstract_mesh`), so
  that `per_shard` ops split themselves over it. Usable inside `jax.jit` (unlike
  `jax.set_mesh`); None: no mesh, a no-op."""
  if mesh is None:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def per_shard(fn, *arrays: jax.Array, split_heads: bool = True) -> jax.Array:
  """fn(*arrays), each array (N, H_i, ...), run by every device on its own (batch, head) shard
  of the ambient mesh: dim 0 over data x fsdp, dim 1 over tensor (each where it divides every
  array, and the axis is not already manual; split_heads=False keeps the heads whole, for ops
  where heads interact). For ops that treat each (batch, head) slice on its own but that XLA
  does not partition well: a Pallas call, the tile list's data-dependent gathers (partitioned
  by XLA, they all-gather q, k and v onto every device), `lax.top_k` (it gathers the batch).
  fn returns one (N, H, ...) array. Without an ambient mesh (`ambient`, `jax.set_mesh`) fn
  runs as is. Values fn closes over are replicated onto every shard."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(*arrays)
  free = lambda a: a in mesh.axis_names and a not in mesh.manual_axes and mesh.shape[a] > 1  # noqa: E731
  batch = tuple(a for a in BATCH_AXES if free(a))
  size = math.prod(mesh.shape[a] for a in batch)
  batch_spec = batch if batch and all(x.shape[0] % size == 0 for x in arrays) else None
  heads = split_heads and free("tensor") and all(x.shape[1] % mesh.shape["tensor"] == 0 for x in arrays)
  spec = P(batch_spec, "tensor" if heads else None)
  if spec == P(None, None):
    return fn(*arrays)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(arrays), out_specs=spec,
                       check_vma=False)(*arrays)
