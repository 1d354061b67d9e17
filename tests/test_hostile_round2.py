"""Hostile input, round two: two runs on one folder, outputs that would overwrite the user's
files, flags out of range, damaged run files, write failures. Each case as a user runs it
(subprocess): exit status 2, one `error:` line, no traceback, every file the user had
byte-identical."""
from __future__ import annotations

import errno
import signal
import time

import pytest

import train_support as ts
from gguf_files import tiny_hf_model, write_gguf
from test_hostile_input import (assert_one_line_error, run, run_with_file_size_limit,
                                tree_digest)
from sea_jax.errors import describe_os_error


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  root = tmp_path_factory.mktemp("round2")
  teacher = ts.make_teacher(root / "teacher")
  text = ts.write_text(root / "text.txt")
  gguf_file = root / "tiny.gguf"
  write_gguf(str(gguf_file), tiny_hf_model("llama", hidden=64), "llama")
  return root, teacher, text, gguf_file


def _cache(shared):
  """The module's one JAX compilation cache: every train.py run here compiles the same step."""
  return shared[0] / "jax-cache"


# ---------------------------------------------------------------- one writer per run folder


def test_a_second_run_on_a_live_run_folder_is_refused_at_once(shared, tmp_path):
  _, teacher, text, _ = shared
  out = tmp_path / "run"
  first = ts.start_train(ts.distill_args(teacher, text, out, mesh=None), devices=1,
                         cache_dir=_cache(shared), pause=3)
  try:
    ts.wait_for(lambda: len(ts.read_metrics(out)) >= 1, first)
    started = time.time()
    second = ts.run_train(ts.distill_args(teacher, text, out, mesh=None), devices=1,
                          cache_dir=_cache(shared), check=False,
                          timeout=60)
    assert time.time() - started < 15
    assert_one_line_error(second, "in use by train.py")
    assert f"pid {first.pid}" in second.stderr
  finally:
    first.wait(timeout=300)
  assert first.returncode == 0, first.stderr.read()[-3000:]
  steps = [r["step"] for r in ts.read_metrics(out)]
  assert steps == sorted(set(steps)) == [1, 2, 3, 4]


def test_a_killed_runs_lock_is_taken_over(shared, tmp_path):
  _, teacher, text, _ = shared
  out = tmp_path / "run"
  first = ts.start_train(ts.distill_args(teacher, text, out, extra=["--save-every", 1], mesh=None),
                         devices=1, cache_dir=_cache(shared), pause=2)
  ts.wait_for(lambda: 1 in ts.checkpoint_steps(out), first)
  first.send_signal(signal.SIGKILL)
  first.wait(timeout=60)
  assert (out / ".lock").exists()  # left behind by the killed run
  # the OS dropped the killed run's flock
  ts.run_train(ts.distill_args(teacher, text, out, mesh=None), devices=1, cache_dir=_cache(shared))
  steps = [r["step"] for r in ts.read_metrics(out)]
  assert steps == [1, 2, 3, 4]


# ---------------------------------------------------------------- outputs that overwrite


def test_train_into_a_folder_of_the_users_files_touches_nothing(shared, tmp_path):
  _, teacher, text, _ = shared
  out = tmp_path / "mine"
  out.mkdir()
  (out / "notes.txt").write_text("my notes\n")
  before = tree_digest(out)
  proc = ts.run_train(ts.distill_args(teacher, text, out, mesh=None), devices=1,
                      cache_dir=_cache(shared), check=False)
  assert_one_line_error(proc, "did not write")
  assert tree_digest(out) == before


def test_visualize_into_a_folder_of_the_users_files_touches_nothing(shared, tmp_path):
  _, teacher, _, _ = shared
  out = tmp_path / "pictures"
  out.mkdir()
  (out / "summary.json").write_text('{"mine": true}\n')
  before = tree_digest(out)
  proc = run("-m", "sea_jax.visualize", "--model", teacher, "--attention", "sea", "--sea-K",
             "16", "--text", "a few words of text", "--out", out)
  assert_one_line_error(proc, "did not write")
  assert tree_digest(out) == before
  fresh = tmp_path / "fresh"
  for _ in range(2):  # its own folder it may write again
    proc = run("-m", "sea_jax.visualize", "--model", teacher, "--attention", "sea", "--sea-K",
               "16", "--text", "a few words of text", "--out", fresh)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("script, flag", [("bench/bench_sea_memory.py", "--out"),
                                          ("bench/bench_real_pair.py", "--out-json"),
                                          ("bench/bench_sparse_attention.py", "--out-png"),
                                          ("bench/bench_gpu.py", "--out-dir")])
def test_a_benchmark_never_overwrites_the_users_file(tmp_path, script, flag):
  """Refused before any measurement (well inside 15 s), the user's file byte-identical."""
  target = tmp_path / "mine"
  if flag == "--out-dir":
    target.mkdir()
    (target / "notes.md").write_text("my notes\n")
  else:
    target.write_text("my table\n")
  before = tree_digest(tmp_path)
  started = time.time()
  proc = run(script, flag, target, timeout=60)
  assert_one_line_error(proc, "did not write" if flag == "--out-dir" else "not written by")
  assert time.time() - started < 15 and tree_digest(tmp_path) == before


