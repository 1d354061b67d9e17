"""Generation: greedy tokens against transformers' generate (OPT, Llama; left-padded batches),
KV-cache logits against the full forward, one compile of the decode step, seeded sampling,
EOS, SEA and Performer decoding from their state, sharding, and the command line."""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO
from hf_models import save_tiny_llama, save_tiny_opt
from sea_jax import checkpoint, convert, data, sharding
from sea_jax import generate as gen
from sea_jax.config import SEAConfig

TEXTS = ("Hello world", "The quick brown fox jumps over the lazy")
NEW = 10


@pytest.fixture(scope="module")
def build(tmp_path_factory):
  """build(name) -> (name, torch model, converted model folder, prompts of two lengths), once
  per module and family."""
  built = {}

  def one(name):
    if name not in built:
      root = tmp_path_factory.mktemp(name)
      if name == "opt":  # init_std 0.2: logits far from ties, so argmax is robust
        torch_model = save_tiny_opt(str(root / "hf"), seed=11, with_tokenizer=True, init_std=0.2)
      else:
        torch_model = save_tiny_llama(str(root / "hf"), "llama", seed=12, with_tokenizer=True)
      convert.hf_to_model_folder(str(root / "hf"), str(root / "sj"))
      tokenizer = data.load_tokenizer(str(root / "sj"))
      prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
      assert len(prompts[0]) < len(prompts[1]) and prompts[0][0] == 2  # the tokenizer adds </s>
      built[name] = (name, torch_model, str(root / "sj"), prompts)
    return built[name]

  return one


@pytest.fixture(params=["opt", "llama"])
def family(request, build):
  return build(request.param)


@pytest.fixture
def opt(build):
  return build("opt")


def left_pad(prompts, pad):
  P = max(map(len, prompts))
  ids = np.full((len(prompts), P), pad, np.int64)
  mask = np.zeros((len(prompts), P), np.int64)
  for n, p in enumerate(prompts):
    ids[n, P - len(p):], mask[n, P - len(p):] = p, 1
  return ids, mask


def until_eos(row, eos):
  row = [int(t) for t in row]
  for i, t in enumerate(row):
    if t in eos:
      return row[:i + 1]
  return row


def test_greedy_equals_transformers_generate(family):
  """A left-padded batch of two prompts: the same new tokens as model.generate (up to EOS)."""
  import torch
  name, torch_model, folder, prompts = family
  model = checkpoint.load_model(folder)
  ours = gen.generate(model, prompts, max_new_tokens=NEW)
  pad = gen._pad_id(model.config)
  ids, mask = left_pad(prompts, pad)
  with torch.no_grad():
    out = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                               do_sample=False, max_new_tokens=NEW, pad_token_id=pad)
  eos = gen.eos_ids(model.config)
  want = [until_eos(row, eos) for row in out[:, ids.shape[1]:].numpy()]
  assert ours == want, name
  assert all(len(r) == NEW for r in ours), f"{name}: hit EOS early, the test compares less"
  with torch.no_grad():  # a one-token prompt: the prefill has nothing to write
    one = torch_model.generate(torch.tensor([[2]]), do_sample=False, max_new_tokens=3,
                               pad_token_id=pad)
  assert gen.generate(model, [[2]], max_new_tokens=3) == [until_eos(one[0, 1:].numpy(), eos)]


def full_forward_logits(model, ids, mask):
  """Logits of the whole left-padded sequence with Hugging Face's generate positions."""
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  # jitted: an eager forward compiles every `lax.scan` of the attention again on each call
  if model.config.family == "llama":
    positions = jnp.where(mask > 0, jnp.cumsum(mask, axis=1) - 1, 0)
    forward = nnx.jit(lambda m, ids, mask: m(ids, mask, position_ids=positions).logits)
  else:
    forward = nnx.jit(lambda m, ids, mask: m(ids, mask).logits)
  return np.asarray(forward(model, ids, mask))


