"""sea_jax.ops.blocked_attention: causal attention a block of query rows at a time, each block over
only the keys it can see, with a FlashAttention-style custom VJP. Checked against a float64
NumPy softmax (forward) and against float64 autodiff of the T x T reference (gradients), with
padding, SEA's compressed mask, grouped-query heads and T not a multiple of the block."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import relative_error
from sea_jax.ops.dense import dense_attention
from sea_jax.ops.blocked_attention import blocked_attention, causal_groups, expand_rows, pick_block
from sea_jax.ops.sparse import expand_mask


def _visible_np(N, H, T, key_mask=None, compressed=None):
  """(N, H, T, T) bool: causal, and padding, and SEA's kept keys (the spec's expansion)."""
  vis = np.broadcast_to(np.tril(np.ones((T, T), bool)), (N, H, T, T)).copy()
  if key_mask is not None:
    vis &= key_mask[:, None, None, :]
  if compressed is not None:
    vis &= np.asarray(expand_mask(jnp.asarray(compressed), T))
  return vis


def _attention_np(q, k, v, vis):
  """float64 softmax over the visible keys (rows that see nothing give zeros)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  G = q.shape[1] // k.shape[1]
  k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
  s = np.where(vis, q @ k.swapaxes(-1, -2), -np.inf)
  top = np.max(s, axis=-1, keepdims=True)
  e = np.where(vis, np.exp(s - np.where(np.isfinite(top), top, 0.0)), 0.0)
  total = e.sum(-1, keepdims=True)
  return (e / np.where(total > 0, total, 1.0)) @ v


