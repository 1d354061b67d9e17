"""SEA pieces against plain NumPy float64 references written here (SEA_SPEC §1).

Every test draws fresh random inputs; the seed is printed in assertion messages.
"""
from __future__ import annotations

import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import current_seed
from flax import nnx

from sea_jax.ops import (bin_bounds, bin_index, expand_mask, nonempty_bins, sparse_attention,
                         sparse_attention_reference, tile_ladder)
from sea_jax.ops.sparse import causal_visited_tiles
from sea_jax.sea import (Estimator, adaptive_avg_pool_matrix, causal_linear_attention,
                         grouped_topk_mask, masked_bin_softmax, num_random_features,
                         orthogonal_random_features, relu_features, row_budget)
from sea_jax.sea.topk import static_row_budget

# --- helpers ---------------------------------------------------------------------------------


def make_rng():
  """(generator, seed): the seed from the running test's name (`conftest.current_seed`)."""
  seed = current_seed()
  return np.random.default_rng(seed), seed


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


def f64(x) -> np.ndarray:
  return np.asarray(x, np.float64)


def randomize_params(module: nnx.Module, rng: np.random.Generator, scale: float = 0.3) -> None:
  """Adds N(0, scale²) noise to every nnx.Param (non-zero biases, non-trivial norms)."""
  state = nnx.state(module, nnx.Param)
  noisy = jax.tree.map(
      lambda x: x + jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), state)
  nnx.update(module, noisy)


# --- NumPy float64 references ----------------------------------------------------------------


def ref_bins(T: int, K: int) -> np.ndarray:
  """(T, T) int: bin_t(s) = floor((s + 0.5) K / (t + 1) - 1e-4) for s <= t, -1 above."""
  t = np.arange(T)[:, None].astype(np.float64)
  s = np.arange(T)[None, :].astype(np.float64)
  b = np.floor((s + 0.5) * K / (t + 1) - 1e-4).astype(np.int64)
  return np.where(s <= t, b, -1)


def ref_nonempty(T: int, K: int) -> np.ndarray:
  bins = ref_bins(T, K)
  ne = np.zeros((T, K), bool)
  for t in range(T):
    ne[t, bins[t, :t + 1]] = True
  return ne


def ref_budget(T: int, H: int, K: int, k: int) -> np.ndarray:
  return np.array([min(max(round(Fraction(H * k * K, t + 1)), 1), H * K) for t in range(T)])


def ref_topk(probs, k: int) -> np.ndarray:
  """Grouped top-k over heads per (n, t); ties to the lower flat index; empty bins excluded."""
  probs = f64(probs)
  N, H, T, K = probs.shape
  ne = ref_nonempty(T, K)
  budget = ref_budget(T, H, K, k)
  out = np.zeros((N, H, T, K), bool)
  for n in range(N):
    for t in range(T):
      cells = probs[n, :, t, :].reshape(-1)
      idx = np.flatnonzero(np.tile(ne[t], H))
      order = idx[np.lexsort((idx, -cells[idx]))]
      keep = np.zeros(H * K, bool)
      keep[order[:budget[t]]] = True
      out[n, :, t, :] = keep.reshape(H, K)
  return out


def ref_expand(mask) -> np.ndarray:
  mask = np.asarray(mask)
  T = mask.shape[2]
  bins = ref_bins(T, mask.shape[-1])
  dense = np.take_along_axis(mask, np.broadcast_to(np.maximum(bins, 0), mask.shape[:2] + (T, T)),
                             axis=-1)
  return dense & (bins >= 0)


def ref_masked_attention(q, k, v, dense_mask) -> np.ndarray:
  """Softmax over the kept keys of each row, times v; empty rows give zeros."""
  scores = np.einsum("nhtd,nhsd->nhts", f64(q), f64(k))
  scores = np.where(dense_mask, scores, -np.inf)
  top = np.max(scores, axis=-1, keepdims=True)
  top = np.where(np.isfinite(top), top, 0.0)
  p = np.where(dense_mask, np.exp(scores - top), 0.0)
  denom = p.sum(-1, keepdims=True)
  p = p / np.where(denom > 0, denom, 1.0)
  return np.einsum("nhts,nhsd->nhtd", p, f64(v))


def ref_features(x, W) -> np.ndarray:
  x, W = f64(x), f64(W)
  return np.maximum(x @ W.T * x.shape[-1] ** -0.25, 0.0) + 1e-3


