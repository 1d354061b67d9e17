"""Each command under bad input, as a user runs it (subprocess): exit status 2, one `error:`
line, no traceback, and every source folder byte-identical afterwards."""
from __future__ import annotations

import hashlib
import os
import pathlib
import shlex
import signal
import subprocess
import time
import sys

import pytest

from conftest import REPO
from hf_models import save_tiny_opt


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop
  return env


def run(*args, timeout=300, env=None):
  proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env={**_env(), **(env or {})},
                        capture_output=True, text=True, timeout=timeout)
  return proc


def run_with_file_size_limit(kib: int, *args, timeout=300):
  """`run` under `ulimit -f` (KiB): every write past the limit fails with EFBIG, like a full
  disk, without needing a tmpfs (Python ignores SIGXFSZ, so the write returns the error)."""
  cmd = f"ulimit -f {kib} && exec {shlex.join([sys.executable, *map(str, args)])}"
  return subprocess.run(["bash", "-c", cmd], cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=timeout)


def assert_one_line_error(proc, match: str):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert match in errors[0], errors[0]


def tree_digest(folder: pathlib.Path) -> dict[str, str]:
  """{relative path: sha256} of every file under `folder` (and the folder's own listing)."""
  out = {}
  for path in sorted(folder.rglob("*")):
    rel = str(path.relative_to(folder))
    out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
  return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """A tiny HF OPT folder and its converted sea-jax model folder."""
  root = tmp_path_factory.mktemp("hostile")
  hf = root / "hf"
  save_tiny_opt(str(hf), with_tokenizer=True)
  ours = root / "ours"
  proc = run("-m", "sea_jax.convert", hf, ours)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return hf, ours


# ---------------------------------------------------------------------------- converter


def test_convert_onto_its_own_source_touches_nothing(models):
  hf, ours = models
  for src in (hf, ours):
    before = tree_digest(src)
    extra = ["--to-hf"] if src == ours else []
    assert_one_line_error(run("-m", "sea_jax.convert", src, src, *extra), "overlaps")
    assert tree_digest(src) == before


def test_convert_into_a_folder_inside_the_source(models, tmp_path):
  hf, _ = models
  before = tree_digest(hf)
  assert_one_line_error(run("-m", "sea_jax.convert", hf, hf / "sub"), "overlaps")
  assert tree_digest(hf) == before


def test_convert_into_a_non_empty_folder_mixes_nothing(models, tmp_path):
  hf, _ = models
  dst = tmp_path / "run"
  dst.mkdir()
  (dst / "metrics.jsonl").write_text('{"step": 1}\n')
  before = tree_digest(dst)
  assert_one_line_error(run("-m", "sea_jax.convert", hf, dst), "not empty")
  assert tree_digest(dst) == before


def test_convert_onto_a_file(models, tmp_path):
  hf, _ = models
  dst = tmp_path / "afile"
  dst.write_text("keep me")
  assert_one_line_error(run("-m", "sea_jax.convert", hf, dst), "not a folder")
  assert dst.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_convert_into_an_unwritable_folder(models, tmp_path):
  hf, _ = models
  parent = tmp_path / "ro"
  parent.mkdir()
  parent.chmod(0o555)
  try:
    assert_one_line_error(run("-m", "sea_jax.convert", hf, parent / "out"), "not writable")
  finally:
    parent.chmod(0o755)


def test_to_hf_of_a_corrupt_checkpoint_is_one_line(models, tmp_path):
  _, ours = models
  import shutil
  bad = tmp_path / "bad"
  shutil.copytree(ours, bad)
  data_files = sorted(p for p in (bad / "params").rglob("*") if p.is_file()
                      and p.stat().st_size > 1000)
  for p in data_files:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
  before = tree_digest(bad)
  proc = run("-m", "sea_jax.convert", bad, tmp_path / "out", "--to-hf")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert not (tmp_path / "out").exists()  # nothing half-written
  assert tree_digest(bad) == before


