"""The files a benchmark writes (--out and friends): claimed before any work, written at the end.

A report file is new, or one the same benchmark wrote before (its first line names it:
`safe_write.written_by`); anything else the user has at that path is refused with one line
(exit 2) before a single measurement runs, and a failed write leaves the old file as it was.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sea_jax import safe_write  # noqa: E402
from sea_jax.errors import UserError, one_line  # noqa: E402


def script_name(script_file: str) -> str:
  """'bench/NAME.py' for a benchmark's __file__."""
  return f"bench/{os.path.basename(script_file)}"


def _or_exit(check, *args, **kwargs):
  """`check(*args, **kwargs)`, or one `error:` line and exit 2 when the path is not ours."""
  try:
    return check(*args, **kwargs)
  except (UserError, OSError) as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    raise SystemExit(2) from None


def claim(script_file: str, *paths: str | None) -> None:
  """Checks every given output path for the benchmark `script_file`; exits 2 with one line
  when one is taken by something the benchmark did not write."""
  for path in paths:
    if path:
      _or_exit(safe_write.claim_output_file, path, script_name(script_file))


def claim_folder(script_file: str, path: str, what: str, also_ours: tuple[str, ...]) -> None:
  """The benchmark's output folder: new, empty or its own (`safe_write.claim_output_folder`),
  else one line and exit 2."""
  _or_exit(safe_write.claim_output_folder, path, script_name(script_file), what=what,
           also_ours=also_ours)


def write_markdown(script_file: str, path: str | None, text: str) -> None:
  """Writes `text` to `path` (if given) under an HTML comment naming the benchmark."""
  if not path:
    return
  command = script_name(script_file)
  header = f"<!-- {safe_write.written_by(command)} -->\n"
  safe_write.write_output_file(path, header + text.rstrip("\n") + "\n", command)


def write_json(script_file: str, path: str | None, payload: dict) -> None:
  """Writes `payload` (a dict) to `path` (if given) as JSON whose first key is written_by."""
  if not path:
    return
  import json
  command = script_name(script_file)
  body = {"written_by": safe_write.written_by(command), **payload}
  safe_write.write_output_file(path, json.dumps(body, indent=1) + "\n", command)


def device_line() -> str:
  """'Device: CPU, N cores, jax X (backend), YYYY-MM-DD' for a report's first line."""
  import datetime
  import platform

  import jax
  return (f"Device: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} ({jax.default_backend()}), "
          f"{datetime.date.today().isoformat()}")


def publish(script_file: str, table: str, md_path: str | None, json_path: str | None,
            payload: dict) -> None:
  """Prints the Markdown `table` and writes it and the JSON `payload` where asked."""
  print(table)
  write_markdown(script_file, md_path, table)
  write_json(script_file, json_path, payload)