def ref_linear_attention(phi_q, phi_k, v) -> np.ndarray:
  """Quadratic form: A = tril(φq φkᵀ); C = A v / (A 1 + 1e-6)."""
  A = np.einsum("...tm,...sm->...ts", f64(phi_q), f64(phi_k))
  A = np.tril(A)
  return (A @ f64(v)) / (A.sum(-1, keepdims=True) + 1e-6)


def ref_layernorm(x, g, b, eps=1e-5) -> np.ndarray:
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * f64(g) + f64(b)


def ref_gelu(x) -> np.ndarray:
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def ref_causal_conv(x, W, b, dilation=2) -> np.ndarray:
  """3×3 dilated conv: time padded (4, 0), width (2, 2); x (N,C,T,W), W (O,C,3,3)."""
  N, C, T, Wd = x.shape
  reach = 2 * dilation
  xp = np.pad(x, ((0, 0), (0, 0), (reach, 0), (dilation, dilation)))
  out = np.zeros((N, W.shape[0], T, Wd)) + f64(b)[:, None, None]
  for i in range(3):
    for j in range(3):
      window = xp[:, :, i * dilation:i * dilation + T, j * dilation:j * dilation + Wd]
      out += np.einsum("oc,nctw->notw", f64(W[:, :, i, j]), window)
  return out


def ref_adaptive_pool(x, n_out) -> np.ndarray:
  n_in = x.shape[-1]
  cols = []
  for i in range(n_out):
    start, end = math.floor(i * n_in / n_out), math.ceil((i + 1) * n_in / n_out)
    cols.append(x[..., start:end].mean(-1))
  return np.stack(cols, axis=-1)


def ref_estimator(est: Estimator, z_in):
  """Literal §1.2: encoder, row decoder, CNN a–g, gates. Returns (Ê, s_prob, s_mix)."""
  P = lambda v: f64(v[...])  # noqa: E731
  z_in = f64(z_in)
  N, H, T, _ = z_in.shape
  enc = est.encoder
  z = ref_gelu(ref_layernorm(z_in @ P(enc.linear.kernel) + P(enc.linear.bias), P(enc.norm.scale),
                             P(enc.norm.bias)))
  y = z @ P(est.decoder.linear.kernel) + P(est.decoder.linear.bias)
  K4 = y.shape[-1] // 2
  K = 4 * K4
  x = y.reshape(N, H, T, 2, K4).transpose(0, 1, 3, 2, 4).reshape(N, 2 * H, T, K4)
  cnn = est.cnn
  x = ref_layernorm(x, P(cnn.norm_in.scale), P(cnn.norm_in.bias))
  x = np.maximum(ref_causal_conv(x, P(cnn.conv1.kernel), P(cnn.conv1.bias)), 0.0)
  x = np.maximum(ref_causal_conv(x, P(cnn.conv2.kernel), P(cnn.conv2.bias)), 0.0)
  x = np.repeat(x, 4, axis=-1)
  x = np.pad(x, ((0, 0), (0, 0), (0, 0), (1, 1)))
  x = np.einsum("oc,nctw->notw", P(cnn.project.kernel), x) + P(cnn.project.bias)[:, None, None]
  x = ref_adaptive_pool(x, K)
  logits = ref_layernorm(x, P(cnn.norm_out.scale), P(cnn.norm_out.bias))
  g = z @ P(est.gates.kernel) + P(est.gates.bias)
  g = 1.0 / (1.0 + np.exp(-g))
  return logits, g[..., 0], g[..., 1]


def ref_bin_softmax(logits) -> np.ndarray:
  """Â of SEA_SPEC §1.2.5/§1.4 in float64: softmax over all K, empty bins then zeroed (no
  renormalisation over the non-empty bins)."""
  x = f64(logits)
  e = np.exp(x - x.max(-1, keepdims=True))
  return np.where(ref_nonempty(*x.shape[-2:]), e / e.sum(-1, keepdims=True), 0.0)


def random_probs(rng, N, H, T, K, scale=2.0) -> np.ndarray:
  return ref_bin_softmax(scale * rng.standard_normal((N, H, T, K))).astype(np.float32)


# --- bins --------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,K", [(5, 8), (8, 8), (37, 8), (64, 256), (300, 256), (100, 64),
                                 (257, 64)])
