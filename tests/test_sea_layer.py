"""SEAAttention and PerformerAttention as whole layers (SEA_SPEC §1.1–1.6).

References are the NumPy float64 pieces of test_sea_pieces.py; the kept mask is compared exactly
(reference top-k on the layer's own Â) before the outputs are compared.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sea_jax.attention import make_attention_core
from sea_jax.config import AttentionShape
from sea_jax.config import ConfigError, OPTConfig, SEAConfig
from sea_jax.sea import PerformerAttention, RandomFeatures, SEAAttention, sparse_dispatch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_sea_pieces import (f64, make_rng, randomize_params, ref_bin_softmax, ref_estimator,
                             ref_expand, ref_features, ref_linear_attention, ref_masked_attention,
                             ref_topk, rel_err)  # noqa: E402


def small_config(H=3, d=16, K=64, k=4, max_pos=320, **sea) -> OPTConfig:
  sea = SEAConfig(K=K, k=k, performer_chunk=16, query_block=32, sparse_impl="xla", **sea)
  return OPTConfig(hidden_size=H * d, num_attention_heads=H, max_position_embeddings=max_pos,
                   attention="sea", sea=sea)


def shape_of(config) -> AttentionShape:
  return AttentionShape.of(config)


def random_qkv(rng, N, H, T, d, dtype=np.float32):
  q, k, v = (rng.standard_normal((N, H, T, d)) for _ in range(3))
  return tuple(jnp.asarray(x, dtype) for x in (q * d ** -0.5, k, v))


def make_layer(config, seed, rng) -> SEAAttention:
  layer = SEAAttention.from_shape(shape_of(config), rngs=nnx.Rngs(seed))
  randomize_params(layer, rng)
  return layer


def ref_layer(layer: SEAAttention, q, k, v, mask):
  """(context, Ê, s_prob, s_mix) in float64 for a given compressed mask."""
  q, k, v = f64(q), f64(k), f64(v)
  N, H, T, d = q.shape
  W = f64(layer.features[...])
  pos = np.broadcast_to(f64(layer.positions[...])[:T], (N, H, T, d))
  c_perf = ref_linear_attention(ref_features(q, W), ref_features(k, W),
                                np.concatenate([pos, v], -1))
  logits, s_prob, s_mix = ref_estimator(layer.estimator, np.concatenate([c_perf, v], -1))
  c_sparse = s_prob[..., None] * ref_masked_attention(q, k, v, ref_expand(mask))
  c_avg = np.cumsum(v, axis=2) / np.arange(1, T + 1)[:, None]
  return s_mix[..., None] * c_sparse + (1 - s_mix[..., None]) * c_avg, logits, s_prob, s_mix


@nnx.jit(static_argnames=("return_aux",))
def run(layer, q, k, v, sea_k=None, return_aux=True):
  return layer(q, k, v, sea_k=sea_k, return_aux=return_aux)


@pytest.mark.parametrize("N,H,T,d,K,k", [(2, 3, 100, 16, 64, 4), (1, 2, 300, 16, 256, 8),
                                         (1, 2, 64, 16, 256, 64), (1, 2, 37, 80, 8, 2)])
def test_layer_matches_reference(N, H, T, d, K, k):
  rng, seed = make_rng()
  layer = make_layer(small_config(H=H, d=d, K=K, k=k), seed, rng)
  q, k_, v = random_qkv(rng, N, H, T, d)
  context, aux = run(layer, q, k_, v)
  assert set(aux) == {"q", "k", "context", "est_logits", "est_probs", "compressed_mask",
                      "s_prob", "s_mix"}
  for name in ("est_logits", "est_probs", "compressed_mask"):
    assert aux[name].shape == (N, H, T, K), name
  assert aux["s_prob"].shape == aux["s_mix"].shape == (N, H, T)
  mask = np.asarray(aux["compressed_mask"])
  assert np.array_equal(mask, ref_topk(aux["est_probs"], k)), f"seed={seed}: mask"
  want, logits, s_prob, s_mix = ref_layer(layer, q, k_, v, mask)
  checks = {"est_logits": (aux["est_logits"], logits), "s_prob": (aux["s_prob"], s_prob),
            "s_mix": (aux["s_mix"], s_mix), "est_probs": (aux["est_probs"], ref_bin_softmax(logits)),
            "context": (context, want)}
  for name, (got, ref) in checks.items():
    assert rel_err(got, ref) <= 1e-4, f"seed={seed}: {name} rel err {rel_err(got, ref)}"
  assert np.array_equal(aux["context"], context)


def test_layer_is_causal():
  """Changing q, k, v after t0 leaves every output row <= t0 unchanged (CNN included)."""
  rng, seed = make_rng()
  N, H, T, d, K, t0 = 2, 3, 90, 16, 64, 40
  layer = make_layer(small_config(H=H, d=d, K=K, k=3), seed, rng)
  q, k, v = random_qkv(rng, N, H, T, d)
  q2, k2, v2 = (x.at[:, :, t0 + 1:].add(jnp.asarray(rng.standard_normal(x[:, :, t0 + 1:].shape),
                                                     x.dtype)) for x in (q, k, v))
  base, aux = run(layer, q, k, v)
  moved, aux2 = run(layer, q2, k2, v2)
  for name in ("est_logits", "compressed_mask", "s_prob", "s_mix"):
    assert np.array_equal(np.asarray(aux[name])[:, :, :t0 + 1],
                          np.asarray(aux2[name])[:, :, :t0 + 1]), f"seed={seed}: {name}"
  assert np.allclose(base[:, :, :t0 + 1], moved[:, :, :t0 + 1], rtol=0, atol=1e-6), f"seed={seed}"
  assert not np.allclose(base[:, :, t0 + 1:], moved[:, :, t0 + 1:]), f"seed={seed}"


@contextlib.contextmanager
def float64():
  enable = getattr(jax, "enable_x64", None)
  if enable is None:
    from jax.experimental import enable_x64 as enable
  with enable(True):
    yield


def _finite_difference_pairs(seed: int, rng):
  """{input name: three (finite difference, gradient) pairs of mask-preserving directions},
  or None when a near-tie in the top-k flips the mask for too many directions of one input."""
  with float64():
    layer = SEAAttention(num_heads=2, head_dim=8, max_positions=16, K=8, k=2, performer_chunk=4,
                         query_block=5, sparse_impl="xla", dtype=jnp.float64,
                         param_dtype=jnp.float64, rngs=nnx.Rngs(seed))
    randomize_params(layer, rng)
    graph, params, rest = nnx.split(layer, nnx.Param, ...)
    q, k, v = random_qkv(rng, 1, 2, 12, 8, np.float64)
    w = jnp.asarray(rng.standard_normal(q.shape))

    @jax.jit
    def loss(inputs):
      params, q, k, v = inputs
      out, aux = nnx.merge(graph, params, rest)(q, k, v, return_aux=True)
      return jnp.sum(out * w), aux["compressed_mask"]

    x0 = (params, q, k, v)
    (_, mask0), grads = jax.value_and_grad(loss, has_aux=True)(x0)
    grad_at = jax.jit(jax.grad(lambda x: loss(x)[0]))
    slope = lambda g, u: float(sum(jnp.vdot(a, b) for a, b in  # noqa: E731
                                   zip(jax.tree.leaves(g), jax.tree.leaves(u))))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads)), f"seed={seed}"
    eps = 2e-2
    pairs = {}
    for part, name in enumerate(("params", "q", "k", "v")):
      exact_grad = grads[part]
      scale = float(np.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(exact_grad))))
      checked = []  # (finite difference, gradient) of mask-preserving directions
      for _ in range(40):
        u = jax.tree.map(lambda x: rng.standard_normal(x.shape), x0[part])
        norm = np.sqrt(sum(np.sum(a * a) for a in jax.tree.leaves(u)))
        u = jax.tree.map(lambda a: jnp.asarray(a / norm), u)
        shift = lambda s: tuple(  # noqa: E731
            jax.tree.map(lambda a, b: a + s * b, x, u) if i == part else x
            for i, x in enumerate(x0))
        diffs, same_mask = [], True
        for h in (eps, eps / 2):
          (fp, mp), (fm, mm) = loss(shift(h)), loss(shift(-h))
          same_mask &= np.array_equal(mp, mask0) and np.array_equal(mm, mask0)
          diffs.append(float(fp - fm) / (2 * h))
        exact = slope(exact_grad, u)
        # A ReLU kink (Performer features, estimator) within [-eps, eps] of x0 along u: the
        # slope jumps across it, so the slopes at +-eps no longer average to the one at x0
        # (for a smooth loss they do, up to eps^2). Such directions are redrawn, like the ones
        # that flip the mask.
        ends = [slope(grad_at(shift(h))[part], u) for h in (eps, -eps)]
        smooth = abs(sum(ends) - 2 * exact) <= 3e-3 * abs(exact) + 1e-4 * scale
        if same_mask and smooth:
          checked.append(((4 * diffs[1] - diffs[0]) / 3, exact))
          if len(checked) == 3:
            break
      if len(checked) < 3:
        return None
      pairs[name] = (checked, scale)
    return pairs


def test_gradients_match_finite_differences():
  """Directional derivatives of a small fp64 layer (params, q, k, v) vs central differences.

  Unit-norm random directions, Richardson-extrapolated differences at eps and eps/2. The shared
  LayerNorm keeps fp32 statistics, so agreement is ~1e-4 (relative, or of the gradient's norm
  for near-orthogonal directions), not fp64-exact. The gradient is that of the function on one
  side of its non-differentiable points, so a direction along which the top-k mask changes, or
  a ReLU kink lies within eps (the autodiff slopes at +-eps then no longer average to the one at
  x0), measures something else: such directions are not used (`_finite_difference_pairs`).
  The input is drawn from the test's own seed, the same on every run; three directions per
  input are checked and two must agree (a wrong gradient fails all of them).
  """
  rng, seed = make_rng()
  pairs = _finite_difference_pairs(seed, rng)
  assert pairs is not None, f"seed={seed}: no three mask-preserving smooth directions"
  for name, (checked, scale) in pairs.items():
    good = [abs(fd - g) <= 3e-3 * abs(g) + 1e-4 * scale for fd, g in checked]
    assert sum(good) >= 2, f"seed={seed}: d/d{name}: (finite difference, gradient) {checked}"


def test_jit_matches_eager_and_batch_rows_are_independent():
  rng, seed = make_rng()
  layer = make_layer(small_config(H=2, K=64, k=4), seed, rng)
  q, k, v = random_qkv(rng, 3, 2, 70, 16)
  eager, _ = layer(q, k, v)
  jitted, _ = run(layer, q, k, v, return_aux=False)
  assert rel_err(jitted, eager) <= 1e-6, f"seed={seed}"
  single, _ = run(layer, q[1:2], k[1:2], v[1:2], return_aux=False)
  assert rel_err(single, jitted[1:2]) <= 1e-6, f"seed={seed}"


def test_dynamic_k_without_recompiling():
  rng, seed = make_rng()
  layer = make_layer(small_config(H=2, K=16, k=2), seed, rng)
  q, k, v = random_qkv(rng, 1, 2, 60, 16)
  traces = []

  @nnx.jit
  def masked(layer, q, k, v, sea_k):
    traces.append(1)
    return layer(q, k, v, sea_k=sea_k, return_aux=True)[1]["compressed_mask"]

  counts = [int(masked(layer, q, k, v, jnp.int32(kk)).sum()) for kk in (1, 4, 16)]
  assert len(traces) == 1
  assert counts[0] < counts[1] < counts[2], f"seed={seed}: {counts}"
  static = run(layer, q, k, v, sea_k=4)[1]["compressed_mask"]
  assert int(static.sum()) == counts[1]


def test_bf16():
  """bf16 inputs and compute: bf16 output close to fp32 on rows whose kept mask agrees."""
  rng, seed = make_rng()
  config = dataclasses.replace(small_config(H=2, K=64, k=4), dtype="bfloat16")
  layer = make_layer(config, seed, rng)
  q, k, v = random_qkv(rng, 2, 2, 80, 16)
  out, aux = run(layer, *(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())
  assert aux["est_probs"].dtype == jnp.float32
  layer32 = SEAAttention.from_shape(shape_of(dataclasses.replace(config, dtype="float32")),
                                    rngs=nnx.Rngs(0))
  nnx.update(layer32, nnx.state(layer))
  want, aux32 = run(layer32, q, k, v)
  assert rel_err(aux["est_logits"], aux32["est_logits"]) <= 3e-2, f"seed={seed}"
  same = np.all(np.asarray(aux["compressed_mask"]) == np.asarray(aux32["compressed_mask"]),
                axis=(1, 3))  # (N, T): rows where no head's mask flipped
  assert same.mean() > 0.75, f"seed={seed}: bf16 flipped the mask on {1 - same.mean():.0%} of rows"
  got, ref = np.swapaxes(np.asarray(out, np.float32), 1, 2), np.swapaxes(np.asarray(want), 1, 2)
  assert rel_err(got[same], ref[same]) <= 3e-2, f"seed={seed}: {rel_err(got[same], ref[same])}"


def test_k_at_least_t_gives_dense_rows():
  rng, seed = make_rng()
  T = 50
  layer = make_layer(small_config(H=2, K=8, k=T), seed, rng)
  q, k, v = random_qkv(rng, 1, 2, T, 16)
  _, aux = run(layer, q, k, v)
  dense = ref_expand(np.asarray(aux["compressed_mask"]))
  assert dense.sum() == 2 * T * (T + 1) // 2, f"seed={seed}"


def test_config_errors():
  with pytest.raises(ConfigError, match="multiple of 4"):
    SEAAttention.from_shape(shape_of(small_config(K=30)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="k"):
    SEAAttention.from_shape(shape_of(small_config(k=0)), rngs=nnx.Rngs(0))
  layer = SEAAttention.from_shape(shape_of(small_config(K=8)), rngs=nnx.Rngs(0))
  q = jnp.ones((1, 3, 10, 16))
  with pytest.raises(ValueError, match="k"):
    layer(q, q, q, sea_k=0)
  with pytest.raises(ValueError, match="position"):
    layer(*(jnp.ones((1, 3, 321, 16)),) * 3)


@pytest.mark.skipif(jax.default_backend() in ("gpu", "tpu"), reason="the compiled kernel runs here")
def test_pallas_without_an_accelerator_is_a_clear_error():
  q = jnp.ones((1, 1, 4, 8))
  with pytest.raises(ConfigError, match="needs a GPU or TPU"):
    sparse_dispatch("pallas", q, q, q, jnp.ones((1, 1, 4, 8), bool), query_block=4)


def test_random_features_are_fixed_not_trained():
  layer = SEAAttention.from_shape(shape_of(small_config()), rngs=nnx.Rngs(0))
  params = nnx.state(layer, nnx.Param)
  assert "features" not in params and "positions" in params
  (W,) = jax.tree.leaves(nnx.state(layer, RandomFeatures))
  assert W.shape == (int(16 * np.log(16) / 8), 16)


def test_attention_seam_builds_both_cores():
  config = small_config()
  sea = make_attention_core(config, 0, rngs=nnx.Rngs(0))
  perf = make_attention_core(dataclasses.replace(config, attention="performer"), 0,
                             rngs=nnx.Rngs(0))
  assert isinstance(sea, SEAAttention) and isinstance(perf, PerformerAttention)


def test_performer_attention_matches_reference():
  rng, seed = make_rng()
  config = dataclasses.replace(small_config(H=2, d=16), attention="performer")
  layer = PerformerAttention.from_shape(shape_of(config), rngs=nnx.Rngs(seed))
  q, k, v = random_qkv(rng, 2, 2, 45, 16)
  out, aux = layer(q, k, v, return_aux=True)
  W = layer.features[...]
  assert W.shape == (int(16 * np.log(16) / 8), 16)
  want = ref_linear_attention(ref_features(q, W), ref_features(k, W), v)
  assert set(aux) == {"q", "k", "context"} and out.dtype == jnp.float32
  assert rel_err(out, want) <= 1e-5, f"seed={seed}"
  assert "features" not in nnx.state(layer, nnx.Param)


@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa_layer_matches_reference_with_repeated_kv(Hkv):
  """Grouped-query SEA (k, v with Hkv < H heads, as a Llama layer feeds it) against the float64
  reference run on k, v repeated to H heads (query head h reads kv head h // (H // Hkv))."""
  rng, seed = make_rng()
  N, H, T, d, K = 2, 4, 90, 16, 64
  layer = make_layer(small_config(H=H, d=d, K=K, k=3), seed, rng)
  q, _, _ = random_qkv(rng, N, H, T, d)
  _, k, v = random_qkv(rng, N, Hkv, T, d)
  context, aux = run(layer, q, k, v)
  assert aux["k"].shape == (N, Hkv, T, d) and aux["compressed_mask"].shape == (N, H, T, K)
  mask = np.asarray(aux["compressed_mask"])
  assert np.array_equal(mask, ref_topk(aux["est_probs"], 3)), f"seed={seed}: mask"
  rep = lambda x: np.repeat(np.asarray(x), H // Hkv, axis=1)  # noqa: E731
  want, logits, _, _ = ref_layer(layer, q, rep(k), rep(v), mask)
  assert rel_err(aux["est_logits"], logits) <= 1e-4, f"seed={seed}"
  assert rel_err(context, want) <= 1e-4, f"seed={seed}: rel err {rel_err(context, want)}"


def test_position_table_interpolates_beyond_its_rows():
  """A table of R < max_positions rows (long context): position s reads it at
  s (R - 1) / (max_positions - 1), linearly interpolated; R = max_positions indexes rows."""
  from sea_jax.sea.layer import position_values
  rng, seed = make_rng()
  table = rng.standard_normal((5, 3))
  got = np.asarray(position_values(jnp.asarray(table), 17, 17))
  u = np.arange(17) * 4 / 16
  want = np.stack([np.interp(u, np.arange(5), table[:, j]) for j in range(3)], -1)
  assert np.allclose(got, want, atol=1e-6), f"seed={seed}"
  table32 = table.astype(np.float32)
  assert np.array_equal(np.asarray(position_values(jnp.asarray(table32), 4, 5)), table32[:4])
  config = small_config(H=2, max_pos=400, position_rows=64)
  layer = make_layer(config, seed, rng)
  assert layer.positions[...].shape == (64, 16)
  q, k, v = random_qkv(rng, 1, 2, 300, 16)
  out, _ = run(layer, q, k, v)
  assert bool(jnp.isfinite(out).all())


def test_auto_picks_blocked_below_the_tile_threshold_and_every_impl_agrees():
  from sea_jax.sea.layer import AUTO_TILE_MIN_BLOCKS, resolve_sparse_impl
  assert jax.default_backend() == "cpu"
  assert resolve_sparse_impl("auto", 512, 128) == "blocked"
  assert resolve_sparse_impl("auto", AUTO_TILE_MIN_BLOCKS * 128, 128) == "xla"
  assert resolve_sparse_impl("auto", AUTO_TILE_MIN_BLOCKS * 128 - 127, 128) == "xla"
  assert resolve_sparse_impl("auto", AUTO_TILE_MIN_BLOCKS * 128 - 128, 128) == "blocked"
  assert resolve_sparse_impl("xla", 64, 128) == "xla"
  keys = jax.random.split(jax.random.key(3), 4)
  q, k, v = (jax.random.normal(keys[i], (2, 4, 37, 8)) for i in range(3))
  mask = jax.random.bernoulli(keys[3], 0.3, (2, 4, 37, 8))
  outs = {impl: sparse_dispatch(impl, q, k, v, mask, query_block=8)
          for impl in ("auto", "xla", "blocked")}
  for impl in ("auto", "blocked"):
    np.testing.assert_allclose(outs[impl], outs["xla"], rtol=1e-5, atol=1e-6)
  with pytest.raises(ConfigError, match="blocked"):
    sparse_dispatch("nope", q, k, v, mask, query_block=8)