def test_a_failed_conversion_leaves_no_partial_folder(tmp_path):
  hf = tmp_path / "hf"
  save_tiny_opt(str(hf))
  weights = hf / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:-100])  # truncated
  proc = run("-m", "sea_jax.convert", hf, tmp_path / "out")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert not (tmp_path / "out").exists()
  assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_convert_past_a_file_size_limit_keeps_nothing(models, tmp_path):
  hf, _ = models
  before = tree_digest(hf)
  proc = run_with_file_size_limit(64, "-m", "sea_jax.convert", hf, tmp_path / "out")
  assert_one_line_error(proc, "out of disk space or over a file-size limit")
  assert "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder, no partial sibling
  assert tree_digest(hf) == before
  assert run("-m", "sea_jax.convert", hf, tmp_path / "out").returncode == 0


def test_a_killed_conversion_leaves_no_folder_and_the_next_one_cleans_up(models, tmp_path):
  hf, _ = models
  dst = tmp_path / "out"
  proc = subprocess.Popen([sys.executable, "-m", "sea_jax.convert", str(hf), str(dst)],
                          cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  partial = lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
  end = time.time() + 120
  while not partial() and proc.poll() is None and time.time() < end:
    time.sleep(0.002)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert partial(), "the conversion ended before it started writing"
  assert not dst.exists()  # the destination never looks finished
  proc = run("-m", "sea_jax.convert", hf, dst)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not partial()  # the killed writer's temporary folder is gone
  assert (dst / "config.json").is_file() and (dst / "params").is_dir()


def test_debug_shows_the_traceback(tmp_path):
  args = ("-m", "sea_jax.convert", tmp_path / "missing", tmp_path / "out")
  assert_one_line_error(run(*args), "no such folder")
  for proc in (run(*args, "--debug"), run(*args, env={"SEA_JAX_DEBUG": "1"})):
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConvertError" in proc.stderr, proc.stderr[-2000:]
  proc = run("eval.py", "--model", tmp_path / "missing", env={"SEA_JAX_DEBUG": "1"})
  assert proc.returncode != 0 and "Traceback" in proc.stderr, proc.stderr[-2000:]


# ---------------------------------------------------------------------------- eval.py


@pytest.mark.parametrize("flags,match", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--batch-size", "-2"], "--batch-size must be >= 1"),
    (["--max-windows", "0"], "--max-windows must be >= 1"),
    (["--seq-len", "1"], "--seq-len must be at least 2"),
    (["--sea-k", "0"], "--sea-k must be >= 1"),
    (["--sea-k", "a,b"], "--sea-k expects integers"),
])
def test_eval_flag_errors_come_before_loading(models, flags, match):
  _, ours = models
  assert_one_line_error(run("eval.py", "--model", ours, *flags, "--no-progress"), match)


def test_eval_text_file_errors(models, tmp_path):
  _, ours = models
  cases = {"missing.txt": None, "empty.txt": b"", "binary.txt": b"\x00\x01\x02abc",
           "latin1.txt": "caf\xe9 ".encode("latin-1") * 50, "short.txt": b"Hello there."}
  want = {"missing.txt": "no such file", "empty.txt": "empty", "binary.txt": "binary",
          "latin1.txt": "not UTF-8", "short.txt": "shorter than one window"}
  for name, content in cases.items():
    path = tmp_path / name
    if content is not None:
      path.write_bytes(content)
    proc = run("eval.py", "--model", ours, "--text-file", path, "--seq-len", "64",
               "--no-progress")
    assert_one_line_error(proc, want[name])


