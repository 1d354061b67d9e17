"""sea_jax.visualize: up-sampled estimate, exact mask pictures, PNGs, summary.json, CLI errors."""
import json
import os
import subprocess
import sys

import matplotlib.image as mpimg
import numpy as np
import pytest

from conftest import REPO
from hf_models import save_tiny_opt

TEXT = ("The quick brown fox jumps over the lazy dog. It was a sunny day in the park, and the "
        "children played by the old stone bridge until the evening came. Then everyone went "
        "home for dinner.")  # 40 tokens: longer than K=16, no token tick labels


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """(dense HF folder, SEA model folder with K=16, k=4 made from it, another dense HF folder as
  teacher); tiny OPT: 2 layers, 4 heads, 128 positions."""
  from sea_jax.config import SEAConfig
  from sea_jax.convert import hf_to_model_folder
  root = tmp_path_factory.mktemp("vis")
  hf, sea = str(root / "hf"), str(root / "sea")
  save_tiny_opt(hf, "pre", seed=3, with_tokenizer=True)
  hf_to_model_folder(hf, sea, attention="sea", sea=SEAConfig(K=16, k=4))
  teacher = str(root / "teacher")
  save_tiny_opt(teacher, "pre", seed=4)
  return hf, sea, teacher


@pytest.fixture(scope="module")
def run(folders):
  """The SEA model, the text's ids and its attention maps (no teacher)."""
  from sea_jax import checkpoint, data, visualize
  model = checkpoint.load_pretrained(folders[1])
  ids = data.encode(data.load_tokenizer(folders[1]), TEXT)
  return model, ids, visualize.attention_maps(model, ids, sea_k=4)


def _check_png(path):
  assert os.path.getsize(path) > 0
  img = mpimg.imread(path)
  assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200 and img.shape[2] in (3, 4)
  assert float(img.std()) > 0.01  # not a constant picture


