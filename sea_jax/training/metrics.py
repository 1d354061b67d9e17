"""OUT/metrics.jsonl (one JSON object per logged step, appended across resumes) and the
non-finite loss check."""
from __future__ import annotations

import json
import math
import os
from typing import Mapping


class NonFiniteLossError(RuntimeError):
  """A NaN or inf loss term; the message names the step and the term(s)."""


def check_finite(step: int, metrics: Mapping[str, float]) -> None:
  """Raises NonFiniteLossError naming `step` and every non-finite term."""
  bad = [f"{name}={value}" for name, value in metrics.items()
         if isinstance(value, float) and not math.isfinite(value)]
  if bad:
    raise NonFiniteLossError(f"non-finite loss at step {step}: {', '.join(bad)}")


class DamagedRunFileError(ValueError):
  """A run file (metrics.jsonl) that a person or a crash damaged; the message names the line."""


def read_records(path: str) -> list[dict]:
  """The records of a metrics.jsonl: JSON objects with an integer "step", in order. A last line
  cut short by a kill is dropped; any other bad line is a DamagedRunFileError naming it."""
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    lines = f.readlines()
  records = []
  for number, line in enumerate(lines, 1):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if number == len(lines) and not line.endswith("\n"):
        continue  # the last line, cut short by a kill
      raise DamagedRunFileError(f"{path} line {number} is not JSON: {line.strip()[:60]!r}"
                                ) from None
    if not isinstance(record, dict) or type(record.get("step")) is not int:
      raise DamagedRunFileError(f"{path} line {number} has no integer \"step\": "
                                f"{line.strip()[:60]!r}")
    records.append(record)
  return records


class MetricsLog:
  """Appends JSON lines to `path` (only on the writing process).

  On resume from step s, lines of steps > s (written after the checkpoint the run fell back
  to) are dropped first, so the file holds one line per logged step of the surviving run.
  """

  def __init__(self, path: str, *, resume_step: int, is_writer: bool = True):
    self.path = path
    self.is_writer = is_writer
    if is_writer:
      self._truncate_after(resume_step)

  def _truncate_after(self, step: int) -> None:
    if not os.path.isfile(self.path):
      return
    with open(self.path) as f:
      lines = f.readlines()
    keep = [json.dumps(r) + "\n" for r in read_records(self.path) if r["step"] <= step]
    if len(keep) != len(lines):
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(keep)
      os.replace(tmp, self.path)

  def write(self, record: Mapping) -> None:
    if not self.is_writer:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()
