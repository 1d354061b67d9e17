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
    keep = []
    for line in lines:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut short by a kill
      if int(record.get("step", 0)) <= step:
        keep.append(json.dumps(record) + "\n")
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
