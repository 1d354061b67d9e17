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


def claim(script_file: str, *paths: str | None) -> None:
  """Checks every given output path for the benchmark `script_file`; exits 2 with one line
  when one is taken by something the benchmark did not write."""
  command = script_name(script_file)
  try:
    for path in paths:
      if path:
        safe_write.claim_output_file(path, command)
  except (UserError, OSError) as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    raise SystemExit(2) from None


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
