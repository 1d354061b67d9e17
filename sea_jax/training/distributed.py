"""Multi-host set-up and per-host batches.

`initialize` starts `jax.distributed` from explicit flags (--coordinator, --num-processes,
--process-id), or with no arguments on a TPU pod (or when --distributed asks for the cluster's
auto-detection: TPU, SLURM, ...). It must run before anything touches the devices.
Each host builds only the rows of the global batch that its devices hold.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding


def on_tpu_pod() -> bool:
  """Whether this is a Cloud TPU VM (where `jax.distributed.initialize()` finds the slice's
  hosts itself) or a GKE TPU pod, decided without touching the devices."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return True
  try:
    from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
  except ImportError:  # moved in a later jax: explicit flags or --distributed still work
    return False
  return bool(running_in_cloud_tpu_vm)


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None,
               *, force_auto: bool = False) -> bool:
  """Starts jax.distributed when asked or on a TPU pod; returns whether it did."""
  explicit = coordinator is not None or num_processes is not None or process_id is not None
  if explicit:
    if coordinator is None or num_processes is None or process_id is None:
      raise ValueError("--coordinator, --num-processes and --process-id go together")
    if num_processes > 1:
      try:  # CPU hosts exchange collectives through gloo
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
      except Exception:  # noqa: BLE001 - option renamed or gone in a later jax
        pass
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    return True
  if force_auto or on_tpu_pod():
    jax.distributed.initialize()
    return True
  return False


def host_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
  """(shard_index, num_shards): this host holds rows [i*b, (i+1)*b) of the global batch, b =
  B / num_shards (rows of its devices must be one contiguous block)."""
  B = global_shape[0]
  rows = set()
  for index in sharding.addressable_devices_indices_map(global_shape).values():
    start, stop, _ = index[0].indices(B)
    rows.update(range(start, stop))
  lo, hi = min(rows), max(rows) + 1
  size = hi - lo
  if len(rows) != size or B % size or lo % size:
    raise ValueError(f"this host's devices hold batch rows {sorted(rows)[:8]}..., not one "
                     f"aligned block of the global batch {B}; use a mesh whose data/fsdp "
                     "axes keep each host's devices together")
  return lo // size, B // size


def global_batch(local_rows: np.ndarray, sharding: NamedSharding,
                 global_shape: tuple[int, ...]) -> jax.Array:
  """A global array from this host's rows (`jax.make_array_from_process_local_data`)."""
  return jax.make_array_from_process_local_data(sharding, np.asarray(local_rows, np.int32),
                                                global_shape)
