"""SEA's incremental decoding pieces (`sea_jax.sea.decode`) against the full-sequence ones: the
kept-key bound is never exceeded and is reached, the pair list is exactly the row's kept keys,
attention over it equals the sparse attention's row, the one-row top-k and the CNN's step
equal the sequence forms, and a whole SEA layer stepped token by token equals its forward."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_sea_pieces import make_rng, random_probs, randomize_params, ref_expand, rel_err
from sea_jax.attention import LayerKV
from sea_jax.config import AttentionShape
from sea_jax.config import SEAConfig
from sea_jax.ops import expand_mask, sparse_attention_reference
from sea_jax.sea import SEAAttention, grouped_topk_mask
from sea_jax.sea.decode import attend_kept, kept_key_bound, kept_pairs, to_left_padding, \
    to_right_padding
from sea_jax.sea.estimator import HISTORY_ROWS, MaskCNN, history_at
from sea_jax.sea.topk import grouped_topk_row


def kept_per_row(mask: np.ndarray) -> np.ndarray:
  """(N, T) kept (head, key) pairs per row of a compressed mask (N,H,T,K)."""
  return ref_expand(mask).sum(axis=(1, 3))


@pytest.mark.parametrize("H,T,K,k", [(3, 70, 8, 2), (4, 300, 16, 3), (2, 200, 64, 1)])
def test_kept_key_bound_holds_and_is_reached(H, T, K, k):
  """No row of any mask keeps more pairs than the bound; a mask that puts the budget on the
  widest bins reaches it."""
  rng, seed = make_rng()
  bound = kept_key_bound(T, H, K, k)
  for _ in range(3):
    mask = np.asarray(grouped_topk_mask(jnp.asarray(random_probs(rng, 2, H, T, K)), k))
    assert kept_per_row(mask).max() <= bound, seed
  # widest-first scores: wide bins (width ceil) first, so the top c_t cells are the widest
  t = np.arange(T)[:, None]
  b = np.arange(K)[None]
  starts = (2 * b * (t + 1) + K) // (2 * K)
  widths = (2 * (b + 1) * (t + 1) + K) // (2 * K) - starts
  probs = np.broadcast_to((widths + 1e-3 * rng.random((H, T, K)))[None], (1, H, T, K))
  mask = np.asarray(grouped_topk_mask(jnp.asarray(probs, jnp.float32), k))
  assert kept_per_row(mask).max() == bound, seed


@pytest.mark.parametrize("H,T,K,k", [(3, 45, 8, 2), (2, 130, 16, 5)])
def test_kept_pairs_are_exactly_the_rows_kept_keys(H, T, K, k):
  rng, seed = make_rng()
  mask = grouped_topk_mask(jnp.asarray(random_probs(rng, 2, H, T, K)), k)
  dense = np.asarray(expand_mask(mask, T))  # (N, H, T, T)
  bound = kept_key_bound(T, H, K, k)
  for t in rng.choice(T, 12, replace=False):
    ts = jnp.full((2,), t, jnp.int32)
    head, key, valid = (np.asarray(a) for a in kept_pairs(mask[:, :, t], ts, bound))
    for n in range(2):
      got = sorted(zip(head[n][valid[n]], key[n][valid[n]]))
      want = sorted(zip(*np.nonzero(dense[n, :, t])))
      assert got == want, (seed, t, n)
      assert len(set(got)) == len(got)


def test_one_row_topk_equals_the_sequence_topk():
  rng, seed = make_rng()
  N, H, T, K, k = 3, 4, 90, 16, 3
  probs = jnp.asarray(random_probs(rng, N, H, T, K))
  mask = np.asarray(grouped_topk_mask(probs, k))
  for t in (0, 5, 15, 16, 40, 89):
    ts = jnp.asarray([t, t, t], jnp.int32)
    got = np.asarray(grouped_topk_row(probs[:, :, t], ts, k))
    np.testing.assert_array_equal(got, mask[:, :, t], err_msg=f"seed {seed} row {t}")
  # different rows per batch element
  ts = jnp.asarray([3, 40, 77], jnp.int32)
  got = np.asarray(grouped_topk_row(probs[jnp.arange(N), :, ts], ts, k))
  np.testing.assert_array_equal(got, mask[np.arange(N), :, np.asarray(ts)])


def test_attention_over_kept_pairs_equals_the_sparse_row_with_left_padding():
  """Rows of different lengths in a left-padded cache (GQA, 4 query heads over 2 kv heads)."""
  rng, seed = make_rng()
  N, H, Hkv, T, d, K, k = 2, 4, 2, 61, 16, 16, 2
  q = jnp.asarray(rng.standard_normal((N, H, T, d)) * 0.5, jnp.float32)
  kk = jnp.asarray(rng.standard_normal((N, Hkv, T, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((N, Hkv, T, d)), jnp.float32)
  mask = grouped_topk_mask(jnp.asarray(random_probs(rng, N, H, T, K)), k)
  want = np.asarray(sparse_attention_reference(q, kk, v, mask))
  L = T + 9
  bound = kept_key_bound(L, H, K, k)
  offsets = jnp.asarray([9, 3], jnp.int32)  # left padding of each row in a cache of L slots
  k_cache = jnp.zeros((N, Hkv, L, d)).at[0, :, 9:].set(kk[0]).at[1, :, 3:T + 3].set(kk[1])
  v_cache = jnp.zeros((N, Hkv, L, d)).at[0, :, 9:].set(v[0]).at[1, :, 3:T + 3].set(v[1])
  for t in (0, 7, 16, 33, 60):
    ts = jnp.full((N,), t, jnp.int32)
    got = attend_kept(q[:, :, t], k_cache, v_cache, mask[:, :, t], ts, offsets, bound)
    assert rel_err(got, want[:, :, t]) < 1e-5, (seed, t)


def test_padding_shifts_are_inverse():
  rng, _ = make_rng()
  x = jnp.asarray(rng.standard_normal((3, 2, 11, 4)), jnp.float32)
  offsets = jnp.asarray([0, 4, 10], jnp.int32)
  right = to_right_padding(x, offsets)
  np.testing.assert_array_equal(np.asarray(right[1, :, :7]), np.asarray(x[1, :, 4:]))
  np.testing.assert_array_equal(np.asarray(to_left_padding(right, offsets)), np.asarray(x))


def test_cnn_steps_equal_the_sequence_cnn():
  rng, seed = make_rng()
  N, H, T, K = 2, 3, 23, 16
  cnn = MaskCNN(H, K, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  randomize_params(cnn, rng)
  x = jnp.asarray(rng.standard_normal((N, 2 * H, T, K // 4)), jnp.float32)
  want, (h0, h1) = cnn(x, return_history=True)
  start = 9  # the history a prefill of 9 rows hands over, then one row at a time
  lengths = jnp.full((N,), start, jnp.int32)
  history = (history_at(h0[:, :, :start], lengths, HISTORY_ROWS),
             history_at(h1[:, :, :start], lengths, HISTORY_ROWS))
  for t in range(start, T):
    got, history = cnn.step(x[:, :, t:t + 1], history)
    assert rel_err(got[:, :, 0], want[:, :, t]) < 1e-5, (seed, t)


@pytest.mark.parametrize("H,Hkv,K,k,pooled", [(4, 2, 16, 2, False), (2, 2, 8, 1, False),
                                              (4, 2, 16, 2, True)])
def test_sea_layer_prefill_then_steps_equal_its_forward(H, Hkv, K, k, pooled):
  """A SEA layer with random parameters: a prefill of 5 tokens (one row left-padded by 2), then
  one token per call, equals the full forward of each row at every position (fp32); with
  pooled keys (SEAConfig.pooled_keys) the step's scores come from the cache."""
  rng, seed = make_rng()
  N, T, d, P = 2, 40, 16, 5
  layer = SEAAttention(num_heads=H, head_dim=d, max_positions=64, K=K, k=k,
                       pooled_keys=pooled, rngs=nnx.Rngs(1))
  randomize_params(layer, rng)
  q = jnp.asarray(rng.standard_normal((N, H, T, d)) * 0.5, jnp.float32)
  kk = jnp.asarray(rng.standard_normal((N, Hkv, T, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((N, Hkv, T, d)), jnp.float32)
  want = np.asarray(nnx.jit(lambda layer, q, k, v: layer(q, k, v)[0])(layer, q, kk, v))
  pads = np.asarray([0, 2])  # row 1: two pad slots, then its tokens 0..
  shape = AttentionShape(num_heads=H, num_kv_heads=Hkv, head_dim=d, max_positions=64,
                         dtype=jnp.float32, param_dtype=jnp.float32,
                         sea=SEAConfig(K=K, k=k, pooled_keys=pooled))
  L = T  # row 0 fills every slot; row 1 ends 2 tokens short
  state = SEAAttention.decode_state(shape, N, L)
  k_cache, v_cache = jnp.zeros((N, Hkv, L, d)), jnp.zeros((N, Hkv, L, d))
  key_mask = np.zeros((N, L), bool)

  def slot_rows(x, s0, s1):  # tokens of each row for cache slots [s0, s1)
    out = np.zeros((N, x.shape[1], s1 - s0, d), np.float32)
    for n in range(N):
      for j, slot in enumerate(range(s0, s1)):
        if slot >= pads[n]:
          out[n, :, j] = np.asarray(x[n, :, slot - pads[n]])
    return jnp.asarray(out)

  step = nnx.jit(lambda layer, qn, kn, vn, cache: layer.cached(qn, kn, vn, cache))
  got = {n: [] for n in range(N)}
  for s0, s1 in [(0, P)] + [(s, s + 1) for s in range(P, L)]:
    key_mask[:, s0:s1] = np.arange(s0, s1)[None] >= pads[:, None]
    qn, kn, vn = slot_rows(q, s0, s1), slot_rows(kk, s0, s1), slot_rows(v, s0, s1)
    k_cache = jax.lax.dynamic_update_slice(k_cache, kn, (0, 0, s0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, vn, (0, 0, s0, 0))
    cache = LayerKV(k_cache, v_cache, jnp.asarray(key_mask), jnp.int32(s0), state)
    context, state = step(layer, qn, kn, vn, cache)
    for n in range(N):
      for j, slot in enumerate(range(s0, s1)):
        if slot >= pads[n]:
          got[n].append(np.asarray(context[n, :, j]))
  for n in range(N):
    rows = np.stack(got[n], axis=1)  # (H, positions, d)
    assert rel_err(rows, want[n, :, :rows.shape[1]]) < 1e-5, (seed, n)
