"""SEA's fwd+bwd memory grows linearly in T; dense attention's grows quadratically (the T x T
reference), or linearly on the blocked path (`blocked_attention`) that `dense_impl="auto"` takes
on CPU at every length.

Compiles (does not run) grad of sum(context) w.r.t. q, k, v and the layer's params at opt-125m
head shapes (N=1, H=12, d=64, K=256, k=64) and reads XLA's planned temp bytes; and a whole SEA
model's forward, whose temp must not grow with its depth.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from sea_jax.attention import make_attention_core
from sea_jax.config import OPTConfig, SEAConfig

H, D, K, TOP_K = 12, 64, 256, 64


def temp_bytes(kind: str, T: int, dense_impl: str = "reference") -> int:
  config = OPTConfig(hidden_size=H * D, num_attention_heads=H, max_position_embeddings=T,
                     attention=kind, sea=SEAConfig(K=K, k=TOP_K, sparse_impl="xla"),
                     dense_impl=dense_impl)
  core = make_attention_core(config, 0, rngs=nnx.Rngs(0))
  graph, params, rest = nnx.split(core, nnx.Param, ...)

  def loss(params, q, k, v, rest):
    context, _ = nnx.merge(graph, params, rest)(q, k, v)
    return jnp.sum(context)

  qkv = jax.ShapeDtypeStruct((1, H, T, D), jnp.float32)
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(params, qkv, qkv, qkv, rest)
  return lowered.compile().memory_analysis().temp_size_in_bytes


@pytest.fixture(scope="module")
def measured():
  out = {(kind, T): temp_bytes(kind, T) for kind in ("sea", "dense") for T in (2048, 8192)}
  out.update({("chunked", T): temp_bytes("dense", T, "chunked") for T in (2048, 8192)})
  return out


def test_sea_memory_is_linear_in_length(measured):
  small, large = measured["sea", 2048], measured["sea", 8192]
  assert large < 5 * small, f"SEA temp bytes: T=2048 {small}, T=8192 {large} ({large / small:.2f}x)"


def test_dense_memory_is_quadratic_in_length(measured):
  small, large = measured["dense", 2048], measured["dense", 8192]
  assert large >= 10 * small, f"dense temp bytes: {small} -> {large} ({large / small:.2f}x)"
  assert measured["sea", 8192] < large / 4, "SEA should use far less memory than dense at 8192"


def test_chunked_dense_memory_is_linear_in_length(measured):
  small, large = measured["chunked", 2048], measured["chunked", 8192]
  assert large < 5 * small, f"chunked dense temp bytes: {small} -> {large} ({large / small:.2f}x)"
  assert large < measured["dense", 8192] / 4


def _sea_llama_temp(layers: int, T: int = 1024, heads: int = 4, K: int = 64) -> int:
  """Compiled temp bytes of a tiny random SEA Llama's forward (pooled keys, every layer SEA)."""
  from sea_jax import checkpoint
  from sea_jax.config import LlamaConfig
  cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                    head_dim=16, max_position_embeddings=T, attention="sea",
                    sea=SEAConfig(K=K, k=8, sparse_impl="xla", pooled_keys=True))
  graph, state = nnx.split(checkpoint.build_model(cfg, nnx.Rngs(0)))
  ids = jax.ShapeDtypeStruct((1, T), jnp.int32)
  run = jax.jit(lambda s, x: jnp.sum(nnx.merge(graph, s)(x).logits))
  return run.lower(state, ids).compile().memory_analysis().temp_size_in_bytes


def test_a_sea_models_temp_does_not_grow_with_depth():
  """Layers run one after another, so a forward needs one layer's buffers at a time: 4 layers
  may not plan more temp than 2 by as much as one (N, H, T, K) fp32 array. XLA's CPU scheduler
  by default starts every layer's activation-free work (the zero-filled outputs of the row-block
  loops) at the top of the program and keeps it alive: about 1.5 such arrays more per layer here,
  11x one layer's temp on SmolLM2's 30 layers. `sea_jax.xla_defaults` turns that order off."""
  T, heads, K = 1024, 4, 64
  one_array = 1 * heads * T * K * 4
  two, four = _sea_llama_temp(2, T, heads, K), _sea_llama_temp(4, T, heads, K)
  assert four - two < one_array, (
      f"temp grows with depth: 2 layers {two} B, 4 layers {four} B (+{four - two} B, one "
      f"(N,H,T,K) array is {one_array} B); XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}")
