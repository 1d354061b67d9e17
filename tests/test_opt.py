"""The Flax OPT port against transformers' PyTorch OPTForCausalLM (float64 reference)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import relative_error, seed_of
from hf_models import save_tiny_opt, torch_logits
from sea_jax import checkpoint, convert, sharding
from sea_jax.config import ConfigError


@pytest.fixture(scope="module", params=["pre", "post"])
def converted(request, tmp_path_factory):
  """(variant, torch model, converted model folder)."""
  root = tmp_path_factory.mktemp(f"opt_{request.param}")
  model = save_tiny_opt(str(root / "hf"), request.param, seed=seed_of(f"test_opt.converted.{request.param}"))
  convert.hf_to_model_folder(str(root / "hf"), str(root / "sj"))
  return request.param, model, str(root / "sj")


def padded_batch(rng, T=24, vocab=50272):
  ids = rng.integers(3, vocab, size=(2, T))
  mask = np.ones((2, T), np.int64)
  pad = int(rng.integers(3, T // 2))
  mask[1, :pad] = 0  # left padding, as Hugging Face pads for generation
  ids[1, :pad] = 1
  return ids, mask


def test_logits_match_transformers_fp32(converted, rng):
  _, torch_model, folder = converted
  model = checkpoint.load_model(folder)
  ids, mask = padded_batch(rng)
  want = torch_logits(torch_model, ids, mask)
  got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).logits)
  real = mask.astype(bool)
  assert relative_error(got[real], want[real]) <= 1e-5


def test_jit_batch_without_mask(converted, rng):
  _, torch_model, folder = converted
  model = checkpoint.load_model(folder)
  ids = rng.integers(0, 50272, size=(3, 17))
  got = nnx.jit(lambda m, x: m(x).logits)(model, jnp.asarray(ids))
  assert relative_error(got, torch_logits(torch_model, ids)) <= 1e-5


def test_bf16_compute_close_to_fp32(converted, rng):
  _, torch_model, folder = converted
  model = checkpoint.load_model(folder, dtype="bfloat16", param_dtype="bfloat16")
  assert model.embed_tokens[...].dtype == jnp.bfloat16
  ids = rng.integers(0, 50272, size=(2, 16))
  got = np.asarray(model(jnp.asarray(ids)).logits, np.float64)
  assert relative_error(got, torch_logits(torch_model, ids)) <= 3e-2


def test_hidden_states_follow_hugging_face(converted, rng):
  _, torch_model, folder = converted
  import torch
  model = checkpoint.load_model(folder)
  ids = rng.integers(0, 50272, size=(1, 12))
  out = model(jnp.asarray(ids), output_hidden_states=True)
  with torch.no_grad():
    ref = torch_model.double()(torch.tensor(ids), output_hidden_states=True).hidden_states
  torch_model.float()
  assert len(out.hidden_states) == len(ref) == model.config.num_hidden_layers + 1
  # HF's last hidden state is the last layer's output (before the final norm/projection)
  for got, want in zip(out.hidden_states[:-1], ref[:-1]):
    assert relative_error(got, want.numpy()) <= 1e-5


def test_sharded_logits_equal_single_device(converted, rng):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
  _, _, folder = converted
  single = checkpoint.load_model(folder)
  mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
  sharded = checkpoint.load_model(folder, mesh)
  kernel = sharded.layers[0].fc1.kernel[...]
  assert len(kernel.sharding.device_set) == 8 and kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  ids = rng.integers(0, 50272, size=(4, 20))
  batch = jax.device_put(jnp.asarray(ids), sharding.batch_sharding(mesh))
  got = nnx.jit(lambda m, x: m(x).logits)(sharded, batch)
  want = single(jnp.asarray(ids)).logits
  assert relative_error(got, want) <= 1e-5


def test_sequence_longer_than_positions_is_an_error(converted):
  _, _, folder = converted
  model = checkpoint.load_model(folder)
  T = model.config.max_position_embeddings + 1
  with pytest.raises(ConfigError, match="exceeds the model's max_position_embeddings"):
    model(jnp.zeros((1, T), jnp.int32))


def test_config_round_trips_through_hf_dict():
  from sea_jax.config import OPTConfig, SEAConfig
  cfg = OPTConfig(hidden_size=64, num_attention_heads=4, attention="sea", attention_layers=(0,),
                  sea=SEAConfig(K=64, k=16))
  assert OPTConfig.from_hf_dict(cfg.to_hf_dict()) == dataclasses.replace(cfg)
  with pytest.raises(ConfigError, match="not 'opt'"):
    OPTConfig.from_hf_dict({"model_type": "llama"})
