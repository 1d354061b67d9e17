"""Pooled-key bin scores (`sea_jax.ops.pooled_keys`) and their mix into SEA's estimator
(`SEAConfig.pooled_keys`) against float64 NumPy references: the score of every (row, bin),
a decoding row over a left-padded cache, the mixture's probabilities, the memory (no T x T),
and a SEA layer with the mix on that loads a checkpoint saved without it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_sea_pieces import make_rng, randomize_params
from sea_jax.config import OPTConfig, SEAConfig
from sea_jax.ops.pooled_keys import EMPTY, key_prefix_sums, pooled_key_logits, pooled_key_row
from sea_jax.sea.estimator import PooledKeyMix

EPS32 = float(np.finfo(np.float32).eps)


def ref_pooled(q: np.ndarray, k: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
  """float64 P (N,H,T,K) and each bin's key count (T,K), bins from SEA_SPEC §1.3's formula
  bin_t(s) = floor((s + 0.5) K / (t + 1) - 1e-4), independent of `ops.bins`."""
  N, H, T, d = q.shape
  G = H // k.shape[1]
  P = np.full((N, H, T, K), np.nan)
  count = np.zeros((T, K), np.int64)
  for t in range(T):
    s = np.arange(t + 1)
    bins = np.floor((s + 0.5) * K / (t + 1) - 1e-4).astype(int)
    for b in range(K):
      keys = s[bins == b]
      count[t, b] = len(keys)
      if len(keys):
        mean = k[:, :, keys].mean(axis=2)  # (N, Hkv, d)
        P[:, :, t, b] = np.einsum("nhd,nhd->nh", q[:, :, t], np.repeat(mean, G, axis=1))
  return P, count


def bound(q: np.ndarray, k: np.ndarray, count: np.ndarray) -> np.ndarray:
  """Per (n, h, t, b) error bound of the fp32 computation, (q·S[end] - q·S[start]) / count:
  the prefix sums carry at most T·eps·max|k| per feature (a running sum of T terms) and are at
  most T·max|k| in size, so each dot product with q is off by at most |q|_1·T·eps·max|k| from
  the sums plus d·eps·|q|_1·T·max|k| from its own rounding; the difference twice that,
  divided by the bin's count, and a factor 2 for the division and the final rounding."""
  T, d = q.shape[2], q.shape[-1]
  q1 = np.abs(q).sum(-1)[..., None]  # (N, H, T, 1)
  per_dot = q1 * T * (1 + d) * EPS32 * np.abs(k).max()
  return 2 * 2 * per_dot / np.maximum(count, 1)[None, None]


@pytest.mark.parametrize("N,H,Hkv,T,K,block", [(2, 6, 2, 37, 8, 5), (1, 3, 3, 70, 16, 256),
                                               (1, 4, 1, 9, 12, 4)])
def test_pooled_scores_equal_the_float64_reference(N, H, Hkv, T, K, block):
  """Every non-empty bin's score within the derived fp32 bound; empty bins (t + 1 < K) EMPTY;
  row blocks that do not divide T."""
  rng, seed = make_rng()
  q = rng.standard_normal((N, H, T, 8)) * 0.5
  k = rng.standard_normal((N, Hkv, T, 8)) + 0.3  # a shared offset, as real keys have
  got = np.asarray(pooled_key_logits(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                     K, row_block=block), np.float64)
  want, count = ref_pooled(q, k, K)
  empty = np.broadcast_to(count == 0, got.shape)
  assert empty.any() and (~empty).any()
  np.testing.assert_array_equal(got[empty], np.float32(EMPTY), err_msg=f"seed {seed}")
  err = np.abs(got - want)[~empty]
  assert np.all(err <= np.broadcast_to(bound(q, k, count), got.shape)[~empty]), (seed, err.max())