def test_cached_logits_equal_full_forward_and_decode_compiles_once(family):
  """Each step's KV-cache logits equal the full forward's at that position (fp32); the decode
  step traces once for a batch shape and not again on the next call."""
  name, _, folder, prompts = family
  model = checkpoint.load_model(folder)
  prompts = prompts + [prompts[0][:2]]  # a batch shape no other test compiled
  before, compiled = gen.TRACES["decode"], gen._decode._cache_size()
  steps = list(gen.stream(model, prompts, max_new_tokens=6, eos_token_ids=()))
  assert gen.TRACES["decode"] == before + 1 and gen._decode._cache_size() == compiled + 1, name
  tokens = np.stack([s.tokens for s in steps], axis=1)  # (N, 6)
  ids, mask = left_pad(prompts, gen._pad_id(model.config))
  P = ids.shape[1]
  full = full_forward_logits(model, np.concatenate([ids, tokens], 1),
                             np.concatenate([mask, np.ones_like(tokens)], 1))
  for i, step in enumerate(steps):
    want = full[:, P - 1 + i]
    np.testing.assert_allclose(np.asarray(step.logits), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max(), err_msg=f"{name} step {i}")
    np.testing.assert_array_equal(step.tokens, want.argmax(-1))
  gen.generate(model, prompts, max_new_tokens=6, seed=3, temperature=0.7)
  assert gen.TRACES["decode"] == before + 1, f"{name}: the decode step was traced again"
  assert gen._decode._cache_size() == compiled + 1, f"{name}: the decode step was compiled again"


def test_attention_over_cache_slots_chunked_equals_reference(rng):
  """q of T rows at slots o..o+T-1 against S >= o + T cache slots (GQA, padded slots): the
  chunked path equals the reference, and both equal a NumPy softmax over the visible slots."""
  from sea_jax.ops.dense import dense_attention, dense_attention_chunked
  N, H, Hkv, T, S, d, o = 2, 4, 2, 7, 16, 8, 5
  q, k, v = (rng.standard_normal(shape).astype(np.float32)
             for shape in ((N, H, T, d), (N, Hkv, S, d), (N, Hkv, S, d)))
  key_mask = np.ones((N, S), bool)
  key_mask[1, :3] = False  # left padding of row 1
  ref = np.asarray(dense_attention(q, k, v, jnp.asarray(key_mask), q_offset=jnp.int32(o)))
  chunked = dense_attention_chunked(q, k, v, jnp.asarray(key_mask), block=3,
                                    q_offset=jnp.int32(o))
  np.testing.assert_allclose(np.asarray(chunked), ref, rtol=1e-5, atol=1e-6)
  kr, vr = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)
  for n in range(N):
    for t in range(T):
      seen = key_mask[n] & (np.arange(S) <= o + t)
      scores = np.einsum("hd,hsd->hs", q[n, :, t], kr[n][:, seen])
      p = np.exp(scores - scores.max(-1, keepdims=True))
      want = np.einsum("hs,hsd->hd", p / p.sum(-1, keepdims=True), vr[n][:, seen])
      np.testing.assert_allclose(ref[n, :, t], want, rtol=1e-4, atol=1e-5)


def test_sampling_is_seeded_and_top_p_narrows(family):
  name, _, folder, prompts = family
  model = checkpoint.load_model(folder)
  def run(**kw):
    return gen.generate(model, prompts, max_new_tokens=8, eos_token_ids=(), **kw)
  a, b = run(temperature=1.0, top_p=0.9, seed=1), run(temperature=1.0, top_p=0.9, seed=1)
  assert a == b, name
  assert run(temperature=1.0, top_p=0.9, seed=2) != a, name
  assert run(temperature=1.0, top_p=1e-6, seed=5) == run(), f"{name}: top-p ~0 is greedy"


def test_eos_stops_each_row_at_its_first_eos(family):
  """EOS from the argument, or from the config (OPT: an int; Llama: here a tuple)."""
  name, _, folder, prompts = family
  model = checkpoint.load_model(folder)
  greedy = gen.generate(model, prompts, max_new_tokens=8, eos_token_ids=())
  stop = greedy[0][3]
  want = [until_eos(row, (stop,)) for row in greedy]
  assert gen.generate(model, prompts, max_new_tokens=8, eos_token_ids=(stop,)) == want, name
  assert len(want[0]) <= 4
  eos = stop if name == "opt" else (model.config.vocab_size - 1, stop)
  model = checkpoint.load_model(folder, eos_token_id=eos)
  assert gen.eos_ids(model.config) == ((stop,) if name == "opt" else eos)
  assert gen.generate(model, prompts, max_new_tokens=8) == want, name


