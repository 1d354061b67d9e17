"""OPT + SEA: the attention swap, SEA students from dense checkpoints, and eval.py with SEA."""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, seed_of, current_seed
from hf_models import save_tiny_opt
from sea_jax import checkpoint, convert
from sea_jax.config import ConfigError, SEAConfig


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("sea_model")
  # init_std 0.2: attention moves the loss well above float32 rounding, so SEA != dense is a
  # real check (at the default 0.02 the near-uniform model can score bitwise-equal perplexity)
  save_tiny_opt(str(root / "hf"), "pre", seed=seed_of("test_sea_model.dense_folder"), with_tokenizer=True,
                init_std=0.2)
  convert.hf_to_model_folder(str(root / "hf"), str(root / "dense"))
  return root


def flat_params(model):
  return checkpoint.flatten(nnx.to_pure_dict(nnx.state(model)))


def test_student_keeps_dense_weights_and_adds_seeded_sea_modules(dense_folder):
  sea = SEAConfig(K=16, k=4, seed=7)
  for name in ("s1", "s2"):
    convert.hf_to_model_folder(str(dense_folder / "hf"), str(dense_folder / name),
                               attention="sea", sea=sea)
  dense = flat_params(checkpoint.load_model(str(dense_folder / "dense")))
  s1 = flat_params(checkpoint.load_model(str(dense_folder / "s1")))
  s2 = flat_params(checkpoint.load_model(str(dense_folder / "s2")))
  sea_paths = [p for p in s1 if "core" in p]
  assert sea_paths and set(s1) == set(dense) | set(sea_paths)
  for p in dense:  # the pretrained weights are untouched
    np.testing.assert_array_equal(np.asarray(s1[p]), np.asarray(dense[p]))
  for p in sea_paths:  # same seed, same fresh SEA modules
    np.testing.assert_array_equal(np.asarray(s1[p]), np.asarray(s2[p]))
  s3 = flat_params(checkpoint.load_model(str(dense_folder / "dense"), attention="sea",
                                         sea_K=16, sea_seed=8))
  assert any(not np.array_equal(np.asarray(s3[p]), np.asarray(s1[p])) for p in sea_paths)


def test_seed_keys_build_the_model_nnx_rngs_builds():
  """`checkpoint.seeded_model` (layers.SeedKeys, a Python counter) gives every parameter the
  value an nnx.Rngs of the same seed gives it, bitwise: the fast build changes no model."""
  from sea_jax.config import OPTConfig
  from sea_jax.layers import SeedKeys
  config = OPTConfig(vocab_size=96, hidden_size=32, num_attention_heads=4, ffn_dim=64,
                     num_hidden_layers=2, max_position_embeddings=64, attention="sea",
                     sea=SEAConfig(K=16, k=4, seed=11))
  fast = flat_params(checkpoint.seeded_model(config))
  slow = flat_params(checkpoint.build_model(config, nnx.Rngs(11)))
  assert set(fast) == set(slow) and len(fast) > 20
  for p in slow:
    np.testing.assert_array_equal(np.asarray(fast[p]), np.asarray(slow[p]), err_msg=p)
  keys = SeedKeys(3)
  rngs = nnx.Rngs(3)
  for _ in range(3):
    np.testing.assert_array_equal(jax.random.key_data(keys.params()),
                                  jax.random.key_data(rngs.params()))


def test_attention_layers_selects_which_layers_swap(dense_folder):
  model = checkpoint.load_model(str(dense_folder / "dense"), attention="sea", sea_K=16,
                                attention_layers=(1,))
  kinds = [type(layer.self_attn.core).__name__ for layer in model.layers]
  assert kinds == ["DenseAttention", "SEAAttention"]
  ids = jnp.asarray(np.random.default_rng(current_seed()).integers(0, 50272, (2, 40)))
  aux = nnx.jit(lambda m, x: m(x, sea_k=4, return_attn_aux=True).attn_aux)(model, ids)
  assert "est_probs" not in aux[0] and aux[1]["est_probs"].shape == (2, 4, 40, 16)


