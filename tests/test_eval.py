"""eval.py end to end on a tiny random OPT, against transformers' perplexity on the same windows."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, seed_of
from hf_models import save_tiny_opt
from sea_jax import data

REQUIRED_KEYS = {"perplexity", "tokens", "windows", "protocol", "split", "seq_len", "attention",
                 "tokens_per_s", "peak_memory_bytes"}


def run_eval(*args):
  proc = subprocess.run([sys.executable, "eval.py", "--no-progress", *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  return proc


def last_json(proc) -> dict:
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def transformers_ppl(model, windows: np.ndarray) -> float:
  import torch
  nll = []
  with torch.no_grad():
    for w in windows:
      ids = torch.tensor(w[None]).long()
      nll.append(float(model.double()(ids, labels=ids).loss))
  model.float()
  return math.exp(np.mean(nll))


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
  folder = tmp_path_factory.mktemp("eval") / "hf"
  model = save_tiny_opt(str(folder), "pre", seed=seed_of("test_eval.tiny_hf"), with_tokenizer=True)
  return str(folder), model


@pytest.mark.parametrize("protocol", ["sea", "gptq"])
def test_perplexity_matches_transformers(tiny_hf, protocol):
  folder, model = tiny_hf
  line = last_json(run_eval("--model", folder, "--protocol", protocol, "--seq-len", 128,
                            "--max-windows", 3))
  assert REQUIRED_KEYS <= set(line)
  tokens = data.protocol_tokens(data.load_tokenizer(folder), protocol)
  windows = data.eval_windows(tokens, 128)[:3]
  want = transformers_ppl(model, windows)
  assert abs(line["perplexity"] - want) / want <= 1e-4
  assert line["tokens"] == {"sea": 251048, "gptq": 287645}[protocol]
  assert line["split"] == {"sea": "validation", "gptq": "test"}[protocol]
  assert line["windows"] == 3 and line["seq_len"] == 128 and line["attention"] == "dense"
  assert line["bos"] == ({"token": "</s>", "id": 2} if protocol == "gptq" else None)
  assert line["model_type"] == "opt"


def test_sharded_eval_equals_single_device(tiny_hf):
  folder, _ = tiny_hf
  single = last_json(run_eval("--model", folder, "--seq-len", 64, "--max-windows", 5,
                              "--mesh", "data=1,fsdp=1,tensor=-1", "--batch-size", 1))
  sharded = last_json(run_eval("--model", folder, "--seq-len", 64, "--max-windows", 5,
                               "--mesh", "data=2,fsdp=2,tensor=2", "--batch-size", 4))
  assert sharded["devices"] == 8
  assert abs(single["perplexity"] - sharded["perplexity"]) / single["perplexity"] <= 1e-5


@pytest.mark.parametrize("args,message", [
    (("--seq-len", 129), "exceeds the model's max_position_embeddings"),
    (("--sea-k", 0), "must be >= 1"),
    (("--mesh", "data=3"), "mesh"),
    (("--batch-size", 3, "--mesh", "data=2,fsdp=1,tensor=4"), "multiple"),
])
def test_bad_input_is_one_line_error(tiny_hf, args, message):
  folder, _ = tiny_hf
  proc = run_eval("--model", folder, *args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and message in proc.stderr


def test_missing_model_is_one_line_error(tmp_path):
  proc = run_eval("--model", tmp_path / "nowhere" / "model")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr and "no such folder" in proc.stderr