def test_bad_requests_are_generate_errors(family):
  _, _, folder, prompts = family
  model = checkpoint.load_model(folder)
  limit = model.config.max_position_embeddings
  for kwargs in (dict(max_new_tokens=0), dict(max_new_tokens=limit - len(prompts[1]) + 1),
                 dict(max_new_tokens=2, temperature=-0.1), dict(max_new_tokens=2, top_p=0.0),
                 dict(max_new_tokens=2, top_p=1.5)):
    with pytest.raises(gen.GenerateError):
      gen.generate(model, prompts, **kwargs)
  for bad in ([], [[]], [[model.config.vocab_size]]):
    with pytest.raises(gen.GenerateError):
      gen.generate(model, bad, max_new_tokens=2)


@pytest.fixture(scope="module")
def sea_student(tmp_path_factory):
  root = tmp_path_factory.mktemp("sea")
  save_tiny_opt(str(root / "hf"), seed=13, with_tokenizer=True, init_std=0.2)
  convert.hf_to_model_folder(str(root / "hf"), str(root / "sj"), attention="sea",
                             sea=SEAConfig(K=16, k=2))
  return str(root / "sj")


@pytest.fixture(scope="module")
def llama_sea_student(tmp_path_factory):
  """A grouped-query Llama (4 query heads, 2 kv heads) with fresh SEA modules, K = 16."""
  root = tmp_path_factory.mktemp("llama_sea")
  save_tiny_llama(str(root / "hf"), "llama", seed=14, kv_heads=2)
  convert.hf_to_model_folder(str(root / "hf"), str(root / "sj"), attention="sea",
                             sea=SEAConfig(K=16, k=2))
  return str(root / "sj")


@pytest.mark.parametrize("kind", ["sea", "sea_llama", "performer"])
def test_incremental_steps_equal_the_forward_of_each_row(kind, sea_student, llama_sea_student,
                                                         build):
  """SEA and Performer decode incrementally from their state (`sea_jax.sea.decode`): each
  step's logits equal the full forward of that row alone (prompt + new tokens, unpadded) at
  that position, fp32 1e-5, for prompts shorter and longer than K = 16 in one left-padded
  batch; the decode step compiles once."""
  if kind == "sea":
    model, sea_k = checkpoint.load_model(sea_student), 3
  elif kind == "sea_llama":
    model, sea_k = checkpoint.load_model(llama_sea_student), None
  else:  # fresh Performer modules on the dense OPT
    model, sea_k = checkpoint.load_model(build("opt")[2], attention="performer"), None
  rng = np.random.default_rng(5)
  prompts = [[2] + rng.integers(3, 200, n).tolist() for n in (4, 22, 1)]
  before, compiled = gen.TRACES["decode"], gen._decode._cache_size()
  steps = list(gen.stream(model, prompts, max_new_tokens=7, eos_token_ids=(), sea_k=sea_k))
  assert gen.TRACES["decode"] == before + 1 and gen._decode._cache_size() == compiled + 1
  forward = nnx.jit(lambda m, x: m(x, sea_k=sea_k).logits)
  for n, prompt in enumerate(prompts):
    row = list(prompt) + [int(s.tokens[n]) for s in steps]
    full = np.asarray(forward(model, jnp.asarray([row])))[0]  # this row alone, unpadded
    for i, step in enumerate(steps):
      want = full[len(prompt) - 1 + i]
      np.testing.assert_allclose(np.asarray(step.logits[n]), want, rtol=1e-5,
                                 atol=1e-5 * np.abs(want).max(), err_msg=f"{kind} row {n} step {i}")
      assert step.tokens[n] == want.argmax()


