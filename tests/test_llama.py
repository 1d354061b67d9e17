"""The Llama family (Llama, Qwen2, Mistral) against transformers' PyTorch models, the converter
both ways, sharding, and SEA / Performer behind the same seam under GQA and RoPE."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, relative_error, seed_of
from hf_models import save_tiny_llama
from sea_jax import checkpoint, convert, sharding
from sea_jax.config import ConfigError, LlamaConfig, config_from_hf_dict

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)
CASES = {  # name: (model_type, save_tiny_llama kwargs)
    "llama-gqa2": ("llama", dict(kv_heads=2)),
    "llama-mha-llama3": ("llama", dict(kv_heads=4, rope=LLAMA3)),
    "llama-mqa-linear-d64": ("llama", dict(kv_heads=1, head_dim=64,
                                           rope=dict(rope_type="linear", factor=4.0))),
    "qwen2-tied-d128": ("qwen2", dict(kv_heads=2, head_dim=128, tied=True)),
    "mistral-gqa4": ("mistral", dict(kv_heads=1)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request, tmp_path_factory):
  """(case, torch model, HF folder, converted model folder)."""
  root = tmp_path_factory.mktemp(request.param)
  model_type, kwargs = CASES[request.param]
  model = save_tiny_llama(str(root / "hf"), model_type, seed=seed_of(f"test_llama.converted.{request.param}"),
                          **kwargs)
  convert.hf_to_model_folder(str(root / "hf"), str(root / "sj"))
  return request.param, model, str(root / "hf"), str(root / "sj")


def torch_logits(model, ids, mask=None):
  import torch
  with torch.no_grad():
    model64 = model.to(torch.float64)
    out = model64(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
    model.to(torch.float32)
    return out.logits.numpy()


def padded_batch(rng, T, vocab=50272):
  """Row 0 full, row 1 right-padded, row 2 left-padded (as generate pads)."""
  ids = rng.integers(3, vocab, size=(3, T))
  mask = np.ones((3, T), np.int64)
  mask[1, T - int(rng.integers(2, T // 2)):] = 0
  mask[2, :int(rng.integers(2, T // 2))] = 0
  return ids, mask


def test_logits_match_transformers_fp32(converted, rng):
  """fp32 logits of real tokens vs PyTorch in float64, padded batches (HF positions 0..T-1)."""
  case, model, _, folder = converted
  ours = checkpoint.load_model(folder)
  assert type(ours).__name__ == "LlamaForCausalLM"
  ids, mask = padded_batch(rng, 40)
  want = torch_logits(model, ids, mask)
  got = np.asarray(nnx.jit(lambda m, x, a: m(x, a).logits)(ours, jnp.asarray(ids), jnp.asarray(mask)))
  real = mask.astype(bool)
  assert relative_error(got[real], want[real]) <= 1e-5, case
  assert relative_error(np.asarray(ours(jnp.asarray(ids[:1])).logits), want[:1]) <= 1e-5, case


def test_hf_round_trip_is_identical(converted, tmp_path):
  """HF -> ours -> HF: the same tensors bit for bit, and transformers loads the result."""
  import transformers
  from safetensors.numpy import load_file
  case, model, hf, folder = converted
  convert.model_folder_to_hf(folder, str(tmp_path / "back"))
  a, b = load_file(os.path.join(hf, "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
  tied = model.config.tie_word_embeddings
  assert set(b) == {n for n in a if not (tied and n == "lm_head.weight")}, case
  for name in b:
    np.testing.assert_array_equal(a[name], b[name], err_msg=f"{case}: {name}")
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))
  assert type(back) is type(model)
  ids = np.random.default_rng(0).integers(0, 50272, (1, 12))
  np.testing.assert_allclose(torch_logits(back, ids), torch_logits(model, ids), rtol=1e-6, atol=1e-8)


def test_sharded_logits_equal_single_device(converted, rng):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
  case, _, _, folder = converted
  single = checkpoint.load_model(folder)
  mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
  sharded = checkpoint.load_model(folder, mesh)
  gate = sharded.layers[0].mlp.gate_proj.kernel[...]
  assert gate.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  ids = rng.integers(0, 50272, size=(4, 20))
  batch = jax.device_put(jnp.asarray(ids), sharding.batch_sharding(mesh))
  got = nnx.jit(lambda m, x: m(x).logits)(sharded, batch)
  assert relative_error(got, single(jnp.asarray(ids)).logits) <= 1e-5, case


def test_hf_folder_loads_directly_and_as_sea_student(converted, rng):
  """load_pretrained streams an HF Llama folder; attention='sea' adds seeded SEA modules and
  keeps every dense weight."""
  case, _, hf, folder = converted
  direct = checkpoint.load_pretrained(hf)
  ids = jnp.asarray(rng.integers(0, 50272, size=(1, 24)))
  dense = checkpoint.load_model(folder)
  logits = nnx.jit(lambda m, x: m(x).logits)  # eager forwards compile every scan on each call
  dense_logits = logits(dense, ids)
  assert relative_error(logits(direct, ids), dense_logits) == 0.0, case
  sea = checkpoint.load_pretrained(hf, attention="sea", sea_K=16, sea_k=2)
  core = sea.layers[0].self_attn.core
  assert type(core).__name__ == "SEAAttention" and core.positions[...].shape[-1] == dense.config.head_dim
  np.testing.assert_array_equal(np.asarray(sea.layers[1].mlp.up_proj.kernel[...]),
                                np.asarray(dense.layers[1].mlp.up_proj.kernel[...]))
  out = nnx.jit(lambda m, x: m(x, return_attn_aux=True))(sea, ids)  # eager compiles every scan
  aux = out.attn_aux[0]
  H = dense.config.num_attention_heads
  assert aux["compressed_mask"].shape == (1, H, 24, 16) and aux["k"].shape[1] == dense.config.num_kv_heads
  assert bool(jnp.isfinite(out.logits).all())
  assert relative_error(out.logits, dense_logits) > 1e-3  # untrained SEA is not its teacher


def test_config_round_trip_and_unsupported_options():
  base = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              rope_parameters=dict(LLAMA3, rope_theta=5e5))
  cfg = config_from_hf_dict(base)
  assert isinstance(cfg, LlamaConfig) and cfg.head_dim == 8 and cfg.rope_theta == 5e5
  assert config_from_hf_dict(cfg.to_hf_dict()) == cfg
  legacy = dict(base, rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0})
  assert config_from_hf_dict(legacy).rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}
  bad = {
      "sliding window": dict(base, model_type="mistral", sliding_window=16, max_position_embeddings=64),
      "qwen2 sliding window": dict(base, model_type="qwen2", use_sliding_window=True, sliding_window=8),
      "rope type": dict(base, rope_parameters={"rope_type": "yarn", "factor": 2.0}),
      "activation": dict(base, hidden_act="gelu"),
      "groups": dict(base, num_key_value_heads=3),
      "missing field": {k: v for k, v in base.items() if k != "intermediate_size"},
      "family": dict(base, model_type="gemma"),
  }
  for what, hf in bad.items():
    with pytest.raises(ConfigError):
      config_from_hf_dict(hf)
      pytest.fail(what)


def _run(*args, cwd=REPO):
  return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True,
                        text=True, timeout=600)


def test_convert_cli_detects_the_family_and_rejects_a_sliding_window(tmp_path):
  save_tiny_llama(str(tmp_path / "hf"), "qwen2", seed=3, with_tokenizer=True)
  proc = _run("-m", "sea_jax.convert", tmp_path / "hf", tmp_path / "sj")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.load(open(tmp_path / "sj" / "config.json"))["model_type"] == "qwen2"
  cfg = json.load(open(tmp_path / "hf" / "config.json"))
  cfg.update(use_sliding_window=True, sliding_window=16)
  json.dump(cfg, open(tmp_path / "hf" / "config.json", "w"))
  proc = _run("-m", "sea_jax.convert", tmp_path / "hf", tmp_path / "sj2")
  assert proc.returncode == 2 and not (tmp_path / "sj2").exists()
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "sliding_window" in lines[0], proc.stderr


def test_eval_and_one_distillation_step_on_a_llama(tmp_path):
  """eval.py and train.py take a converted Llama like an OPT: dense, SEA and a SEA student."""
  save_tiny_llama(str(tmp_path / "hf"), "llama", seed=4, with_tokenizer=True)
  text = tmp_path / "text.txt"
  text.write_text(open(REPO / "README.md").read() * 2)
  lines = []
  for extra in ([], ["--attention", "sea", "--sea-K", "16", "--sea-k", "4"]):
    proc = _run("eval.py", "--no-progress", "--model", tmp_path / "hf", "--text-file", text,
                "--seq-len", "64", "--max-windows", "2", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  assert lines[0]["attention"] == "dense" and lines[1]["attention"] == "sea"
  assert all(np.isfinite(l["perplexity"]) for l in lines)
  assert lines[0]["perplexity"] != lines[1]["perplexity"]
  proc = _run("train.py", "--teacher", tmp_path / "hf", "--out", tmp_path / "run", "--steps", "1",
              "--attention", "sea", "--sea-K", "16", "--sea-k", "4", "--seq-len", "64",
              "--batch-size", "8", "--train-text", text, "--no-progress")
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = tmp_path / "run" / "final"
  assert json.load(open(final / "config.json"))["model_type"] == "llama"
  metrics = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert np.isfinite(metrics[-1]["total"])
  student = checkpoint.load_model(str(final))
  assert type(student.layers[0].self_attn.core).__name__ == "SEAAttention"


def _long_llama(attention: str, T: int):
  """A tiny random Llama (GQA 4 over 2, head dim 16, llama3 RoPE) built in-process."""
  from sea_jax.config import SEAConfig
  cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    max_position_embeddings=T, rope_theta=5e5,
                    rope_scaling=tuple(sorted(dict(LLAMA3, original_max_position_embeddings=1024).items())),
                    attention=attention, sea=SEAConfig(K=64, k=4, sparse_impl="xla"))
  return checkpoint.build_model(cfg, nnx.Rngs(0))


@pytest.mark.parametrize("attention", ["dense", "sea"])
def test_causal_at_8192_tokens(attention, rng):
  """Changing token p leaves every logit before p unchanged and changes those from p on, at
  T = 8192 (dense: `blocked_attention`, what "auto" takes on CPU; SEA: tile-list sparse)."""
  T, p = 8192, 5000
  model = _long_llama(attention, T)
  ids = rng.integers(0, 512, size=(1, T))
  moved = ids.copy()
  moved[0, p] = (ids[0, p] + 1) % 512
  fwd = nnx.jit(lambda m, x: m(x).logits)
  a, b = np.asarray(fwd(model, jnp.asarray(ids))), np.asarray(fwd(model, jnp.asarray(moved)))
  assert np.array_equal(a[:, :p], b[:, :p]), attention
  assert not np.allclose(a[:, p:], b[:, p:]), attention


def test_long_context_forward_memory_is_linear_in_length():
  """Compiled temp bytes of the tiny Llama forward at T = 4096 vs 16384 (dense "auto", i.e.
  `blocked_attention`, and SEA) grow about linearly; a T x T score tensor per head would be 16x."""
  def temp(attention, T):
    graph, state = nnx.split(_long_llama(attention, T))
    ids = jax.ShapeDtypeStruct((1, T), jnp.int32)
    run = jax.jit(lambda s, x: nnx.merge(graph, s)(x).logits)
    return run.lower(state, ids).compile().memory_analysis().temp_size_in_bytes
  for attention in ("dense", "sea"):
    small, large = temp(attention, 4096), temp(attention, 16384)
    assert large < 6 * small, f"{attention}: {small} -> {large} bytes ({large / small:.1f}x)"


def test_gptq_protocol_prepends_the_tokenizers_own_bos(tmp_path):
  """A Llama with its own tokenizer (BOS "<s>", not OPT's "</s>"): the gptq protocol prepends
  that BOS, the JSON line names it, and the perplexity equals transformers' on those windows."""
  import math
  import tokenizers
  import transformers
  from sea_jax import data
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator([open(REPO / "README.md").read()], vocab_size=400,
                          special_tokens=["<s>", "</s>", "<unk>"])
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>",
                                             eos_token="</s>", unk_token="<unk>")
  model = save_tiny_llama(str(tmp_path / "hf"), "llama", seed=5, vocab_size=512)
  tok.save_pretrained(str(tmp_path / "hf"))
  proc = _run("eval.py", "--no-progress", "--model", tmp_path / "hf", "--protocol", "gptq",
              "--seq-len", "64", "--max-windows", "2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = json.loads(proc.stdout.strip().splitlines()[-1])
  assert line["bos"] == {"token": "<s>", "id": 0} and line["model_type"] == "llama"
  tokens = data.protocol_tokens(data.load_tokenizer(str(tmp_path / "hf")), "gptq")
  assert tokens[0] == 0 and line["tokens"] == tokens.size
  import torch
  windows = data.eval_windows(tokens, 64)[:2]
  with torch.no_grad():
    nll = [float(model.double()(torch.tensor(w[None]).long(), labels=torch.tensor(w[None]).long()).loss)
           for w in windows]
  want = math.exp(np.mean(nll))
  assert abs(line["perplexity"] - want) / want <= 1e-4


def test_pretrain_a_llama_from_scratch_with_init_config(tmp_path):
  """--mode pretrain --init-config takes a Llama config.json; the shape flags resize it."""
  import train_support as ts
  hf = LlamaConfig(vocab_size=50272, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   max_position_embeddings=128).to_hf_dict()
  hf.pop("sea_jax")
  (tmp_path / "config.json").write_text(json.dumps(hf))
  text = tmp_path / "text.txt"
  text.write_text(open(REPO / "README.md").read())
  ts.run_train(["--mode", "pretrain", "--init-config", tmp_path / "config.json", "--layers", 1,
                "--train-text", text, "--out", tmp_path / "run", "--steps", 2, "--seq-len", 32,
                "--batch-size", 1])
  cfg = json.load(open(tmp_path / "run" / "final" / "config.json"))
  assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 1
  assert cfg["num_key_value_heads"] == 2
