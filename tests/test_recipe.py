"""The end-to-end recipe at toy size, and the bundled default models."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from sea_jax import bundle


def test_recipe_stages_run_end_to_end_at_toy_size(tmp_path):
  env = dict(os.environ, TOY="1", OUT=str(tmp_path / "small"))
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop
  proc = subprocess.run(["bash", "recipes/small_sea.sh"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = tmp_path / "small" / "results"
  sweep = [json.loads(l) for l in open(results / "sea_sweep.jsonl")]
  assert [l["sea_k"] for l in sweep] == [1, 2, 4, 8, 16]
  assert json.loads(open(results / "performer.jsonl").read().splitlines()[-1])["attention"] == "performer"
  table = (tmp_path / "small" / "RESULTS.md").read_text()
  assert "dense teacher" in table and "Performer" in table
  assert (tmp_path / "small" / "k_sweep.png").stat().st_size > 1000
  # each stage resumes: re-running the finished recipe trains nothing more
  metrics = (tmp_path / "small" / "sea" / "metrics.jsonl").read_text()
  again = subprocess.run(["bash", "recipes/small_sea.sh"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1200)
  assert again.returncode == 0, again.stderr[-4000:]
  assert (tmp_path / "small" / "sea" / "metrics.jsonl").read_text() == metrics


def _bundled_or_skip():
  missing = [n for n in bundle.NAMES if not (bundle.MODELS_DIR / f"{n}.tar.xz").is_file()]
  if missing:
    pytest.skip(f"bundled models not present: {missing}")


def test_bundled_models_evaluate_on_a_wikitext_slice(tmp_path):
  _bundled_or_skip()
  env = dict(os.environ, SEA_JAX_CACHE=str(tmp_path / "cache"))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "eval.py", "--max-windows", "2", "--no-progress"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  assert [l["attention"] for l in lines] == ["dense", "sea"]
  assert all(1.0 < l["perplexity"] < 1e5 for l in lines)
  assert lines[-1]["sea_k"] is not None
