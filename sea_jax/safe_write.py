"""Writing output folders without ever damaging what the user already has.

`check_destination` runs before any work: the destination is absent or an empty folder, is not
(inside) a source, and its parent is writable. `atomic_folder` writes into a temporary sibling
and renames it into place only when everything succeeded, so an interrupted or failed write
leaves the old state (nothing, or the empty folder) as it was; the sibling a killed writer left
behind is removed by the next write to the same destination. `check_room` refuses a write the
disk cannot hold before it starts.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

from sea_jax.errors import UserError


class DestinationError(UserError, ValueError):
  """An output path that cannot be written safely (one line for the user)."""


def _inside(child: Path, parent: Path) -> bool:
  return child == parent or parent in child.parents


def check_destination(dst: str | os.PathLike, sources: Sequence[str | os.PathLike] = (),
                      what: str = "output folder", min_free_bytes: int = 0) -> Path:
  """Checks `dst` before any work; returns its absolute path. DestinationError when it exists
  and is a file or a non-empty folder, is or overlaps a source, or cannot be written."""
  dst = Path(os.path.abspath(dst))
  for src in sources:
    if src is None or not os.path.exists(src):
      continue
    src = Path(os.path.realpath(src))
    real = Path(os.path.realpath(dst))
    if _inside(real, src) or _inside(src, real):
      raise DestinationError(f"{what} {dst} is the source {src} or overlaps it; choose "
                             "another folder")
  if dst.exists():
    if not dst.is_dir():
      raise DestinationError(f"{what} {dst} exists and is not a folder")
    if any(dst.iterdir()):
      raise DestinationError(f"{what} {dst} already exists and is not empty; choose a new "
                             "folder (nothing was written)")
  parent = dst.parent
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
    raise DestinationError(f"{what} {dst}: {parent} is not writable")
  check_room(parent, min_free_bytes, f"{what} {dst}")
  return dst


def free_bytes(path: str | os.PathLike) -> int:
  """Free bytes on the disk that holds `path` (or its nearest existing parent)."""
  probe = Path(os.path.abspath(path))
  while not probe.exists():
    probe = probe.parent
  return shutil.disk_usage(probe).free


def check_room(path: str | os.PathLike, need_bytes: int, what: str = "output folder") -> None:
  """DestinationError when the disk holding `path` has fewer than `need_bytes` free."""
  if need_bytes <= 0:
    return
  free = free_bytes(path)
  if free < need_bytes:
    raise DestinationError(f"{what}: {free / 2**20:.1f} MiB free on its disk, about "
                           f"{need_bytes / 2**20:.1f} MiB needed; free some space or choose "
                           "another disk (nothing was written)")


def check_writable_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
  """`path` is a folder we may write files into, or can be created: DestinationError if not."""
  path = Path(os.path.abspath(path))
  if path.exists() and not path.is_dir():
    raise DestinationError(f"{what} {path} exists and is not a folder")
  probe = path
  while not probe.exists():
    probe = probe.parent
  if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
    raise DestinationError(f"{what} {path}: {probe} is not writable")
  return path


OWNER_FILE = ".sea-jax-owner"  # names the command that writes into an output folder


def check_output_folder(path: str | os.PathLike, command: str, what: str = "--out",
                        also_ours: tuple[str, ...] = ()) -> Path:
  """Checks, writing nothing, that `path` may be `command`'s output folder: new, empty, or one
  `command` wrote before (its OWNER_FILE, or for folders written before that file existed one
  of `also_ours`). A folder holding anything else is refused. Returns the absolute path."""
  path = check_writable_folder(path, what)
  if path.is_dir():
    entries = [e.name for e in path.iterdir()]
    owner_file = path / OWNER_FILE
    if owner_file.is_file():
      owner = owner_file.read_text().strip()
      if owner != command:
        raise DestinationError(f"{what} {path} was written by {owner}, not {command}: choose "
                               "another folder")
    elif entries and not any(name in entries for name in also_ours):
      raise DestinationError(f"{what} {path} already holds files {command} did not write "
                             f"(e.g. {sorted(entries)[0]}): choose a new or empty folder")
  return path


def claim_output_folder(path: str | os.PathLike, command: str, what: str = "--out",
                        also_ours: tuple[str, ...] = ()) -> Path:
  """`check_output_folder`, then the folder is created and marked as `command`'s (nothing the
  user made is overwritten). Returns the absolute path."""
  path = check_output_folder(path, command, what, also_ours)
  path.mkdir(parents=True, exist_ok=True)
  (path / OWNER_FILE).write_text(command + "\n")
  return path


def written_by(command: str) -> str:
  """The mark a report file carries in its first bytes: `written by COMMAND`."""
  return f"written by {command}"


def claim_output_file(path: str | os.PathLike, command: str, what: str = "--out") -> Path:
  """`path` as `command`'s report file, checked before any work: absent, or a file whose first
  4 KiB carry `written_by(command)` (one this command wrote before); anything else, a folder
  or a file the user made, is refused. Returns the absolute path."""
  path = Path(os.path.abspath(path))
  if path.exists():
    if not path.is_file():
      raise DestinationError(f"{what} {path} exists and is not a regular file")
    with open(path, "rb") as f:
      head = f.read(4096)
    if written_by(command).encode() not in head:
      raise DestinationError(f"{what} {path} already exists and was not written by {command}: "
                             "choose a new file (nothing was written)")
  check_writable_folder(path.parent, f"{what} {path}: folder")
  return path


def write_output_file(path: str | os.PathLike, data: str | bytes, command: str,
                      what: str = "--out") -> None:
  """Writes `data` (which must carry `written_by(command)` in its first 4 KiB) to `path`
  through a temporary sibling and a rename: a failed write leaves the old file as it was."""
  path = claim_output_file(path, command, what)
  raw = data.encode("utf-8") if isinstance(data, str) else data
  if written_by(command).encode() not in raw[:4096]:
    raise ValueError(f"report for {path} does not carry {written_by(command)!r}")
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.partial-{os.getpid()}-")
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # the mode a plain open() would give, not mkstemp's 0600
    with os.fdopen(fd, "wb") as f:
      f.write(raw)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


class RunLock:
  """One writer per run folder: an exclusive `flock` on FOLDER/.lock held for the process's
  life (the OS drops it when the process dies, so a killed run's lock is simply taken over).
  The file names the holder (pid, host, start time) for the refusal's message."""

  def __init__(self, folder: str | os.PathLike, command: str):
    self.path = Path(folder) / ".lock"
    self.command = command
    self._fd: int | None = None

  def acquire(self) -> "RunLock":
    import fcntl
    import socket
    import time
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
      os.close(fd)
      raise DestinationError(f"{self.path.parent} is in use by {holder}; wait for it to end or "
                             "choose another folder") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{self.command} (pid {os.getpid()} on {socket.gethostname()}, started "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing drops the flock; the file stays (naming the last holder)
      self._fd = None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale_partials(dst: str | os.PathLike) -> list[Path]:
  """Removes the temporary siblings `.NAME.partial-PID-*` of `dst` left by a killed writer
  (PID no longer running on this machine); returns what it removed."""
  dst = Path(os.path.abspath(dst))
  removed = []
  if not dst.parent.is_dir():
    return removed
  pattern = re.compile(rf"^\.{re.escape(dst.name)}\.partial-(\d+)-")
  for sibling in dst.parent.iterdir():
    m = pattern.match(sibling.name)
    if m and sibling.is_dir() and not _alive(int(m.group(1))):
      shutil.rmtree(sibling, ignore_errors=True)
      removed.append(sibling)
  return removed


@contextlib.contextmanager
def atomic_folder(dst: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary sibling folder of `dst`; renames it to `dst` when the block succeeds,
  removes it when the block fails (`dst`, absent or an empty folder, is left as it was)."""
  dst = Path(os.path.abspath(dst))
  dst.parent.mkdir(parents=True, exist_ok=True)
  remove_stale_partials(dst)
  tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.partial-{os.getpid()}-"))
  try:
    yield tmp
    os.chmod(tmp, 0o755)
    if dst.is_dir() and not any(dst.iterdir()):
      dst.rmdir()
    os.rename(tmp, dst)
  except BaseException:
    _remove_tree(tmp)
    raise


def _remove_tree(path: Path, quiet_s: float = 1.0, limit_s: float = 30.0) -> None:
  """Removes `path` and keeps removing it until it has stayed absent for `quiet_s`: a failed
  Orbax save (a full disk) can leave tensorstore threads that recreate its folders
  (`params.orbax-checkpoint-tmp/ocdbt.process_0/d`) after the exception reached us."""
  start = last_seen = time.monotonic()
  while time.monotonic() - start < limit_s:
    if path.exists():
      shutil.rmtree(path, ignore_errors=True)
      last_seen = time.monotonic()
    elif time.monotonic() - last_seen >= quiet_s:
      return
    time.sleep(0.05)