def test_a_report_file_is_rewritten_only_by_its_own_writer(tmp_path):
  from sea_jax import safe_write
  path = tmp_path / "table.md"
  for rows in ("| 1 |", "| 2 |"):  # a new file, then the same command's own file again
    safe_write.write_output_file(path, f"<!-- {safe_write.written_by('bench/a.py')} -->\n{rows}\n",
                                 "bench/a.py")
  assert path.read_text().endswith("| 2 |\n") and (path.stat().st_mode & 0o044)  # not 0600
  with pytest.raises(safe_write.DestinationError, match="not written by bench/b.py"):
    safe_write.claim_output_file(path, "bench/b.py")
  assert [p.name for p in tmp_path.iterdir()] == ["table.md"]  # no temporary file left


# ---------------------------------------------------------------- no silent wrong output


def test_generate_refuses_a_tokenizer_the_model_cannot_read(shared, tmp_path):
  """A Llama folder without tokenizer files gets the bundled OPT tokenizer (50,265 ids): more
  than its 320-token vocabulary, so generate refuses it as eval does."""
  _, _, _, gguf_file = shared
  folder = tmp_path / "llama"
  proc = run("-m", "sea_jax.convert", gguf_file, folder)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    (folder / name).unlink(missing_ok=True)
  for cmd in (("-m", "sea_jax.generate", "--model", folder, "--prompt", "Hello"),
              ("eval.py", "--model", folder, "--max-windows", "1", "--seq-len", "32")):
    assert_one_line_error(run(*cmd), "do not match")


@pytest.mark.parametrize("flags, match", [
    (["--mode", "pretrain", "--layers", "0", "--d-model", "32", "--heads", "4"], "--layers must be >= 1"),
    (["--mode", "pretrain", "--layers", "-2", "--d-model", "32", "--heads", "4"], "--layers must be >= 1"),
    (["--mode", "pretrain", "--layers", "2", "--d-model", "-64", "--heads", "4"], "--d-model must be >= 1"),
    (["--mode", "pretrain", "--layers", "2", "--d-model", "32", "--heads", "4", "--lr", "nan"], "--lr must be a finite"),
    (["--mode", "pretrain", "--layers", "2", "--d-model", "32", "--heads", "4", "--weight-decay", "inf"], "--weight-decay must be a finite"),
])
def test_train_numeric_flags_out_of_range(tmp_path, flags, match):
  out = tmp_path / "run"
  started = time.time()
  proc = run("train.py", "--out", out, "--steps", "1", *flags)
  assert_one_line_error(proc, match)
  assert time.time() - started < 15 and not out.exists()


@pytest.mark.parametrize("spec, match", [("data=1,data=1", "given twice"),
                                         ("data=2,fsdp=1,data=4", "given twice"),
                                         ("data=0", ">= 1"), ("data=3", "devices"),
                                         ("pipeline=2", "NAME=SIZE"), ("data=two", "size")])
def test_a_mesh_that_does_not_fit_is_refused(spec, match):
  from sea_jax.sharding import MeshError, parse_mesh
  with pytest.raises(MeshError, match=match):
    parse_mesh(spec, num_devices=2)


def test_eval_with_a_mesh_axis_given_twice_is_one_line(shared):
  _, teacher, _, _ = shared
  proc = run("eval.py", "--model", teacher, "--mesh", "data=1,data=1", "--max-windows", "1")
  assert_one_line_error(proc, "given twice")


def test_sea_K_beyond_the_models_positions_is_refused_before_allocating(shared, tmp_path):
  _, teacher, _, _ = shared
  for cmd in (("eval.py", "--model", teacher, "--attention", "sea", "--sea-K", "100000"),
              ("-m", "sea_jax.visualize", "--model", teacher, "--attention", "sea",
               "--sea-K", "100000", "--text", "hi there", "--out", tmp_path / "v"),
              ("-m", "sea_jax.convert", teacher, tmp_path / "c", "--attention", "sea",
               "--sea-K", "100000")):
    started = time.time()
    proc = run(*cmd)
    assert_one_line_error(proc, "exceeds the model's")
    assert time.time() - started < 15
  assert not (tmp_path / "c").exists() and not (tmp_path / "v").exists()


def test_a_damaged_metrics_file_is_reported_before_anything_is_rewritten(shared, tmp_path):
  _, teacher, text, _ = shared
  out = tmp_path / "run"
  ts.run_train(ts.distill_args(teacher, text, out, steps=2, mesh=None), devices=1,
               cache_dir=_cache(shared))
  with open(out / "metrics.jsonl", "a") as f:
    f.write('{"step": "four"}\n')
  before = tree_digest(out)
  proc = ts.run_train(ts.distill_args(teacher, text, out, steps=4, mesh=None), devices=1,
                      cache_dir=_cache(shared), check=False)
  assert_one_line_error(proc, "metrics.jsonl line 3")
  assert tree_digest(out) == before


# ---------------------------------------------------------------- write failures


def test_to_hf_past_a_file_size_limit_is_one_line_and_leaves_nothing(shared, tmp_path):
  _, teacher, _, _ = shared
  dst = tmp_path / "hf"
  proc = run_with_file_size_limit(64, "-m", "sea_jax.convert", teacher, dst, "--to-hf")
  assert_one_line_error(proc, "File too large")
  assert not dst.exists() and not list(tmp_path.glob(".hf.partial*"))


def test_an_os_error_without_a_file_name_keeps_the_os_words():
  """tempfile's "no usable temporary directory" is an ENOENT without a file name: the line
  carries the OS's words, not a bare "not found"."""
  e = FileNotFoundError(errno.ENOENT, "No usable temporary directory found in ['/tmp']")
  assert "No usable temporary directory" in describe_os_error(e)
  e = FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y")
  assert describe_os_error(e) == "not found (/x/y)"
