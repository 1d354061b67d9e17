"""evaluate.LayerwiseLosses (the eval step a compiled layer at a time) against the whole model
traced as one program (`window_losses`): the same losses, one compile per layer structure."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import seed_of
from sea_jax import checkpoint, evaluate
from sea_jax import sharding as shd
from sea_jax.config import LlamaConfig, OPTConfig, SEAConfig

SEA = SEAConfig(K=16, k=4, sparse_impl="xla")


def _config(family: str, attention: str, **kw):
  if family == "llama":
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, max_position_embeddings=256, attention=attention, sea=SEA,
                       **kw)
  return OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=3,
                   num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                   attention=attention, sea=SEA, **kw)


def _losses_both_ways(model, windows, k, monkeypatch):
  """(whole-program losses, layerwise losses, the k each layer trace saw)."""
  traced = isinstance(k, jax.Array)
  graph, state = nnx.split(model)
  whole = jax.jit(lambda s, x, k: evaluate.window_losses(nnx.merge(graph, s), x, k),
                  static_argnums=() if traced else (2,))(state, windows, k)
  traces = []
  run_layer = evaluate.run_layer
  monkeypatch.setattr(evaluate, "run_layer", lambda *a: traces.append(a[3]) or run_layer(*a))
  mesh = shd.make_mesh(None, jax.devices()[:1])
  step = evaluate.LayerwiseLosses(model, mesh, None if traced else k)
  step.compile(windows, k if traced else None)
  layerwise = step(windows, k if traced else None)
  return np.asarray(whole), np.asarray(layerwise), traces


@pytest.mark.parametrize("family,attention", [("opt", "dense"), ("llama", "sea")])
def test_layerwise_losses_equal_the_whole_program(family, attention, monkeypatch):
  """Both run the same float32 operations in the same order; only where XLA fuses differs
  (the layerwise program stores h between layers, as the whole one does at its fusion
  boundaries), so the losses agree to a few ulps (1.2e-7): 1e-6 relative. The three layers
  share one structure, so the layer is traced once, not three times."""
  model = checkpoint.build_model(_config(family, attention), nnx.Rngs(seed_of(f"lw.{family}")))
  windows = jnp.asarray(np.random.default_rng(seed_of(f"lw.windows.{family}")).integers(
      0, 256, (2, 96)), jnp.int32)
  ks = [4, jnp.int32(9)] if attention == "sea" else [None]
  for k in ks:
    whole, layerwise, traces = _losses_both_ways(model, windows, k, monkeypatch)
    np.testing.assert_allclose(layerwise, whole, rtol=1e-6)
    assert len(traces) == 1, traces
    if attention == "sea":
      assert isinstance(traces[0], jax.Array) == isinstance(k, jax.Array)


def test_layers_of_two_structures_compile_twice(monkeypatch):
  """attention_layers=(1,): layers 0 and 2 dense, layer 1 SEA -> two layer programs, and the
  losses still equal the whole program's."""
  model = checkpoint.build_model(_config("llama", "sea", attention_layers=(1,)),
                                 nnx.Rngs(seed_of("lw.mixed")))
  windows = jnp.asarray(np.random.default_rng(seed_of("lw.mixed.windows")).integers(
      0, 256, (1, 64)), jnp.int32)
  whole, layerwise, traces = _losses_both_ways(model, windows, 4, monkeypatch)
  np.testing.assert_allclose(layerwise, whole, rtol=1e-6)
  assert len(traces) == 2, traces
