"""Training checkpoints: Orbax `CheckpointManager`, async saves, newest-good resume, signals.

Layout: OUT/checkpoints/<step>/{state, meta}. `state` is the train state pytree (params, fixed
variables, optimizer state, step), each array restored straight into its sharding; `meta` is
JSON (sampler position, the run's essential settings). Orbax writes each step into a temporary
folder and renames it when complete, so a killed save never looks finished; unfinished ones are
cleaned up on the next start. A finished step that still fails to restore (a deleted or
truncated file) is reported with a warning naming its step, moved to OUT/checkpoints-corrupt/,
and the step before it is tried.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp


class TrainCheckpointer:
  """Saves and restores `{"state": pytree, "meta": json}` per step under `directory`."""

  def __init__(self, directory: str, keep: int, *, is_writer: bool = True):
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self.is_writer = is_writer
    self._manager = self._make_manager()

  def _make_manager(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                           cleanup_tmp_directories=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> bool:
    """Starts an async save of `step` (returns once the arrays are copied off the devices)."""
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest checkpoint that restores; None when there is none.

    A checkpoint that fails is warned about (naming its step) and set aside.
    """
    for step in reversed(self.steps()):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return step, restored["state"], dict(restored["meta"])
      except Exception as e:  # noqa: BLE001 - Orbax/tensorstore raise many kinds here
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        _quiet_failed_reads()
        print(f"warning: checkpoint at step {step} is corrupt or incomplete ({reason}); "
              f"set aside, using the one before it", file=sys.stderr, flush=True)
        self._set_aside(step)
    return None

  def _set_aside(self, step: int) -> None:
    """Moves a bad step out of the manager's folder (so training can write it again)."""
    if self.is_writer:
      aside = os.path.join(os.path.dirname(self.directory),
                           os.path.basename(self.directory) + "-corrupt")
      os.makedirs(aside, exist_ok=True)
      dst = os.path.join(aside, str(step))
      if os.path.exists(dst):
        shutil.rmtree(dst)
      shutil.move(os.path.join(self.directory, str(step)), dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"set_aside_{step}")
    self._manager.close()
    self._manager = self._make_manager()


def _quiet_failed_reads() -> None:
  """After a failed restore, tensorstore's pending reads complete on a closed event loop;
  that noise adds nothing once the failure has been reported."""
  from sea_jax.errors import quiet_closed_event_loop
  quiet_closed_event_loop()


class StopFlag:
  """SIGTERM/SIGINT set a flag (checked between steps); `signum` says which arrived."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  def install(self) -> "StopFlag":
    for sig in self.SIGNALS:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def uninstall(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.signum = signum

  def is_set(self) -> bool:
    """Whether any process got a signal (a collective when there are several processes)."""
    local = self.signum is not None
    if jax.process_count() == 1:
      return local
    import numpy as np
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray([int(local)], np.int32))
    return bool(np.max(flags))

  @property
  def exit_code(self) -> int:
    """128 + the signal number (143 for SIGTERM, 130 for SIGINT), the shell's convention."""
    return 128 + (self.signum or signal.SIGTERM)