def test_bins_match_float_formula(T, K):
  want = ref_bins(T, K)
  t = np.arange(T)[:, None]
  s = np.arange(T)[None, :]
  got = np.asarray(bin_index(t, s, K))
  visible = s <= t
  assert np.array_equal(got[visible], want[visible])
  starts, ends = map(np.asarray, bin_bounds(T, K))
  for row in range(T):
    for b in np.unique(want[row, :row + 1]):
      keys = np.flatnonzero(want[row] == b)
      assert (starts[row, b], ends[row, b]) == (keys[0], keys[-1] + 1)
  assert np.array_equal(np.asarray(nonempty_bins(T, K)), ref_nonempty(T, K))


@pytest.mark.parametrize("K", [4, 64, 256, 1024])
def test_bin_index_is_the_exact_integer_quotient_at_long_context(K):
  """bin_index estimates the quotient in float32 and corrects it: exact up to 2M rows (or
  where (2s + 1) K leaves int32), far past where float32 alone holds (2s + 1) K."""
  rng, seed = make_rng()
  top = min(2 ** 21, 2 ** 30 // K)
  t = rng.integers(0, top, 200_000)
  t[:100] = top - 1  # the longest rows, where q * (2 (t + 1)) leaves int32
  s = (rng.random(t.shape) * (t + 1)).astype(np.int64)
  s[:1000] = t[:1000]  # the last key and the first of each row, where the quotient is largest
  s[1000:2000] = 0
  want = ((2 * s + 1) * K - 1) // (2 * (t + 1))
  assert np.array_equal(np.asarray(bin_index(t, s, K)), want), f"seed={seed}"


# --- budget and grouped top-k ------------------------------------------------------------------


@pytest.mark.parametrize("H,k,K,T", [(1, 1, 8, 40), (3, 5, 8, 40), (12, 64, 256, 300),
                                     (4, 7, 64, 200), (1, 3, 4, 20), (1, 5, 4, 20)])
def test_row_budget_exact(H, k, K, T):
  assert np.array_equal(np.asarray(row_budget(T, H, K, k)), ref_budget(T, H, K, k))


def test_row_budget_rounds_half_to_even():
  # H k K / (t+1) = 1.5 at t+1 = 8 (-> 2) and 2.5 at t+1 = 8 with k = 5 (-> 2).
  assert int(row_budget(8, 1, 4, 3)[7]) == 2
  assert int(row_budget(8, 1, 4, 5)[7]) == 2
  assert int(row_budget(8, 1, 4, 1)[7]) == 1  # 0.5 -> 0 -> clamped to 1


@pytest.mark.parametrize("N,H,T,K,k", [(2, 3, 37, 8, 2), (1, 4, 90, 64, 3), (1, 2, 70, 256, 5),
                                       (2, 2, 50, 16, 1)])
def test_grouped_topk_matches_reference(N, H, T, K, k):
  rng, seed = make_rng()
  probs = random_probs(rng, N, H, T, K)
  got = np.asarray(grouped_topk_mask(jnp.asarray(probs), k))
  assert np.array_equal(got, ref_topk(probs, k)), f"seed={seed}"
  traced = jax.jit(grouped_topk_mask)(jnp.asarray(probs), jnp.int32(k))
  assert np.array_equal(np.asarray(traced), got), f"seed={seed} (traced k)"


def test_grouped_topk_by_top_k_equals_the_sort_with_ties_over_many_octaves():
  """A Python-int k takes lax.top_k per octave of rows; a traced k the radix select: same mask,
  ties included (scores rounded to few levels), T spanning 11 octaves, budgets from H·K to 1."""
  rng, seed = make_rng()
  N, H, T, K, k = 2, 3, 1500, 32, 2
  probs = np.round(random_probs(rng, N, H, T, K) * 20) / 20
  by_top_k = jax.jit(lambda p: grouped_topk_mask(p, k))(jnp.asarray(probs))
  by_sort = jax.jit(grouped_topk_mask)(jnp.asarray(probs), jnp.int32(k))
  assert np.array_equal(np.asarray(by_top_k), np.asarray(by_sort)), f"seed={seed}"
  assert np.array_equal(np.asarray(by_top_k)[:, :, :300], ref_topk(probs[:, :, :300], k)), \
      f"seed={seed}"
  assert np.array_equal(static_row_budget(T, H, K, k), np.asarray(row_budget(T, H, K, k)))


@pytest.mark.parametrize("case", range(10))
def test_estimated_probs_are_not_renormalised_before_the_grouped_topk(case):
  # Rows with t + 1 < K have empty bins; heads whose logits put more weight there must not be
  # rescaled, or a different head wins the shared budget (SEA_SPEC §1.4).
  from sea_jax.sea import masked_bin_softmax
  rng, seed = make_rng()
  N, H, T, K, k = 2, 4, 24, 32, 2
  logits = (rng.standard_normal((N, H, T, K)) * rng.uniform(0.5, 3.0, (1, H, 1, 1))
            + rng.uniform(-2, 2, (1, H, 1, 1)) * np.arange(K) / K).astype(np.float32)
  want_p = ref_bin_softmax(logits)
  got_p = np.asarray(masked_bin_softmax(jnp.asarray(logits)))
  np.testing.assert_allclose(got_p, want_p, rtol=2e-6, atol=1e-9, err_msg=f"seed={seed}")
  got = np.asarray(grouped_topk_mask(jnp.asarray(got_p), k))
  assert np.array_equal(got, ref_topk(want_p.astype(np.float32), k)), f"seed={seed}"


def test_topk_ties_go_to_lower_index():
  probs = np.full((1, 2, 4, 4), 0.25, np.float32)  # t = 3: all 8 cells non-empty, all equal
  got = np.asarray(grouped_topk_mask(jnp.asarray(probs), 1))  # c_3 = round(2*1*4/4) = 2
  assert got[0, :, 3].reshape(-1).tolist() == [True, True] + [False] * 6


def test_heads_compete_for_one_budget():
  rng, seed = make_rng()
  N, H, T, K, k = 1, 4, 60, 16, 2
  probs = random_probs(rng, N, H, T, K)
  probs[:, 0] += 10.0  # head 0 dominates every row
  got = np.asarray(grouped_topk_mask(jnp.asarray(probs), k))
  ne = ref_nonempty(T, K)
  budget = ref_budget(T, H, K, k)
  per_row = got.sum(axis=(1, 3))[0]
  assert np.array_equal(per_row, np.minimum(budget, H * ne.sum(-1))), f"seed={seed}"
  head0 = got[0, 0].sum(-1)
  assert np.array_equal(head0, np.minimum(budget, ne.sum(-1))), f"seed={seed}"
  assert not got[0, 1:][:, budget <= ne.sum(-1)].any(), f"seed={seed}"


def test_empty_bins_never_kept():
  rng, seed = make_rng()
  N, H, T, K = 2, 3, 40, 64
  probs = rng.random((N, H, T, K)).astype(np.float32)
  ne = ref_nonempty(T, K)
  probs[:, :, ~ne] += 100.0  # unmasked mass on empty bins must not matter
  got = np.asarray(grouped_topk_mask(jnp.asarray(probs), 1))
  assert not got[:, :, ~ne].any(), f"seed={seed}"
  assert (got.sum(axis=(1, 3)) >= 1).all(), f"seed={seed}"


@pytest.mark.parametrize("T,K,k", [(50, 8, 6), (120, 64, 16), (300, 256, 64)])
def test_rows_within_k_are_dense(T, K, k):
  rng, seed = make_rng()
  probs = random_probs(rng, 1, 2, T, K)
  dense = np.asarray(expand_mask(grouped_topk_mask(jnp.asarray(probs), k), T))
  causal = np.tril(np.ones((T, T), bool))
  assert np.array_equal(dense[:, :, :k], np.broadcast_to(causal[:k], (1, 2, k, T))), f"seed={seed}"
  assert not dense[:, :, k:].all(), f"seed={seed}: rows beyond k should be sparse"


def test_k_at_least_t_keeps_every_visible_key():
  rng, seed = make_rng()
  T, K = 45, 16
  probs = random_probs(rng, 2, 3, T, K)
  dense = np.asarray(expand_mask(grouped_topk_mask(jnp.asarray(probs), T), T))
  assert np.array_equal(dense, np.broadcast_to(np.tril(np.ones((T, T), bool)), dense.shape)), \
      f"seed={seed}"


def test_k_below_one_is_an_error():
  probs = jnp.ones((1, 1, 4, 4)) / 4
  with pytest.raises(ValueError, match="k"):
    grouped_topk_mask(probs, 0)


@pytest.mark.parametrize("T,K", [(5, 8), (37, 8), (300, 256)])
def test_expand_mask_matches_reference(T, K):
  rng, seed = make_rng()
  mask = rng.random((2, 2, T, K)) < 0.3
  assert np.array_equal(np.asarray(expand_mask(jnp.asarray(mask), T)), ref_expand(mask)), \
      f"seed={seed}"


# --- sparse attention --------------------------------------------------------------------------


# "tiles" runs the tile list on every rung; the default hands the every-tile rung to
# blocked_attention (both must equal the reference).
SPARSE_OPS = {"tiles": functools.partial(sparse_attention, full_rung="tiles"),
              "default": sparse_attention, "reference": sparse_attention_reference}


@pytest.mark.parametrize("op", SPARSE_OPS)
@pytest.mark.parametrize("N,H,T,d,K,block", [(2, 3, 37, 16, 8, 16), (1, 2, 300, 64, 256, 128),
                                             (1, 2, 64, 32, 64, 64), (2, 1, 20, 8, 64, 128),
                                             (1, 2, 33, 80, 16, 1), (1, 3, 130, 16, 16, 32)])
def test_sparse_attention_matches_dense_reference(N, H, T, d, K, block, op):
  rng, seed = make_rng()
  q, k, v = (rng.standard_normal((N, H, T, d)).astype(np.float32) for _ in range(3))
  q *= d ** -0.5
  mask = rng.random((N, H, T, K)) < 0.3
  mask[:, :, ::5] = False  # rows with nothing kept
  mask[:, -1, 7] = True    # and a dense one
  got = np.asarray(SPARSE_OPS[op](*map(jnp.asarray, (q, k, v, mask)), query_block=block))
  want = ref_masked_attention(q, k, v, ref_expand(mask))
  assert got.dtype == np.float32
  assert rel_err(got, want) <= 1e-5, f"seed={seed}: rel err {rel_err(got, want)}"
  empty = ~ref_expand(mask).any(-1)
  assert empty.any() and (got[empty] == 0).all(), f"seed={seed}"


@pytest.mark.parametrize("op", SPARSE_OPS)
def test_sparse_attention_gradients_match_dense(op):
  rng, seed = make_rng()
  N, H, T, d, K = 1, 2, 45, 16, 8
  q, k, v, w = (jnp.asarray(rng.standard_normal((N, H, T, d)), jnp.float32) for _ in range(4))
  mask = jnp.asarray(rng.random((N, H, T, K)) < 0.4)
  dense = jnp.asarray(ref_expand(np.asarray(mask)))

  def dense_attn(q, k, v):
    s = jnp.where(dense, jnp.einsum("nhtd,nhsd->nhts", q, k), -jnp.inf)
    p = jnp.where(dense, jax.nn.softmax(s, axis=-1), 0.0)
    p = jnp.nan_to_num(p)
    return jnp.einsum("nhts,nhsd->nhtd", p, v)

  loss = lambda f: lambda *a: jnp.sum(f(*a) * w)  # noqa: E731
  got = jax.grad(loss(lambda *a: SPARSE_OPS[op](*a, mask, query_block=16)), (0, 1, 2))(q, k, v)
  want = jax.grad(loss(dense_attn), (0, 1, 2))(q, k, v)
  for name, g, r in zip("qkv", got, want):
    assert rel_err(g, r) <= 1e-5, f"seed={seed}: d{name} rel err {rel_err(g, r)}"


def test_sparse_attention_visits_only_tiles_with_kept_keys_and_any_rung_is_exact():
  """The tile list holds exactly the causal tiles with a kept key; a ladder whose low rungs are
  too small falls through to one that fits, and every rung that fits gives the same output."""
  rng, seed = make_rng()
  N, H, T, d, K, B = 1, 4, 200, 16, 64, 32
  q, k, v = (jnp.asarray(rng.standard_normal((N, H, T, d)), jnp.float32) for _ in range(3))
  probs = jax.nn.softmax(jnp.asarray(rng.standard_normal((N, H, T, K)) * 3, jnp.float32), -1)
  mask = grouped_topk_mask(masked_bin_softmax(jnp.log(probs)), 2)  # heads compete, t + 1 < K too
  visited = np.asarray(causal_visited_tiles(mask, B))
  dense = ref_expand(np.asarray(mask))
  nb = -(-T // B)
  pad = np.zeros((N, H, nb * B, nb * B), bool)
  pad[:, :, :T, :T] = dense
  want_tiles = pad.reshape(N, H, nb, B, nb, B).any(axis=(3, 5))
  assert np.array_equal(visited, want_tiles), f"seed={seed}"
  n_visited = int(visited.sum())
  total = N * H * nb * (nb + 1) // 2
  assert 0 < n_visited < total, f"seed={seed}"
  want = ref_masked_attention(*(np.asarray(x) for x in (q, k, v)), dense)
  for caps in ((1, 2, total), (n_visited, total), (n_visited - 1, n_visited + 3, total), (total,)):
    for full_rung in ("tiles", "blocked"):
      got = sparse_attention(q, k, v, mask, query_block=B, capacities=caps, full_rung=full_rung)
      assert rel_err(got, want) <= 1e-5, f"seed={seed} capacities={caps} {full_rung}"
  with pytest.raises(ValueError, match="every causal tile"):
    sparse_attention(q, k, v, mask, query_block=B, capacities=(n_visited,))


def test_tile_ladder_ends_with_every_causal_tile():
  caps = tile_ladder(12, 32)
  assert caps[-1] == 12 * 32 * 33 // 2 and list(caps) == sorted(set(caps))
  assert caps[0] <= caps[-1] / 16 / 0.5 and len(caps) <= 6
  assert tile_ladder(64, 4) == (64 * 10,)


@pytest.mark.parametrize("rungs", ["one", "tiles of two", "blocked of two"])
def test_sparse_attention_bf16(rungs):
  # With two rungs lax.switch joins the tile list (fp32 accumulators) and blocked_attention:
  # both must give bf16 (a GPU run on 2026-12-06 found them differing at T = 2048).
  rng, seed = make_rng()
  N, H, T, d, K = 1, 2, 70, 32, 16
  q, k, v = (rng.standard_normal((N, H, T, d)).astype(np.float32) for _ in range(3))
  mask = rng.random((N, H, T, K)) < 0.5
  every = N * H * 3 * 4 // 2   # causal 32 x 32 tiles of 70 rows
  caps = {"one": None, "tiles of two": (every, every), "blocked of two": (1, every)}[rungs]
  args = [jnp.asarray(x, jnp.bfloat16) for x in (q * d ** -0.5, k, v)]
  attend = lambda q, k, v: sparse_attention(q, k, v, jnp.asarray(mask), query_block=32,
                                            capacities=caps)
  got = attend(*args)
  assert got.dtype == jnp.bfloat16
  want = ref_masked_attention(*(np.asarray(a, np.float32) for a in args), ref_expand(mask))
  assert rel_err(got, want) <= 2e-2, f"seed={seed}"
  grads = jax.grad(lambda *a: jnp.sum(attend(*a).astype(jnp.float32) ** 2), (0, 1, 2))(*args)
  assert all(g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()
             for g in grads)


# --- Performer branch --------------------------------------------------------------------------


def test_num_random_features():
  assert num_random_features(64) == 33
  assert num_random_features(80) == 43
  assert num_random_features(64, nbf=4) == int(64 * math.log(64) / 4)


@pytest.mark.parametrize("m,d", [(33, 64), (43, 80), (20, 8)])
def test_orthogonal_random_features(m, d):
  _, seed = make_rng()
  W = np.asarray(orthogonal_random_features(jax.random.key(seed), m, d), np.float64)
  assert W.shape == (m, d) and np.isfinite(W).all()
  unit = W / np.linalg.norm(W, axis=1, keepdims=True)
  for start in range(0, m, d):
    block = unit[start:start + d]
    gram = block @ block.T
    assert np.abs(gram - np.eye(len(block))).max() < 1e-4, f"seed={seed}"
  norms = np.linalg.norm(W, axis=1)  # chi-distributed lengths, mean ~ sqrt(d)
  assert norms.std() > 0 and abs(norms.mean() / math.sqrt(d) - 1) < 0.5, f"seed={seed}"


@pytest.mark.parametrize("T,chunk", [(50, 16), (64, 64), (7, 128), (33, 1)])
def test_causal_linear_attention_matches_quadratic_form(T, chunk):
  rng, seed = make_rng()
  N, H, d, m = 2, 3, 16, 11
  x_q, x_k = (rng.standard_normal((N, H, T, d)).astype(np.float32) for _ in range(2))
  v = rng.standard_normal((N, H, T, 2 * d)).astype(np.float32)
  W = rng.standard_normal((m, d)).astype(np.float32)
  phi_q, phi_k = relu_features(jnp.asarray(x_q), W), relu_features(jnp.asarray(x_k), W)
  assert rel_err(phi_q, ref_features(x_q, W)) <= 1e-6, f"seed={seed}"
  got = causal_linear_attention(phi_q, phi_k, jnp.asarray(v), chunk)
  want = ref_linear_attention(ref_features(x_q, W), ref_features(x_k, W), v)
  assert got.dtype == jnp.float32 and got.shape == (N, H, T, 2 * d)
  assert rel_err(got, want) <= 1e-5, f"seed={seed}: rel err {rel_err(got, want)}"


def test_causal_linear_attention_gradients():
  rng, seed = make_rng()
  T, m, e = 30, 5, 4
  phi_q, phi_k = (jnp.asarray(rng.random((1, T, m)) + 0.1, jnp.float32) for _ in range(2))
  v, w = (jnp.asarray(rng.standard_normal((1, T, e)), jnp.float32) for _ in range(2))

  def quadratic(fq, fk, v):
    A = jnp.tril(fq @ jnp.swapaxes(fk, -1, -2))
    return (A @ v) / (A.sum(-1, keepdims=True) + 1e-6)

  got = jax.grad(lambda *a: jnp.sum(causal_linear_attention(*a, 8) * w), (0, 1, 2))(phi_q, phi_k, v)
  want = jax.grad(lambda *a: jnp.sum(quadratic(*a) * w), (0, 1, 2))(phi_q, phi_k, v)
  for g, r in zip(got, want):
    assert rel_err(g, r) <= 1e-5, f"seed={seed}"


# --- estimator ---------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [8, 64, 256])
def test_adaptive_pool_matrix(K):
  rng, seed = make_rng()
  x = rng.standard_normal((3, K + 2))
  got = x @ adaptive_avg_pool_matrix(K + 2, K).astype(np.float64)
  assert np.allclose(got, ref_adaptive_pool(x, K), rtol=1e-6, atol=1e-6), f"seed={seed}"


@pytest.mark.parametrize("N,H,T,d,K", [(2, 3, 30, 16, 8), (1, 2, 40, 16, 64), (1, 2, 20, 8, 256)])
def test_estimator_matches_reference(N, H, T, d, K):
  rng, seed = make_rng()
  est = Estimator(d, H, K, rngs=nnx.Rngs(seed))
  randomize_params(est, rng)
  z_in = rng.standard_normal((N, H, T, 3 * d)).astype(np.float32)
  logits, s_prob, s_mix = nnx.jit(lambda est, z: est(z))(est, jnp.asarray(z_in))
  want = ref_estimator(est, z_in)
  assert logits.shape == (N, H, T, K) and logits.dtype == jnp.float32
  for name, g, r in zip(("logits", "s_prob", "s_mix"), (logits, s_prob, s_mix), want):
    assert rel_err(g, r) <= 1e-4, f"seed={seed}: {name} rel err {rel_err(g, r)}"


def test_sparse_attention_gradients_stay_finite_when_dropped_scores_dwarf_kept_ones():
  """Scores of dropped keys far above the kept ones must not overflow into NaN gradients."""
  from sea_jax.ops import sparse_attention as sparse
  T, d, K = 16, 4, 4
  k = jnp.zeros((1, 1, T, d)).at[..., 0].set(jnp.arange(T, dtype=jnp.float32))
  q = jnp.zeros((1, 1, T, d)).at[..., 0].set(200.0)  # score = 200 s: later keys dominate
  v = jnp.ones((1, 1, T, d))
  mask = jnp.zeros((1, 1, T, K), bool).at[..., 0].set(True)  # keep only the first bin
  grads = jax.grad(lambda q, k, v: sparse(q, k, v, mask, query_block=8).sum(), argnums=(0, 1, 2))(q, k, v)
  assert all(bool(jnp.isfinite(g).all()) for g in grads)
