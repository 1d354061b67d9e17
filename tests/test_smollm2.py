"""SmolLM2: the bundled pair (the main job, cut to one window) and its recipe
(`recipes/smollm2_sea.sh`) end to end on a tiny GGUF base."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from gguf_files import tiny_hf_model, write_gguf
from train_support import compile_cache_env
from sea_jax import bundle, gguf_io


CORPUS = os.path.join(REPO, "..", "shared", "data", "gutenberg", "gutenberg_40books.txt")


def _bundled_or_skip():
  archive = bundle.MODELS_DIR / f"{bundle.STUDENT}.tar.xz"
  if not archive.is_file():
    pytest.skip(f"the bundled student is not present: {archive}")
  try:
    gguf_io.resolve_gguf(bundle.BASE)
  except gguf_io.GGUFError as e:
    pytest.skip(f"the base model is not installed ({e})")


def test_bundled_pair_evaluates_on_a_wikitext_slice(tmp_path):
  """The main job, cut to one window: SmolLM2-135M from the installed GGUF, then the bundled
  student (its SEA parameters on that base); the base's sha256 is checked on the way."""
  _bundled_or_skip()
  env = dict(os.environ, SEA_JAX_CACHE=str(tmp_path / "cache"))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "eval.py", "--max-windows", "1", "--no-progress"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  assert [l["attention"] for l in lines] == ["dense", "sea"]
  assert [l["seq_len"] for l in lines] == [bundle.SEQ_LEN] * 2
  assert lines[0]["model"] == bundle.BASE and lines[-1]["sea_k"] == 64
  # a pretrained model, not a toy: dense WikiText-2 perplexity of SmolLM2-135M is about 17-19
  assert 10 < lines[0]["perplexity"] < 30 and lines[-1]["perplexity"] < 10 * lines[0]["perplexity"]
  leftovers = [p.name for p in (tmp_path / "cache" / "bundled").iterdir() if "tmp" in p.name]
  assert not leftovers, f"unpacking left temporary folders behind: {leftovers}"


@pytest.mark.skipif(not os.path.isfile(CORPUS),
                    reason="the recipe's training books need ../shared/data/gutenberg")
def test_smollm2_recipe_at_toy_size_on_a_tiny_gguf(tmp_path):
  """recipes/smollm2_sea.sh end to end on a tiny GGUF base: warm-up, end-to-end distillation,
  a step with the pooled keys mixed in, the packed student (SEA parameters alone + base.json) evaluated and generating on its base;
  a re-run trains nothing more."""
  base = tmp_path / "base.gguf"
  write_gguf(str(base), tiny_hf_model("llama", hidden=64), "llama")
  env = dict(os.environ, TOY="1", OUT=str(tmp_path / "run"), CORPUS=CORPUS, BASE=str(base),
             **compile_cache_env(tmp_path / "jax-cache"))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(["bash", "recipes/smollm2_sea.sh"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  student = tmp_path / "run" / "student"
  record = json.loads((student / "base.json").read_text())
  assert record["sha256"] == gguf_io.gguf_digest(str(base))
  from sea_jax import checkpoint
  saved = checkpoint.saved_arrays(str(student))
  assert saved and all("core" in path for path in saved)  # the SEA modules alone
  quick = {name: json.loads((tmp_path / "run" / "results" / f"quick_{name}.jsonl")
                            .read_text().splitlines()[-1]) for name in ("dense", "student")}
  assert quick["dense"]["attention"] == "dense" and quick["student"]["attention"] == "sea"
  stages = [json.loads(l)["stage"] for l in open(tmp_path / "run" / "stage_times.jsonl")]
  assert stages == ["corpus", "layerwise", "distill", "pooled", "pack", "quick"]
  assert checkpoint.load_config(str(student)).sea.pooled_keys  # the shipped form mixes them
  gen = subprocess.run([sys.executable, "-m", "sea_jax.generate", "--model", str(student),
                        "--prompt", "The tower", "--max-new-tokens", "4"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert gen.returncode == 0, gen.stderr[-3000:]
  line = json.loads(gen.stdout.strip().splitlines()[-1])
  assert line["attention"] == "sea" and 1 <= len(line["new_tokens"]) <= 4
  # a student whose base is missing, or is another model, is one clear line
  import shutil
  other = tmp_path / "other.gguf"
  write_gguf(str(other), tiny_hf_model("llama", hidden=64, seed=1), "llama")
  for source, match in ((str(tmp_path / "gone.gguf"), "cannot be found"),
                        (str(other), "not the same model")):
    moved = tmp_path / f"student-{match.split()[0]}"
    shutil.copytree(student, moved)
    (moved / "base.json").write_text(json.dumps({**record, "source": source}))
    proc = subprocess.run([sys.executable, "eval.py", "--model", str(moved), "--max-windows", "1",
                           "--seq-len", "64", "--no-progress"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert match in lines[0] and "Traceback" not in proc.stderr
  metrics = (tmp_path / "run" / "distill" / "metrics.jsonl").read_text()
  pooled_metrics = (tmp_path / "run" / "pooled" / "metrics.jsonl").read_text()
  again = subprocess.run(["bash", "recipes/smollm2_sea.sh"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1200)
  assert again.returncode == 0, again.stderr[-4000:]
  assert (tmp_path / "run" / "distill" / "metrics.jsonl").read_text() == metrics
  assert (tmp_path / "run" / "pooled" / "metrics.jsonl").read_text() == pooled_metrics
