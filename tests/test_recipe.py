"""The small SEA reproduction's recipe (`recipes/small_sea.sh`) end to end at toy size."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO
from train_support import compile_cache_env


CORPUS = os.path.join(REPO, "..", "shared", "data", "gutenberg", "gutenberg_40books.txt")


@pytest.mark.skipif(not os.path.isfile(CORPUS),
                    reason="the recipe's held-out split needs ../shared/data/gutenberg")
def test_recipe_stages_run_end_to_end_at_toy_size(tmp_path):
  env = dict(os.environ, TOY="1", OUT=str(tmp_path / "small"), CORPUS=CORPUS,
             **compile_cache_env(tmp_path / "jax-cache"))
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
  drawn = (tmp_path / "small" / "pictures" / "summary.json").stat().st_mtime_ns
  again = subprocess.run(["bash", "recipes/small_sea.sh"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1200)
  assert again.returncode == 0, again.stderr[-4000:]
  assert (tmp_path / "small" / "sea" / "metrics.jsonl").read_text() == metrics
  assert (tmp_path / "small" / "pictures" / "summary.json").stat().st_mtime_ns == drawn
