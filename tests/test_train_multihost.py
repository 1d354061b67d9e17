"""Two processes x 4 CPU devices (jax.distributed on localhost, gloo collectives) train like one
process with 8 devices: same losses, same final parameters."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

import train_support as ts
from conftest import relative_error


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  return ts.shared_setup(tmp_path_factory)


def test_two_processes_match_single_process(shared, tmp_path):
  root, teacher, text, cache = shared
  reference = ts.reference_run(root, teacher, text, cache)
  out = tmp_path / "multihost"
  port = ts.free_port()
  procs = []
  for i in range(2):
    args = ts.distill_args(teacher, text, out) + [
        "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2, "--process-id", i]
    procs.append(subprocess.Popen(ts.train_cmd(*args), cwd=ts.REPO, env=ts.child_env(4, cache),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  results = []
  try:
    for proc in procs:
      _, err = proc.communicate(timeout=600)
      results.append((proc.returncode, err))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for i, (rc, err) in enumerate(results):
    assert rc == 0, f"process {i} exited {rc}:\n{err[-4000:]}"

  got, want = ts.read_metrics(out), ts.read_metrics(reference)
  assert [r["step"] for r in got] == [1, 2, 3, 4]
  for g, w in zip(got, want):
    assert relative_error(g["loss"], w["loss"]) < 1e-5, (g["step"], g["loss"], w["loss"])
  a, b = ts.final_params(out), ts.final_params(reference)
  assert a.keys() == b.keys()
  flat_a = np.concatenate([a[k].ravel() for k in sorted(a)])
  flat_b = np.concatenate([b[k].ravel() for k in sorted(b)])
  assert relative_error(flat_a, flat_b) < 1e-5
  for key in a:
    if key.endswith("cnn.project.bias"):
      # Its true gradient is exactly 0 (a per-channel constant the next LayerNorm removes), so
      # Adam turns the collectives' rounding noise into +-lr steps; it counts in the global check.
      continue
    assert relative_error(a[key], b[key]) < 1e-5, key
  assert ts.checkpoint_steps(out) == [2, 4]