def test_upsample_estimate_rows_sum_to_one():
  import jax
  from sea_jax.ops import bin_bounds
  from sea_jax.sea import masked_bin_softmax
  from sea_jax.visualize import upsample_estimate
  T, K = 37, 8  # rows with t+1 < K (empty bins) and t+1 >= K (uneven bins)
  est = np.asarray(masked_bin_softmax(jax.random.normal(jax.random.key(0), (2, 3, T, K))))
  up = upsample_estimate(est, T)
  assert up.shape == (2, 3, T, T)
  np.testing.assert_allclose(up.sum(-1), est.sum(-1), rtol=1e-5)  # the non-empty bins' mass
  np.testing.assert_allclose(up[..., K - 1:, :].sum(-1), 1.0, rtol=1e-5)  # no empty bins there
  assert (up[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0).all()
  starts, ends = (np.asarray(a) for a in bin_bounds(T, K))
  for t in (0, 5, 20, 36):  # each key gets its bin's probability over the bin's size
    want = np.zeros(T, np.float32)
    for b in range(K):
      if ends[t, b] > starts[t, b]:
        want[starts[t, b]:ends[t, b]] = est[1, 2, t, b] / (ends[t, b] - starts[t, b])
    np.testing.assert_allclose(up[1, 2, t], want, rtol=1e-6)
  # a block of rows gives the same rows as the whole matrix
  np.testing.assert_array_equal(upsample_estimate(est[..., 10:20, :], T, row_offset=10),
                                up[..., 10:20, :])


def test_maps_and_render_in_process(run, tmp_path):
  from sea_jax.ops import expand_mask
  from sea_jax.visualize import render
  _, ids, maps = run
  T = ids.size
  assert sorted(maps) == [0, 1]
  for m in maps.values():
    assert m["teacher_source"] == "student" and m["compressed_mask"].shape == (4, T, 16)
    want = np.asarray(expand_mask(m["compressed_mask"][None], T))[0]
    np.testing.assert_array_equal(m["mask"], want)
    np.testing.assert_allclose(m["teacher"].sum(-1), 1.0, rtol=1e-5)
    est_sum = m["estimate"].sum(-1)  # Â is not renormalised: rows with empty bins sum below 1
    np.testing.assert_allclose(est_sum[:, 15:], 1.0, rtol=1e-5)  # K = 16: no empty bins there
    assert (est_sum[:, :15] <= 1.0 + 1e-5).all()
    assert ((0 <= m["coverage"]) & (m["coverage"] <= 1 + 1e-6)).all()
  drawn = render(maps[1], 1, 3, str(tmp_path), k=4, K=16, save_arrays=True)
  for kind, name in drawn["files"].items():
    _check_png(tmp_path / name)
  np.testing.assert_array_equal(drawn["arrays"]["mask"], maps[1]["mask"][3])
  np.testing.assert_array_equal(np.load(tmp_path / "layer1_head3_mask.npy"), maps[1]["mask"][3])
  overlap = drawn["arrays"]["overlap"]
  assert overlap.shape == (T, T, 3)
  np.testing.assert_array_equal(overlap[..., 1][np.tril_indices(T)] == 1,
                                maps[1]["mask"][3][np.tril_indices(T)])
  want = float((maps[1]["teacher"][3] * maps[1]["mask"][3]).sum(-1).mean())
  assert drawn["coverage"] == pytest.approx(want)


def test_cli_subprocess_with_teacher(folders, run, tmp_path):
  _, sea, teacher_folder = folders
  _, ids, maps = run
  T = ids.size
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "sea_jax.visualize", "--model", sea, "--teacher", teacher_folder,
       "--text", TEXT,
       "--out", str(out), "--layers", "1", "--heads", "0,2", "--sea-k", "4", "--save-arrays"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  summary = json.loads((out / "summary.json").read_text())
  assert summary["teacher_source"] == "teacher" and summary["k"] == 4 and summary["K"] == 16
  assert sorted(summary["maps"]) == ["layer1_head0", "layer1_head2"] and summary["tokens"] == T
  for key, entry in summary["maps"].items():
    for name in entry["files"].values():
      _check_png(out / name)
    L, H = entry["layer"], entry["head"]
    mask = np.load(out / f"layer{L}_head{H}_mask.npy")
    np.testing.assert_array_equal(mask, maps[L]["mask"][H])  # the student's mask, exactly
    assert entry["kept_keys_per_row_mean"] == pytest.approx(mask.sum(-1).mean())
    teacher = np.load(out / f"layer{L}_head{H}_teacher.npy")
    # the teacher's q·kᵀ, not the student's
    assert not np.allclose(teacher, maps[L]["teacher"][H])
    assert entry["coverage"] == pytest.approx(float((teacher * mask).sum(-1).mean()), rel=1e-5)


def test_cli_dense_with_attention_sea(folders, run, tmp_path, capsys, monkeypatch):
  """A dense checkpoint with --attention sea: warned as untrained, loaded with the SEA overrides.

  Loading itself is load_pretrained's job (tested with the checkpoints); here it hands back the
  SEA model so the test stays fast.
  """
  from sea_jax import checkpoint
  from sea_jax.visualize import main
  calls = []
  monkeypatch.setattr(checkpoint, "load_pretrained",
                      lambda path, **over: calls.append((path, over)) or run[0])
  hf = folders[0]
  T = run[1].size  # truncated back to the fixture's tokens: its compiled forward is reused
  rc = main(["--model", hf, "--attention", "sea", "--sea-K", "8", "--text", TEXT + " The end.",
             "--out", str(tmp_path), "--layers", "1", "--heads", "1", "--max-tokens", str(T)])
  err = capsys.readouterr().err
  assert rc == 0, err
  assert calls == [(hf, {"attention": "sea", "sea_K": 8})]
  assert "UNTRAINED" in err and f"using the first {T}" in err
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["tokens"] == T and summary["truncated"]
  assert list(summary["maps"]) == ["layer1_head1"]
  for name in summary["maps"]["layer1_head1"]["files"].values():
    _check_png(tmp_path / name)


@pytest.mark.parametrize("extra, message", [
    (["--model", "/no/such/model"], "no such model"),
    (["--layers", "2"], "layer 2 out of range"),
    (["--heads", "4"], "head 4 out of range"),
    (["--max-tokens", "2000"], "--max-tokens must be in 1..1024"),
    (["--text", "   ".strip()], "empty"),
    (["--text", "word " * 300, "--max-tokens", "300"], "exceed the max_position_embeddings 128"),
    (["--sea-k", "0"], "--sea-k must be >= 1"),
    (["--sea-K", "8"], "--sea-K only applies to --attention sea"),
    (["--layers", "x"], "--layers expects integers"),
    (["--teacher", "/no/such/teacher"], "no such model: /no/such/teacher"),
])
def test_cli_errors(folders, tmp_path, capsys, extra, message):
  from sea_jax.visualize import main
  sea = folders[1]
  argv = ["--model", sea, "--text", TEXT, "--out", str(tmp_path)]
  for i in range(0, len(extra), 2):  # extra flags replace the defaults
    if extra[i] in argv:
      argv[argv.index(extra[i]) + 1] = extra[i + 1]
    else:
      argv += extra[i:i + 2]
  assert main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error: ") and message in err[-1], err


def test_cli_dense_model_without_attention_sea(folders, tmp_path):
  hf = folders[0]
  proc = subprocess.run(
      [sys.executable, "-m", "sea_jax.visualize", "--model", hf, "--text", TEXT, "--out",
       str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "no SEA layers" in lines[0] and "--attention sea" in lines[0], lines