def test_decoding_row_over_a_left_padded_cache_equals_the_sequence_row():
  rng, seed = make_rng()
  N, H, Hkv, T, K, d = 3, 4, 2, 30, 8, 8
  q = jnp.asarray(rng.standard_normal((N, H, T, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((N, Hkv, T, d)), jnp.float32)
  want = np.asarray(pooled_key_logits(q, k, K))
  offsets = np.asarray([0, 4, 1])
  L = T + 4
  cache = np.full((N, Hkv, L, d), 7.0, np.float32)  # pad slots hold junk, masked out
  for n in range(N):
    cache[n, :, offsets[n]:offsets[n] + T] = np.asarray(k[n])
  real = (np.arange(L)[None] >= offsets[:, None]) & (np.arange(L)[None] < offsets[:, None] + T)
  sums = key_prefix_sums(jnp.asarray(np.where(real[:, None, :, None], cache, 0.0)))
  for t in (0, 3, 8, 17, 29):
    ts = jnp.full((N,), t, jnp.int32)
    got = np.asarray(pooled_key_row(q[:, :, t], sums, ts, jnp.asarray(offsets), K))
    np.testing.assert_allclose(got, want[:, :, t], rtol=1e-5, atol=1e-5,
                               err_msg=f"seed {seed} row {t}")


def test_mixture_probabilities_equal_the_float64_mixture():
  """softmax_K of the mixed logits = w softmax_K(Ê) + (1 - w) softmax_K(τ P), P's empty bins
  at zero, for random w and τ (one of them negative: empty bins must stay empty)."""
  rng, seed = make_rng()
  N, H, T, K = 2, 3, 11, 8
  mix = PooledKeyMix(H, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  w_logit = rng.standard_normal(H)
  tau = np.asarray([0.7, -1.3, 2.0])
  mix.mix[...] = jnp.asarray(w_logit, jnp.float32)
  mix.temperature[...] = jnp.asarray(tau, jnp.float32)
  est = rng.standard_normal((N, H, T, K)) * 2
  P = rng.standard_normal((N, H, T, K)) * 3
  P[:, :, :4, 5:] = EMPTY
  got = np.asarray(jax.nn.softmax(mix(jnp.asarray(est, jnp.float32),
                                      jnp.asarray(P, jnp.float32)), -1), np.float64)
  w = 1 / (1 + np.exp(-w_logit))[:, None, None]

  def softmax(x, valid):
    x = np.where(valid, x, -np.inf)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  valid = P > EMPTY / 2
  want = (w * softmax(est, np.ones_like(valid)) + (1 - w) * softmax(tau[:, None, None] * P,
                                                                    valid))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=f"seed {seed}")


def test_pooled_scores_memory_is_linear_in_length():
  """Compiled temp bytes of fwd+bwd of the scores at T = 2,048 and 8,192 (H = 9 on 3 kv heads,
  d = 64, K = 256): 4x the length, under 5x the bytes, and far below one T x T map per head."""
  def temp(T):
    qs = jax.ShapeDtypeStruct((1, 9, T, 64), jnp.float32)
    ks = jax.ShapeDtypeStruct((1, 3, T, 64), jnp.float32)
    f = jax.jit(jax.grad(lambda q, k: jnp.sum(pooled_key_logits(q, k, 256)), argnums=(0, 1)))
    return f.lower(qs, ks).compile().memory_analysis().temp_size_in_bytes

  small, large = temp(2048), temp(8192)
  assert large < 5 * small, (small, large)
  assert large < 8192 * 8192 * 4, large


def test_a_student_saved_without_the_mix_loads_with_it(tmp_path):
  """A SEA model folder saved without the mix loads with sea_pooled_keys=True: every saved
  parameter kept, the mix fresh (w = 0.5, τ = 1), and the logits change (the mix is live)."""
  from sea_jax import checkpoint
  config = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                     num_attention_heads=4, max_position_embeddings=48, attention="sea",
                     sea=SEAConfig(K=8, k=2))
  model = checkpoint.build_model(config, nnx.Rngs(3))
  rng, seed = make_rng()
  randomize_params(model, rng)
  folder = str(tmp_path / "student")
  checkpoint.save_params(nnx.state(model), folder)
  checkpoint.write_config(config, folder)
  mixed = checkpoint.load_model(folder, sea_pooled_keys=True)
  assert mixed.config.sea.pooled_keys
  saved = checkpoint.flatten(nnx.to_pure_dict(nnx.state(model)))
  loaded = checkpoint.flatten(nnx.to_pure_dict(nnx.state(mixed)))
  fresh = sorted(set(loaded) - set(saved))
  assert fresh and all("pooled" in p for p in fresh), fresh
  for p, value in saved.items():
    np.testing.assert_array_equal(np.asarray(loaded[p]), np.asarray(value), err_msg=str(p))
  for layer in mixed.layers:
    mix = layer.self_attn.core.pooled
    np.testing.assert_array_equal(np.asarray(mix.mix[...]), 0.0)
    np.testing.assert_array_equal(np.asarray(mix.temperature[...]), 1.0)
  ids = jnp.asarray(rng.integers(0, 64, (1, 40)), jnp.int32)
  logits = nnx.jit(lambda m, x: m(x).logits)
  plain = np.asarray(logits(model, ids))
  assert np.abs(np.asarray(logits(mixed, ids)) - plain).max() > 1e-4 * np.abs(plain).max(), seed


def _constant_bytes(hlo_text: str) -> int:
  """Bytes of every constant literal in a compiled HLO module's text."""
  import re
  width = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
           "s64": 8, "u64": 8, "f64": 8}
  total = 0
  for dtype, dims in re.findall(r"= (\w+)\[([\d,]*)\](?:\{[\d,]*\})? constant\(", hlo_text):
    total += width.get(dtype, 8) * int(np.prod([int(x) for x in dims.split(",") if x]))
  return total


def test_the_compiled_op_embeds_no_table_that_grows_with_length():
  """The bin edges are computed per call, not folded into the program: a (T, K+1) int32 table
  per layer would sit in the executable's host memory (241 MiB over SmolLM2's 30 layers at
  T = 8,192). The program's constants are the same bytes at T = 256 and 4 x 256."""
  sizes = []
  for T in (256, 1024):
    q, k = jnp.ones((1, 2, T, 8)), jnp.ones((1, 1, T, 8))
    compiled = jax.jit(lambda q, k: pooled_key_logits(q, k, 16)).lower(q, k).compile()
    sizes.append(_constant_bytes(compiled.as_text()))
  assert sizes[0] == sizes[1], sizes  # before the fix: 17,476 and 69,700 bytes
  assert sizes[1] < 4 * 1024 * (16 + 1), sizes  # less than one (T, K+1) int32 edge table