def _inputs(rng, N, H, Hkv, T, d, K=None, pad=False):
  q = rng.standard_normal((N, H, T, d)).astype(np.float32) / np.sqrt(d)
  k = rng.standard_normal((N, Hkv, T, d)).astype(np.float32)
  v = rng.standard_normal((N, Hkv, T, d)).astype(np.float32)
  key_mask = None
  if pad:  # left padding of a random length per row, as a batched prompt has
    lengths = rng.integers(T // 2, T + 1, size=N)
    key_mask = np.arange(T)[None, :] >= (T - lengths)[:, None]
  compressed = None if K is None else rng.random((N, H, T, K)) < 0.4
  return q, k, v, key_mask, compressed


def test_causal_groups_cover_every_row_and_see_only_the_past():
  for T, B in [(1, 32), (37, 8), (512, 32), (513, 64), (4096, 256), (100, 128)]:
    groups = causal_groups(T, B)
    assert len(groups) <= 8
    covered = [b for first, n, _ in groups for b in range(first, first + n)]
    assert covered == list(range(-(-T // B)))
    for first, n, L in groups:
      assert L == min((first + n) * B, T)  # exactly the keys the group's last block sees


def test_pick_block_is_a_power_of_two_in_range():
  for rows, T, d in [(64, 512, 32), (1, 8, 64), (96, 32768, 128), (8, 100, 16)]:
    B = pick_block(rows, T, d)
    assert B & (B - 1) == 0 and B <= 256
    assert B <= max(32, 1 << (T - 1).bit_length())


@pytest.mark.parametrize("N,H,Hkv,T,d,B,K,pad", [
    (2, 4, 4, 50, 16, 16, None, False),   # T not a multiple of the block
    (1, 6, 2, 64, 8, 8, None, True),      # grouped-query heads, padding
    (2, 4, 2, 40, 16, 8, 8, True),        # SEA's mask with padding and GQA
    (1, 2, 2, 7, 8, 32, 4, False),        # T shorter than one block
])
def test_forward_matches_float64_softmax(rng, N, H, Hkv, T, d, B, K, pad):
  q, k, v, key_mask, compressed = _inputs(rng, N, H, Hkv, T, d, K, pad)
  got = blocked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                          key_mask=None if key_mask is None else jnp.asarray(key_mask),
                          compressed_mask=None if compressed is None else jnp.asarray(compressed),
                          block=B)
  want = _attention_np(q, k, v, _visible_np(N, H, T, key_mask, compressed))
  assert got.dtype == jnp.float32
  assert relative_error(got, want) < 2e-6


@pytest.mark.parametrize("lead", [(2, 3), (1, 1), (3, 5), (5, 9)])  # 8-, 16-, 32-bit words, 2 words
def test_expand_rows_equals_the_spec_expansion(rng, lead):
  T, K = 45, 8
  compressed = rng.random((*lead, T, K)) < 0.5
  rows = jnp.arange(T, dtype=jnp.int32)
  got = np.asarray(expand_rows(jnp.asarray(compressed), rows, T))
  t, s = np.arange(T)[:, None], np.arange(T)[None, :]
  bins = np.clip(((2 * s + 1) * K - 1) // (2 * (t + 1)), 0, K - 1)
  want = np.take_along_axis(compressed, np.broadcast_to(bins, (*lead, T, T)), axis=-1) & (s <= t)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got, np.asarray(expand_mask(jnp.asarray(compressed), T)))


@pytest.mark.parametrize("Hkv,K,pad", [(4, None, True), (2, 8, False)])
def test_gradients_match_float64_autodiff_of_the_reference(rng, Hkv, K, pad):
  N, H, T, d, B = 2, 4, 45, 8, 16
  q, k, v, key_mask, compressed = _inputs(rng, N, H, Hkv, T, d, K, pad)
  w = rng.standard_normal((N, H, T, d))
  vis = _visible_np(N, H, T, key_mask, compressed)

  def loss_blocked(q, k, v):
    out = blocked_attention(q, k, v, block=B,
                            key_mask=None if key_mask is None else jnp.asarray(key_mask),
                            compressed_mask=None if compressed is None else jnp.asarray(compressed))
    return jnp.sum(out * w.astype(np.float32))

  got = jax.grad(loss_blocked, argnums=(0, 1, 2))(*(jnp.asarray(x) for x in (q, k, v)))
  with jax.enable_x64(True):
    def loss_ref(q, k, v):
      G = H // Hkv
      kk, vv = jnp.repeat(k, G, axis=1), jnp.repeat(v, G, axis=1)
      s = jnp.where(vis, q @ kk.swapaxes(-1, -2), -1e300)
      p = jnp.where(vis, jax.nn.softmax(s, axis=-1), 0.0)
      return jnp.sum((p @ vv) * w)
    want = jax.grad(loss_ref, argnums=(0, 1, 2))(
        *(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
    want = [np.asarray(x) for x in want]
  for name, g, r in zip("qkv", got, want):
    assert relative_error(g, r) < 1e-5, name


def test_float64_inputs_accumulate_in_float64(rng):
  q, k, v, _, _ = _inputs(rng, 1, 2, 2, 33, 8)
  with jax.enable_x64(True):
    got = blocked_attention(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)), block=8)
    assert got.dtype == jnp.float64
    want = _attention_np(q, k, v, _visible_np(1, 2, 33))
    assert relative_error(got, want) < 1e-12


def test_bfloat16_inputs_stay_close_to_the_float32_reference(rng):
  q, k, v, _, _ = _inputs(rng, 2, 4, 4, 64, 16)
  bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
  got = blocked_attention(*bf, block=16)
  want = dense_attention(*bf)  # the same bf16 inputs through the T x T reference
  assert got.dtype == jnp.bfloat16
  assert relative_error(got, want) < 1e-2


def test_memory_grows_linearly_in_length():
  """Compiled fwd+bwd temp memory at T and 4T: a T x T score tensor per head would be 16x."""
  N, H, d, B = 1, 4, 32, 64

  def temp(T):
    shapes = [jax.ShapeDtypeStruct((N, H, T, d), jnp.float32)] * 3
    f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(blocked_attention(q, k, v, block=B)),
                         argnums=(0, 1, 2)))
    return f.lower(*shapes).compile().memory_analysis().temp_size_in_bytes

  small, large = temp(1024), temp(4096)
  print(f"temp bytes: T=1024 {small}, T=4096 {large}")
  assert large < 6 * small
  assert large < N * H * 4096 * 4096 * 4  # below one fp32 T x T score tensor


# --- splash attention (dense_impl="splash": TPU; interpreted here) -----------------------------


@pytest.mark.parametrize("Hkv", [4, 2])
def test_splash_attention_matches_float64_softmax_and_autodiff(rng, Hkv):
  """dense_attention_splash (interpreted off TPU) against the float64 softmax and the fp64
  autodiff of the T x T reference; T not a multiple of the 128 tile, grouped-query heads."""
  from sea_jax.ops.dense import dense_attention_splash
  N, H, T, d = 1, 4, 150, 32
  q, k, v, _, _ = _inputs(rng, N, H, Hkv, T, d)
  got = dense_attention_splash(*map(jnp.asarray, (q, k, v)))
  want = _attention_np(q, k, v, _visible_np(N, H, T))
  assert got.shape == (N, H, T, d) and got.dtype == jnp.float32
  assert relative_error(got, want) <= 1e-5
  w = rng.standard_normal((N, H, T, d))
  grads = jax.grad(lambda *a: jnp.sum(dense_attention_splash(*a) * w), (0, 1, 2))(
      *map(jnp.asarray, (q, k, v)))
  with jax.enable_x64():
    ref = jax.grad(lambda *a: jnp.sum(dense_attention(*a) * w), (0, 1, 2))(
        *(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
  for name, g, r in zip("qkv", grads, ref):
    assert g.shape == r.shape and relative_error(g, r) <= 1e-4, name


def test_dense_impl_splash_takes_the_chunked_path_for_padded_batches(rng):
  """Splash has no padding mask: with key_mask the seam runs blocked_attention instead."""
  from sea_jax.attention import DenseAttention
  from sea_jax.config import AttentionShape
  from sea_jax.config import SEAConfig
  shape = AttentionShape(num_heads=2, num_kv_heads=2, head_dim=16, max_positions=64,
                         dtype=jnp.float32, param_dtype=jnp.float32, sea=SEAConfig(),
                         dense_impl="splash")
  core = DenseAttention(shape, rngs=None)
  q, k, v, key_mask, _ = _inputs(rng, 2, 2, 2, 40, 16, pad=True)
  got, _ = core(*map(jnp.asarray, (q, k, v)), key_mask=jnp.asarray(key_mask))
  want = _attention_np(q, k, v, _visible_np(2, 2, 40, key_mask))
  real = key_mask[:, None, :, None]
  assert relative_error(np.where(real, got, 0), np.where(real, want, 0)) <= 1e-5
  unpadded, _ = core(*map(jnp.asarray, (q, k, v)))
  assert relative_error(unpadded, _attention_np(q, k, v, _visible_np(2, 2, 40))) <= 1e-5
