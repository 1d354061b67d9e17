"""The project's one error path: `UserError` and the top-level handler every command runs under.

Every failure a user can cause (a path, a permission, a corrupt checkpoint, a text encoding, a
flag value) is a `UserError` subclass (`ConfigError`, `TrainError`, `ConvertError`,
`CheckpointError`, `DestinationError`, ...) or an `OSError` from the file system; `run_command`
prints either as one `error: ...` line and exits 2. Anything else is a bug in sea-jax: one line
naming it, exit 1. `--debug` or `SEA_JAX_DEBUG=1` lets every exception through with its traceback.
"""
from __future__ import annotations

import errno
import os
import re
import sys
import threading
from typing import Callable

DEBUG_ENV = "SEA_JAX_DEBUG"
DEBUG_HINT = f"rerun with --debug or {DEBUG_ENV}=1 for the traceback"


class UserError(Exception):
  """Bad input the user can fix: printed as one line, exit code 2."""


def debug_enabled(flag: bool = False) -> bool:
  return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def describe_os_error(e: OSError) -> str:
  """What the user must do about a file-system error, in one line."""
  where = f" ({e.filename})" if getattr(e, "filename", None) else ""
  if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
    return (f"out of disk space or over a file-size limit{where}: {e.strerror}; free some "
            "space (or raise the limit) and re-run")
  if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    return f"permission denied{where}: choose a folder you can write"
  if e.errno == errno.ENOENT and where:
    return f"not found{where}"
  return f"{e.strerror or one_line(e)}{where}"  # the OS's own words (e.g. no usable temp dir)


_OS_CODE = re.compile(r"os_error_code='(\d+)'")
_LOCAL_FILE = re.compile(r'Failed (?:writing|reading|to open)[^"]*"([^"]+)"')


def storage_error(e: BaseException) -> OSError | None:
  """The OSError inside a TensorStore/Orbax error message (they arrive as ValueError or
  RuntimeError carrying `os_error_code='N'`), or None."""
  text = str(e)
  m = _OS_CODE.search(text)
  if not m:
    return None
  code = int(m.group(1))
  where = _LOCAL_FILE.search(text)
  return OSError(code, os.strerror(code), where.group(1) if where else None)


_quieted: set[str] = set()


def _is_closed_loop(exc: BaseException | None) -> bool:
  return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


def quiet_closed_event_loop() -> None:
  """Hides asyncio's "Event loop is closed" (and its "exception was never retrieved") from
  TensorStore callbacks that outlive a failed read or write, whether raised as unraisable or
  in a thread. Installed once."""
  import logging
  if "loop" in _quieted:
    return
  _quieted.add("loop")
  logging.getLogger("asyncio").addFilter(
      lambda record: "exception was never retrieved" not in record.getMessage())
  previous, previous_thread = sys.unraisablehook, threading.excepthook
  sys.unraisablehook = lambda u: None if _is_closed_loop(u.exc_value) else previous(u)
  threading.excepthook = lambda a: None if _is_closed_loop(a.exc_value) else previous_thread(a)


def quiet_background_noise() -> None:
  """Hides what Orbax's and TensorStore's background threads print about a failure the main
  thread then raises (and we report in one line): absl records with a traceback, and the
  closed event loop (`quiet_closed_event_loop`)."""
  import logging
  quiet_closed_event_loop()
  if "absl" in _quieted:
    return
  _quieted.add("absl")
  for name in ("absl", "asyncio"):
    logging.getLogger(name).addFilter(
        lambda record: not (record.exc_info or "raised an exception" in record.getMessage()))


def add_debug_flag(parser) -> None:
  parser.add_argument("--debug", action="store_true",
                      help=f"show full tracebacks (also {DEBUG_ENV}=1)")


def run_command(body: Callable[[], int], *, debug: bool = False,
                user_errors: tuple[type[BaseException], ...] = ()) -> int:
  """Runs a command's body under the one error policy; returns its exit code.

  user_errors: extra exception types that mean bad input for this command (beyond UserError
  and OSError), e.g. ValueError from flag parsing.
  """
  if debug_enabled(debug):
    return body()
  quiet_background_noise()
  try:
    return body()
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr, flush=True)
    return 130
  except (UserError, *user_errors) as e:
    print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
    return 2
  except OSError as e:
    print(f"error: {describe_os_error(e)}", file=sys.stderr, flush=True)
    return 2
  except Exception as e:  # noqa: BLE001 - the last line of defence: a bug, named in one line
    inner = storage_error(e)
    if inner is not None:
      print(f"error: {describe_os_error(inner)}", file=sys.stderr, flush=True)
      return 2
    print(f"error: internal error, please report it: {type(e).__name__}: {one_line(e)} "
          f"({DEBUG_HINT})", file=sys.stderr, flush=True)
    return 1
