"""The converter: HF <-> sea-jax round trips, every source layout, and its one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, relative_error, current_seed
from hf_models import save_tiny_opt, torch_logits
from sea_jax import checkpoint, convert
from sea_jax.checkpoint import CheckpointError


def _state_dicts_equal(a, b):
  sa = {k: v for k, v in a.state_dict().items() if k != "lm_head.weight"}
  sb = {k: v for k, v in b.state_dict().items() if k != "lm_head.weight"}
  assert set(sa) == set(sb)
  for k in sa:
    assert sa[k].dtype == sb[k].dtype and bool((sa[k] == sb[k]).all()), k


@pytest.mark.parametrize("variant", ["pre", "post"])
def test_hf_to_ours_to_hf_gives_identical_tensors(tmp_path, variant):
  import transformers
  model = save_tiny_opt(str(tmp_path / "hf"), variant, seed=current_seed())
  convert.hf_to_model_folder(str(tmp_path / "hf"), str(tmp_path / "sj"))
  convert.model_folder_to_hf(str(tmp_path / "sj"), str(tmp_path / "back"))
  back = transformers.OPTForCausalLM.from_pretrained(str(tmp_path / "back"))
  _state_dicts_equal(model, back)
  ids = np.random.default_rng(current_seed()).integers(0, 50272, size=(2, 9))
  np.testing.assert_array_equal(torch_logits(model, ids), torch_logits(back, ids))


@pytest.mark.parametrize("layout", ["safetensors-sharded", "bin", "bin-sharded"])
def test_every_source_layout_converts(tmp_path, layout, rng):
  safe = layout.startswith("safetensors")
  model = save_tiny_opt(str(tmp_path / "hf"), "pre", seed=int(rng.integers(1 << 30)),
                        safe_serialization=safe,
                        max_shard_size="1MB" if layout.endswith("sharded") else None)
  files = os.listdir(tmp_path / "hf")
  if layout.endswith("sharded"):
    assert any(f.endswith(".index.json") for f in files), files
  ours = checkpoint.load_pretrained(str(tmp_path / "hf"))  # on the fly, no folder written
  ids = rng.integers(0, 50272, size=(2, 11))
  assert relative_error(ours(jnp.asarray(ids)).logits, torch_logits(model, ids)) <= 1e-5


def test_cli_writes_folder_with_tokenizer(tmp_path):
  save_tiny_opt(str(tmp_path / "hf"), "pre", with_tokenizer=True)
  proc = subprocess.run([sys.executable, "-m", "sea_jax.convert", str(tmp_path / "hf"),
                         str(tmp_path / "sj")], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  names = set(os.listdir(tmp_path / "sj"))
  assert {"config.json", "params"} <= names
  assert json.load(open(tmp_path / "sj" / "config.json"))["model_type"] == "opt"
  from sea_jax.data import load_tokenizer
  text = "Robert Boulter is an English film , television and theatre actor ."
  assert (load_tokenizer(str(tmp_path / "sj"))(text)["input_ids"]
          == load_tokenizer(None)(text)["input_ids"])


# --- errors: each names the problem in one line ---------------------------------------------

def _cli_error(*args) -> str:
  proc = subprocess.run([sys.executable, "-m", "sea_jax.convert", *map(str, args)], cwd=REPO,
                        capture_output=True, text=True)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1, proc.stderr
  return lines[0]


@pytest.fixture
def hf_folder(tmp_path):
  save_tiny_opt(str(tmp_path / "hf"), "pre")
  return tmp_path / "hf"


def test_error_missing_folder(tmp_path):
  assert "no such folder" in _cli_error(tmp_path / "nope" / "x", tmp_path / "out")


def test_error_missing_weights(tmp_path, hf_folder):
  os.remove(hf_folder / "model.safetensors")
  assert "no model.safetensors or pytorch_model.bin" in _cli_error(hf_folder, tmp_path / "out")


def test_error_missing_config(tmp_path, hf_folder):
  os.remove(hf_folder / "config.json")
  assert "no config.json" in _cli_error(hf_folder, tmp_path / "out")


def test_error_not_opt(tmp_path, hf_folder):
  cfg = json.load(open(hf_folder / "config.json"))
  cfg["model_type"] = "gpt2"
  json.dump(cfg, open(hf_folder / "config.json", "w"))
  assert "'gpt2' is not supported" in _cli_error(hf_folder, tmp_path / "out")


def test_error_wrong_shape_names_the_tensor(tmp_path, hf_folder):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(hf_folder / "model.safetensors")
  name = "model.decoder.layers.1.fc1.weight"
  tensors[name] = tensors[name][:, :-1].copy()
  save_file(tensors, hf_folder / "model.safetensors")
  msg = _cli_error(hf_folder, tmp_path / "out")
  assert name in msg and "shape" in msg


def test_error_truncated_safetensors(tmp_path, hf_folder):
  path = hf_folder / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  assert "truncated" in _cli_error(hf_folder, tmp_path / "out")


def test_error_truncated_bin(tmp_path):
  save_tiny_opt(str(tmp_path / "hf"), "pre", safe_serialization=False)
  path = tmp_path / "hf" / "pytorch_model.bin"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  assert "truncated" in _cli_error(tmp_path / "hf", tmp_path / "out")


def test_error_missing_tensor(tmp_path, hf_folder):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(hf_folder / "model.safetensors")
  del tensors["model.decoder.layers.0.fc2.bias"]
  save_file(tensors, hf_folder / "model.safetensors")
  assert "missing" in _cli_error(hf_folder, tmp_path / "out")


def test_corrupt_orbax_checkpoint_is_a_clear_error(tmp_path, hf_folder):
  convert.hf_to_model_folder(str(hf_folder), str(tmp_path / "sj"))
  params = tmp_path / "sj" / "params"
  for root, _, files in os.walk(params):  # damage every data file of the checkpoint
    for f in files:
      if "ocdbt" in root or f.startswith("d") or f.endswith(".data"):
        p = os.path.join(root, f)
        with open(p, "r+b") as fh:
          fh.truncate(max(os.path.getsize(p) // 3, 1))
  with pytest.raises(CheckpointError):
    checkpoint.load_model(str(tmp_path / "sj"))