def test_eval_text_file_counts_tokens_like_the_tokenizer(models, tmp_path):
  import json
  from sea_jax.data import load_tokenizer
  _, ours = models
  text = (REPO / "sea_jax" / "assets" / "wikitext-2-raw" / "wiki.valid.raw").read_text()[:6000]
  path = tmp_path / "t.txt"
  path.write_text(text, encoding="utf-8")
  proc = run("eval.py", "--model", ours, "--text-file", path, "--seq-len", "64",
             "--sea-k", "8,16", "--no-progress")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "--sea-k has no effect on dense attention" in proc.stderr
  assert len(proc.stdout.splitlines()) == 1  # a dense model is evaluated once, not once per k
  line = json.loads(proc.stdout.splitlines()[-1])
  n = len(load_tokenizer(str(ours))(text, add_special_tokens=False)["input_ids"])
  assert (line["tokens"], line["windows"], line["text"]) == (n, n // 64, str(path))
  assert line["protocol"] == "text-file" and line["tokenizer"] == "opt"


# ---------------------------------------------------------------------------- train.py


def _pretrain(out, text, *extra):
  return run("train.py", "--mode", "pretrain", "--out", out, "--train-text", text, "--layers",
             1, "--d-model", 16, "--heads", 2, "--steps", 2, "--seq-len", 8, "--batch-size", 1,
             "--save-every", 1, "--no-progress", *extra)


def test_train_bad_text_leaves_no_new_folder(tmp_path):
  for name, content, match in (("bin.txt", b"\x00\xff" * 50, "binary"),
                               ("empty.txt", b"", "empty"),
                               ("latin1.txt", "\xe9t\xe9 ".encode("latin-1") * 50, "UTF-8")):
    text = tmp_path / name
    text.write_bytes(content)
    out = tmp_path / f"out-{name}"
    assert_one_line_error(_pretrain(out, text), match)
    assert not out.exists()


def test_train_out_is_a_file(tmp_path):
  out = tmp_path / "afile"
  out.write_text("keep me")
  text = tmp_path / "t.txt"
  text.write_text("some words here and there. " * 50)
  assert_one_line_error(_pretrain(out, text), "not a folder")
  assert out.read_text() == "keep me"


def test_train_past_a_file_size_limit_is_one_line_then_resumes(tmp_path):
  text = tmp_path / "t.txt"
  text.write_text("some words here and there. " * 200)
  out = tmp_path / "run"
  proc = run_with_file_size_limit(1000, "train.py", "--mode", "pretrain", "--out", out,
                                  "--train-text", text, "--layers", 1, "--d-model", 16,
                                  "--heads", 2, "--steps", 2, "--seq-len", 8, "--batch-size", 1,
                                  "--save-every", 1, "--no-progress")
  assert_one_line_error(proc, "out of disk space or over a file-size limit")
  proc = _pretrain(out, text)  # room again: the same command finishes the run
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (out / "final" / "config.json").is_file()
  assert not any("tmp" in p.name for p in (out / "checkpoints").iterdir())


def test_refused_resume_keeps_the_runs_record(tmp_path):
  text = tmp_path / "t.txt"
  text.write_text("some words here and there. " * 200)
  out = tmp_path / "run"
  proc = _pretrain(out, text)
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = (out / "train_config.json").read_bytes()
  assert_one_line_error(_pretrain(out, text, "--seed", 7), "cannot resume")
  assert (out / "train_config.json").read_bytes() == record
  proc = run("train.py", "--mode", "pretrain", "--out", out, "--train-text", text, "--layers",
             1, "--d-model", 16, "--heads", 2, "--steps", 1, "--seq-len", 8, "--batch-size", 1,
             "--save-every", 1, "--no-progress")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "already at step 2, past --steps 1" in proc.stderr


# ---------------------------------------------------------------------------- damaged inputs


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  import shutil
  shutil.copytree(src, dst)
  return dst


def _truncate(path: pathlib.Path) -> None:
  path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


@pytest.mark.parametrize("damage", ["config.json", "tokenizer.json", "model.safetensors",
                                    "wrong family"])
def test_convert_a_damaged_or_foreign_hf_folder_is_one_line(models, tmp_path, damage):
  import json
  hf, _ = models
  src = _copy(hf, tmp_path / "src")
  if damage == "wrong family":
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (src / "config.json").write_text(json.dumps(config))
  else:
    _truncate(src / damage)
  before = tree_digest(src)
  proc = run("-m", "sea_jax.convert", src, tmp_path / "out")
  assert_one_line_error(proc, "gpt2" if damage == "wrong family" else "")
  assert not (tmp_path / "out").exists() and tree_digest(src) == before


@pytest.mark.parametrize("damage", ["config.json", "tokenizer.json", "params/_METADATA",
                                    "params/manifest.ocdbt", "wrong family"])
def test_eval_a_damaged_or_foreign_model_folder_is_one_line(models, tmp_path, damage):
  import json
  _, ours = models
  src = _copy(ours, tmp_path / "src")
  target = src / damage
  if damage == "wrong family":
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(config))
  elif not target.exists():
    pytest.skip(f"this Orbax version writes no {damage}")
  else:
    _truncate(target)
  before = tree_digest(src)
  proc = run("eval.py", "--model", src, "--seq-len", "32", "--max-windows", "1",
             "--no-progress")
  assert_one_line_error(proc, "llama" if damage == "wrong family" else "")
  assert tree_digest(src) == before