def test_k_is_a_call_argument_and_bad_k_is_an_error(dense_folder):
  model = checkpoint.load_model(str(dense_folder / "dense"), attention="sea", sea_K=16)
  ids = jnp.asarray(np.random.default_rng(current_seed()).integers(0, 50272, (1, 64)))
  # jitted, k a Python int as before (an eager forward compiles every scan of the SEA layer)
  kept_of = nnx.jit(lambda m, x, k: m(x, sea_k=k, return_attn_aux=True).attn_aux[0]
                    ["compressed_mask"].sum(), static_argnums=2)
  kept = [int(kept_of(model, ids, k)) for k in (2, 8)]
  assert kept[0] < kept[1]
  with pytest.raises((ValueError, ConfigError), match="k"):
    model(ids, sea_k=0)
  with pytest.raises(ConfigError, match="multiple of 4"):
    checkpoint.load_model(str(dense_folder / "dense"), attention="sea", sea_K=18)


def _eval(*args):
  proc = subprocess.run([sys.executable, "eval.py", "--no-progress", *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [json.loads(l) for l in proc.stdout.strip().splitlines() if l.startswith("{")]


def test_eval_sea_student_and_k_sweep(dense_folder):
  folder = str(dense_folder / "dense")
  [dense] = _eval("--model", folder, "--seq-len", 64, "--max-windows", 2)
  lines = _eval("--model", folder, "--attention", "sea", "--sea-K", 16, "--sea-k", "2,8",
                "--seq-len", 64, "--max-windows", 2)
  assert [l["attention"] for l in lines] == ["sea", "sea"]
  assert [l["sea_k"] for l in lines] == [2, 8] and lines[0]["sea_K"] == 16
  assert dense["attention"] == "dense" and dense["sea_k"] is None
  # an untrained student is not its teacher
  # (at init_std 0.2 the untrained SEA layers move the perplexity by 2-8%, far above rounding)
  assert all(np.isfinite(l["perplexity"]) and abs(l["perplexity"] / dense["perplexity"] - 1) > 1e-3
             for l in lines)


def test_k_sweep_compiles_once_and_equals_each_k_alone(dense_folder, monkeypatch):
  """`evaluate.perplexities` over several k traces the eval step's layer once (k a traced
  argument, the top-k's radix select; every layer shares the compiled layer) and gives each k
  the perplexity a static-k run of that k alone gives.
  The kept cells are the same (the select keeps the top_k's cells, ties to the lower cell:
  test_topk.py), so only the rounding of differently fused float32 arithmetic may differ: a few
  ulps (1.2e-7) of each position's loss, far below 1e-5 of the mean (on this machine they are
  bitwise equal); a different mask moves this untrained student at init_std 0.2 by far more:
  the four k below give mean losses 1.1e-3 or more apart, the check asks for 10x the tolerance."""
  from sea_jax import evaluate
  from sea_jax import sharding as shd
  model = checkpoint.load_model(str(dense_folder / "dense"), attention="sea", sea_K=16, sea_k=4)
  windows = np.random.default_rng(seed_of("test_k_sweep")).integers(
      0, model.config.vocab_size, (3, 64)).astype(np.int32)
  mesh = shd.make_mesh(None, jax.devices()[:1])
  traces = []
  run_layer = evaluate.run_layer
  monkeypatch.setattr(evaluate, "run_layer", lambda *a: traces.append(a[3]) or run_layer(*a))
  ks = [1, 3, 8, 64]
  swept = list(evaluate.perplexities(model, windows, ks, batch_size=1, mesh=mesh,
                                     progress=False))
  assert [k for k, _ in swept] == ks and len(traces) == 1 and isinstance(traces[0], jax.Array)
  alone = [evaluate.perplexity(model, windows, batch_size=1, mesh=mesh, sea_k=k, progress=False)
           for k in ks]
  assert traces[1:] == ks  # each static run traced once with its Python-int k
  for (_, s), a in zip(swept, alone):
    assert abs(s.mean_nll - a.mean_nll) <= 1e-5 * abs(a.mean_nll), (s, a)
  nll = [a.mean_nll for a in alone]
  assert min(abs(x - y) / abs(y) for x, y in zip(nll, nll[1:])) > 1e-4, nll
