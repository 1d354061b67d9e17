"""The one error path (sea_jax.errors) and the write guards (sea_jax.safe_write), in-process."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

from sea_jax import errors, safe_write
from sea_jax.training.cli import TrainError
from sea_jax.training.loop import check_checkpoint_room


def test_check_room_refuses_what_the_disk_cannot_hold(tmp_path):
  safe_write.check_room(tmp_path, 1)
  with pytest.raises(safe_write.DestinationError, match="MiB free on its disk"):
    safe_write.check_room(tmp_path / "not" / "yet", 2**62, "out")


def test_training_refuses_a_disk_too_small_for_one_checkpoint(tmp_path):
  huge = {"w": jax.ShapeDtypeStruct((2**40,), jnp.float32)}  # 4 TiB: shapes only
  with pytest.raises(TrainError, match="one checkpoint and final"):
    check_checkpoint_room(str(tmp_path), huge, optax.adamw(1e-3), keep=2)
  check_checkpoint_room(str(tmp_path), {"w": jax.ShapeDtypeStruct((8,), jnp.float32)},
                        optax.adamw(1e-3), keep=2)


def test_stale_partials_of_dead_writers_are_removed_live_ones_kept(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  stale = tmp_path / f".out.partial-{dead}-abc"
  live = tmp_path / f".out.partial-{os.getpid()}-def"
  other = tmp_path / f".other.partial-{dead}-ghi"
  for p in (stale, live, other):
    p.mkdir()
  assert safe_write.remove_stale_partials(tmp_path / "out") == [stale]
  assert live.is_dir() and other.is_dir() and not stale.exists()


def test_atomic_folder_leaves_nothing_on_failure(tmp_path):
  dst = tmp_path / "out"
  with pytest.raises(OSError):
    with safe_write.atomic_folder(dst) as tmp:
      (tmp / "half").write_text("x")
      raise OSError(errno.ENOSPC, "No space left on device")
  assert list(tmp_path.iterdir()) == []
  with safe_write.atomic_folder(dst) as tmp:
    (tmp / "whole").write_text("x")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  assert (dst / "whole").read_text() == "x"


def test_storage_errors_inside_tensorstore_messages_are_os_errors():
  e = ValueError('OUT_OF_RANGE: Error writing "a/0" in OCDBT database at local file "/x/": '
                 'Failed writing: "/x/d/123": Failed to write 4 bytes to file 11: No space '
                 "left on device [os_error_code='28']")
  inner = errors.storage_error(e)
  assert inner.errno == errno.ENOSPC and inner.filename == "/x/d/123"
  assert "out of disk space" in errors.describe_os_error(inner)
  assert errors.storage_error(ValueError("shape mismatch")) is None


@pytest.mark.parametrize("exc,code,text", [
    (errors.UserError("bad flag"), 2, "error: bad flag"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/x"), 2, "permission denied (/ro/x)"),
    (OSError(errno.ENOSPC, "No space left on device", "/d"), 2, "out of disk space"),
    (KeyError("oops"), 1, "internal error, please report it: KeyError"),
])
def test_run_command_prints_one_line(exc, code, text, capsys, monkeypatch):
  monkeypatch.delenv(errors.DEBUG_ENV, raising=False)

  def body():
    raise exc

  assert errors.run_command(body) == code
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and text in err[0], err


def test_run_command_with_debug_raises(monkeypatch):
  monkeypatch.setenv(errors.DEBUG_ENV, "1")
  with pytest.raises(KeyError):
    errors.run_command(lambda: {}["missing"])