@pytest.mark.parametrize("attention", ["dense", "sea"])
def test_sharded_generation_equals_single_device(attention, tmp_path):
  """Model and cache (with SEA's decode state) on a data=2, fsdp=2, tensor=2 mesh; 3 prompts
  (the batch is padded to 4)."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
  save_tiny_llama(str(tmp_path / "hf"), "llama", seed=14)
  convert.hf_to_model_folder(str(tmp_path / "hf"), str(tmp_path / "sj"), attention=attention,
                             sea=SEAConfig(K=8, k=1))
  mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
  prompts = [[2, 5, 6], [2, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [2, 99]]
  single = gen.generate(checkpoint.load_model(str(tmp_path / "sj")), prompts, max_new_tokens=5)
  sharded_model = checkpoint.load_model(str(tmp_path / "sj"), mesh)
  assert gen.generate(sharded_model, prompts, max_new_tokens=5, mesh=mesh) == single
  assert gen.generate(sharded_model, prompts, max_new_tokens=5) == single  # a replicated batch


# --- the command line ------------------------------------------------------------------------

REQUIRED = {"prompt_tokens", "new_tokens", "text", "attention", "sea_k", "tokens_per_s",
            "peak_memory_bytes"}


def run_cli(*args):
  proc = subprocess.run([sys.executable, "-m", "sea_jax.generate", *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def test_cli_prints_one_json_line_and_streams_text(opt):
  _, _, folder, prompts = opt
  proc, line = run_cli("--model", folder, "--prompt", TEXTS[1], "--max-new-tokens", 6)
  assert REQUIRED <= set(line)
  assert line["prompt_tokens"] == len(prompts[1]) and line["attention"] == "dense"
  assert line["sea_k"] is None
  model = checkpoint.load_model(folder)
  assert line["new_tokens"] == gen.generate(model, [prompts[1]], max_new_tokens=6)[0]
  assert line["tokens_per_s"] > 0 and line["text"]
  assert line["text"].strip() in proc.stderr


def test_cli_mesh_gives_the_same_tokens(opt):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
  _, _, folder, prompts = opt
  _, line = run_cli("--model", folder, "--prompt", TEXTS[0], "--max-new-tokens", 4, "--mesh",
                    "data=2,fsdp=2,tensor=2")
  assert line["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert line["new_tokens"] == gen.generate(checkpoint.load_model(folder), [prompts[0]],
                                            max_new_tokens=4)[0]


def test_cli_sea_student_reports_its_k(sea_student, tmp_path):
  prompt = tmp_path / "prompt.txt"
  prompt.write_text(TEXTS[0])
  _, line = run_cli("--model", sea_student, "--prompt-file", prompt, "--max-new-tokens", 4,
                    "--sea-k", 2, "--temperature", 0.7, "--seed", 3)
  assert line["attention"] == "sea" and line["sea_k"] == 2
  ids = data.load_tokenizer(sea_student)(TEXTS[0])["input_ids"]
  assert line["prompt_tokens"] == len(ids)
  want = gen.generate(checkpoint.load_model(sea_student), [ids], max_new_tokens=4, sea_k=2,
                      temperature=0.7, seed=3)
  assert line["new_tokens"] == want[0]


@pytest.mark.parametrize("args,message", [
    (("--prompt", ""), "empty"),
    (("--max-new-tokens", "0"), "max-new-tokens"),
    (("--max-new-tokens", "-4"), "max-new-tokens"),
    (("--max-new-tokens", "200"), "max_position_embeddings"),
    (("--temperature", "-1"), "temperature"),
    (("--top-p", "0"), "top-p"),
    (("--top-p", "1.5"), "top-p"),
    (("--sea-k", "0"), "sea-k"),
    (("--model", "/nowhere/model"), "no such folder"),
])
def test_cli_bad_input_is_one_error_line(opt, args, message, capsys):
  _, _, folder, _ = opt
  argv = ["--model", folder, "--prompt", "Hello", *args]
  assert gen.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_cli_error_exit_code_in_a_process(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  proc = subprocess.run([sys.executable, "-m", "sea_jax.generate", "--model", str(tmp_path),
                         "--prompt-file", str(empty)], cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
