"""The end-to-end recipe at toy size, and the bundled default models."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from sea_jax import bundle


CORPUS = os.path.join(REPO, "..", "shared", "data", "gutenberg", "gutenberg_40books.txt")


@pytest.mark.skipif(not os.path.isfile(CORPUS),
                    reason="the recipe's held-out split needs ../shared/data/gutenberg")
def test_recipe_stages_run_end_to_end_at_toy_size(tmp_path):
  env = dict(os.environ, TOY="1", OUT=str(tmp_path / "small"), CORPUS=CORPUS)
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop
  proc = subprocess.run(["bash", "recipes/small_sea.sh"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = tmp_path / "small" / "results"
  for text in ("heldout", "wikitext"):
    sweep = [json.loads(l) for l in open(results / f"sea_sweep_{text}.jsonl")]
    assert [l["sea_k"] for l in sweep] == [1, 2, 4, 8, 64]
    performer = json.loads(open(results / f"performer_{text}.jsonl").read().splitlines()[-1])
    assert performer["attention"] == "performer"
  held = json.loads(open(results / "teacher_heldout.jsonl").read())
  assert held["protocol"] == "text-file" and held["text"].endswith("heldout.txt")
  assert held["tokenizer"] != "opt"  # the recipe's own BPE
  split = json.loads((tmp_path / "small" / "data" / "split.json").read_text())
  assert split["heldout_books"][0] == "Wells_The_Time_Machine"
  train = (tmp_path / "small" / "data" / "train.txt").read_text()
  assert "The Time Machine\n\n\nAn Invention" not in train
  report = tmp_path / "small" / "report"
  table = (report / "results.md").read_text()
  assert "dense teacher" in table and "Performer" in table and "coverage" in table
  for png in ("k_sweep.png", "distillation.png"):
    assert (report / png).stat().st_size > 1000
  stages = [json.loads(l)["stage"] for l in open(tmp_path / "small" / "stage_times.jsonl")]
  assert stages == ["corpus", "teacher", "sea", "performer", "perplexity", "pictures", "report"]
  assert "| teacher | " in table and "| all | " in table  # the stage table's wall times
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
  leftovers = [p.name for p in (tmp_path / "cache" / "bundled").iterdir() if "tmp" in p.name]
  assert not leftovers, f"unpacking left temporary folders behind: {leftovers}"
