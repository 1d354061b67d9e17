"""pallas_kernels: block map vs brute force, kernels vs a float64 NumPy dense reference.

TestSparseAttentionKernel runs the compiled kernels and skips without a GPU;
TestSparseAttentionKernelInterpret flips one flag and runs them in the Pallas interpreter
on CPU. Fresh random inputs every run; the seed is in every failure message.
"""
from __future__ import annotations


import numpy as np
import pytest
from conftest import seed_of

import jax
import jax.numpy as jnp

from sea_jax.ops import block_map as bm_lib
from pallas_kernels import gpu as gpu_lib
from pallas_kernels import BlockSizes, build_block_map, sparse_attention
from pallas_kernels.sparse_attention import resolve_backend

SEED = seed_of("test_pallas_sparse")
print(f"test_pallas_sparse seed: {SEED}")
# (forward, gradient) relative tolerances. bf16 gradients: P and dS are rounded to bf16
# (2^-8 relative) before the dq/dk/dv matmuls, as in flash attention, and dS = P (dP - delta)
# cancels, so 1e-2 held for most seeds only (seed 1469292953 gives dk 1.17e-2, the same
# bits before and after the GQA change); 2e-2 is what the XLA comparison below uses.
TOL = {np.dtype(np.float32): (1e-5, 1e-4), jnp.dtype(jnp.bfloat16): (1e-2, 2e-2)}


def _rng(*salt) -> np.random.Generator:
  return np.random.default_rng([SEED, *salt])


# ---------------------------------------------------------------- NumPy reference and masks

def np_bins(T: int, K: int) -> np.ndarray:
  """(T, T) int64 bin_t(s) = ((2s+1)K - 1) // (2(t+1)), clamped to 0 where s > t."""
  t = np.arange(T)[:, None]
  s = np.arange(T)[None, :]
  return np.where(s <= t, ((2 * s + 1) * K - 1) // (2 * (t + 1)), 0)


def np_dense_mask(cm: np.ndarray) -> np.ndarray:
  """(N,H,T,K) bool -> (N,H,T,T) bool."""
  T, K = cm.shape[2:]
  bins = np_bins(T, K)
  dense = np.take_along_axis(cm, np.broadcast_to(bins, (*cm.shape[:2], T, T)), axis=-1)
  return dense & np.tril(np.ones((T, T), bool))


def np_reference(q, k, v, cm, g):
  """float64 (out, dq, dk, dv) of masked softmax attention with cotangent g."""
  q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
  mask = np_dense_mask(np.asarray(cm))
  s = np.einsum("nhtd,nhsd->nhts", q, k)
  s = np.where(mask, s, -np.inf)
  m = np.max(s, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.where(mask, np.exp(s - m), 0.0)
  l = p.sum(-1, keepdims=True)
  p = p / np.where(l > 0, l, 1.0)
  out = p @ v
  dv = np.swapaxes(p, -1, -2) @ g
  dp = g @ np.swapaxes(v, -1, -2)
  ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
  return out, ds @ k, np.swapaxes(ds, -1, -2) @ q, dv


def random_mask(rng, N, H, T, K, density=0.3):
  cm = rng.random((N, H, T, K)) < density
  return _special_rows(rng, cm)


def sea_like_mask(rng, N, H, T, K, k=2):
  """Like the SEA layer: smooth logits over (t, bin) -> grouped top-k across heads with
  budget c_t = round(H k K / (t+1)) in [1, H K]; only non-empty bins are kept."""
  steps = rng.standard_normal((N, H, T, K)) * 0.3
  logits = np.cumsum(steps, axis=2) + rng.standard_normal((N, H, 1, K)) * 2.0
  t = np.arange(T)
  budget = np.clip(np.rint(H * k * K / (t + 1)), 1, H * K).astype(int)
  starts = (2 * np.arange(K + 1)[None, :] * (t[:, None] + 1) + K) // (2 * K)
  nonempty = starts[:, 1:] > starts[:, :-1]                       # (T, K)
  score = np.where(nonempty[None, None], logits, -np.inf)
  score = score.transpose(0, 2, 1, 3).reshape(N, T, H * K)
  rank = np.argsort(np.argsort(-score, axis=-1, kind="stable"), axis=-1, kind="stable")
  keep = (rank < budget[None, :, None]).reshape(N, T, H, K).transpose(0, 2, 1, 3)
  return _special_rows(rng, keep & nonempty[None, None])


def _special_rows(rng, cm):
  """Force a few rows to keep nothing and a few to keep everything."""
  cm = cm.copy()
  T = cm.shape[2]
  for n in range(cm.shape[0]):
    for h in range(cm.shape[1]):
      rows = rng.choice(T, size=min(4, T), replace=False)
      cm[n, h, rows[:2]] = False
      cm[n, h, rows[2:]] = True
  return cm


def make_inputs(rng, N, H, T, d, K, dtype, mask="random"):
  def x(scale=1.0):
    return jnp.asarray(rng.standard_normal((N, H, T, d)) * scale, dtype)
  q, k, v, g = x(2.0 * d**-0.5), x(), x(), x()
  cm = (random_mask if mask == "random" else sea_like_mask)(rng, N, H, T, K)
  return q, k, v, jnp.asarray(cm), g


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def assert_close(got, want, tol, what):
  err = rel_err(got, want)
  assert err <= tol, f"{what}: relative error {err:.3g} > {tol} (seed {SEED})"


# ---------------------------------------------------------------- block map (no kernels)

def brute_force_tiles(cm: np.ndarray, bq: int, bk: int) -> np.ndarray:
  dense = np_dense_mask(cm)
  N, H, T, _ = dense.shape
  nq, nk = -(-T // bq), -(-T // bk)
  padded = np.zeros((N, H, nq * bq, nk * bk), bool)
  padded[:, :, :T, :T] = dense
  return padded.reshape(N, H, nq, bq, nk, bk).any(axis=(3, 5))


def check_visit_lists(visits, counts, visited, what):
  visits, counts = np.asarray(visits), np.asarray(counts)
  for idx in np.ndindex(*visited.shape[:-1]):
    want = np.flatnonzero(visited[idx])
    c = counts[idx]
    assert c == len(want), f"{what}{idx}: count {c} != {len(want)} (seed {SEED})"
    np.testing.assert_array_equal(visits[idx][:c], want, err_msg=f"{what}{idx} seed {SEED}")
    pad = want[-1] if len(want) else 0
    assert np.all(visits[idx][c:] == pad), f"{what}{idx}: bad padding (seed {SEED})"


@pytest.mark.parametrize("T,K,bq,bk,mask", [
    (40, 8, 16, 16, "random"), (64, 16, 16, 16, "sea"), (100, 16, 16, 32, "sea"),
    (100, 8, 32, 16, "random"), (7, 16, 16, 16, "random"), (130, 64, 16, 64, "sea"),
])
def test_block_map_vs_brute_force(T, K, bq, bk, mask):
  rng = _rng(1, T, K, bq, bk)
  cm = (random_mask if mask == "random" else sea_like_mask)(rng, 2, 3, T, K)
  bmap = jax.jit(build_block_map, static_argnames=("block_q", "block_k"))(
      jnp.asarray(cm), block_q=bq, block_k=bk)
  want = brute_force_tiles(cm, bq, bk)
  check_visit_lists(bmap.q_visits, bmap.q_counts, want, "q_visits")
  check_visit_lists(bmap.k_visits, bmap.k_counts, np.swapaxes(want, -1, -2), "k_visits")
  frac = float(bmap.visited_fraction())
  assert abs(frac - want.mean()) < 1e-6, (frac, want.mean(), SEED)


def test_block_map_empty_and_full():
  T, K = 48, 8
  empty = build_block_map(jnp.zeros((1, 2, T, K), bool), block_q=16, block_k=16)
  assert int(empty.q_counts.sum()) == 0 and int(empty.k_counts.sum()) == 0
  assert int(np.abs(np.asarray(empty.q_visits)).sum()) == 0
  full = build_block_map(jnp.ones((1, 2, T, K), bool), block_q=16, block_k=16)
  np.testing.assert_array_equal(np.asarray(full.q_counts)[0, 0], [1, 2, 3])   # causal tiles
  np.testing.assert_array_equal(np.asarray(full.k_counts)[0, 0], [3, 2, 1])
  assert float(full.visited_fraction(causal_tiles=True)) == 1.0


def test_bin_index_matches_spec():
  from sea_jax.ops.bins import bin_index
  for T, K in [(40, 8), (100, 16), (300, 256)]:
    t = jnp.arange(T)[:, None]
    s = jnp.arange(T)[None, :]
    causal = np.asarray(s <= t)
    got = np.asarray(bm_lib.bin_index_nonneg(t, s, K))
    np.testing.assert_array_equal(got[causal], np.asarray(bin_index(t, s, K))[causal])
    np.testing.assert_array_equal(got[causal], np_bins(T, K)[causal])
    rows, bins, c = bm_lib.tile_bins(jnp.int32(32), jnp.int32(16), 16, 16, K)
    assert int(np.max(np.asarray(bins))) < K and np.asarray(rows)[3, 0] == 35


# ---------------------------------------------------------------- validation and dispatch

def test_block_sizes_validation():
  BlockSizes(16, 32)
  for bad in [dict(block_q=8), dict(block_k=48), dict(block_q=0), dict(num_warps=0),
              dict(num_stages=0)]:
    with pytest.raises(ValueError):
      BlockSizes(**bad)


def test_shape_checks_name_shapes():
  q = jnp.zeros((1, 2, 16, 64), jnp.float32)
  cm = jnp.zeros((1, 2, 16, 8), bool)
  with pytest.raises(ValueError, match=r"k.shape=\(1, 2, 17, 64\)"):
    sparse_attention(q, jnp.zeros((1, 2, 17, 64)), q, cm, interpret=True)
  with pytest.raises(ValueError, match=r"compressed_mask.shape=\(1, 2, 15, 8\)"):
    sparse_attention(q, q, q, cm[:, :, :15], interpret=True)
  with pytest.raises(ValueError, match="bool"):
    sparse_attention(q, q, q, cm.astype(jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="dtype"):
    sparse_attention(q, q, q.astype(jnp.bfloat16), cm, interpret=True)


def test_backend_resolution():
  assert resolve_backend("gpu", False) == "gpu"
  with pytest.raises(ValueError):
    resolve_backend("cuda", False)
  if jax.default_backend() == "cpu":
    assert resolve_backend(None, True) == "gpu"
    with pytest.raises(ValueError, match="interpret=True"):
      resolve_backend(None, False)


def test_tpu_backend_missing_is_clear(monkeypatch):
  import sys
  import pallas_kernels
  monkeypatch.setitem(sys.modules, "pallas_kernels.tpu", None)   # import now fails
  monkeypatch.delattr(pallas_kernels, "tpu", raising=False)  # even after another test imported it
  q = jnp.zeros((1, 1, 19, 16), jnp.float32)
  with pytest.raises(ImportError, match="tpu.py"):
    sparse_attention(q, q, q, jnp.ones((1, 1, 19, 4), bool), backend="tpu", interpret=True)


@pytest.mark.parametrize("dtype,d,H,Hkv", [(np.float32, 80, 2, 2), (jnp.bfloat16, 64, 2, 2),
                                           (jnp.bfloat16, 64, 4, 2)])
def test_triton_lowering_without_gpu(dtype, d, H, Hkv):
  """Forward + dq + dk/dv lower to Triton IR (cross-platform lowering; no GPU needed), also
  with grouped-query k, v (Hkv < H)."""
  q = jax.ShapeDtypeStruct((1, H, 100, d), dtype)
  kv = jax.ShapeDtypeStruct((1, Hkv, 100, d), dtype)
  cm = jax.ShapeDtypeStruct((1, H, 100, 16), jnp.bool_)

  def fwd_bwd(q, k, v, cm):
    out, vjp = jax.vjp(lambda q, k, v: sparse_attention(
        q, k, v, cm, backend="gpu", block_sizes=BlockSizes(32, 16)), q, k, v)
    return out, vjp(out)

  try:
    lowered = jax.jit(fwd_bwd).trace(q, kv, kv, cm).lower(lowering_platforms=("cuda",))
  except (TypeError, NotImplementedError) as e:
    if "lowering_platforms" in str(e) or "cuda" in str(e).lower():
      pytest.skip(f"cross-platform lowering unavailable here: {e}")
    raise
  text = lowered.as_text()
  for name in ("sea_sparse_attention_fwd", "sea_sparse_attention_dq",
               "sea_sparse_attention_dkdv"):
    assert name in text, f"{name} missing from the lowered module"


# ---------------------------------------------------------------- kernels

FP32, BF16 = np.dtype(np.float32), jnp.dtype(jnp.bfloat16)
# (N, H, T, d, K, dtype, mask, block_q, block_k)
CASES = [
    (1, 2, 40, 64, 8, FP32, "random", 16, 16),
    (2, 3, 64, 80, 16, FP32, "sea", 16, 16),
    (1, 2, 100, 64, 16, FP32, "sea", 16, 32),
    (1, 2, 64, 64, 8, BF16, "sea", 16, 16),
]


def _case_id(c):
  return f"N{c[0]}H{c[1]}T{c[2]}d{c[3]}K{c[4]}-{jnp.dtype(c[5]).name}-{c[6]}-b{c[7]}x{c[8]}"


class TestSparseAttentionKernel:
  """Compiled kernels (GPU only)."""
  interpret = False

  @pytest.fixture(autouse=True)
  def _needs_device(self):
    if not self.interpret and jax.default_backend() != "gpu":
      pytest.skip("compiled Triton kernels need a GPU; the Interpret subclass runs on CPU")

  def _call_kernels(self, q, k, v, cm, g, bs):
    """Poisoned kernel-level call: pad T like the op, outputs prefilled with NaN."""
    T = q.shape[2]
    mult = max(bs.block_q, bs.block_k)
    Tp = -(-T // mult) * mult
    pad = ((0, 0), (0, 0), (0, Tp - T), (0, 0))
    qp, kp, vp, gp, cmp_ = (jnp.pad(x, pad) for x in (q, k, v, g, cm))
    bmap = build_block_map(cmp_, block_q=bs.block_q, block_k=bs.block_k)
    out, lse = gpu_lib.forward(qp, kp, vp, cmp_, bmap, block_sizes=bs,
                               interpret=self.interpret, poison=True)
    grads = gpu_lib.backward(qp, kp, vp, cmp_, bmap, out, lse, gp, block_sizes=bs,
                             interpret=self.interpret, poison=True)
    for name, x in [("out", out), ("lse", lse), ("dq", grads[0]), ("dk", grads[1]),
                    ("dv", grads[2])]:
      assert not np.any(np.isnan(np.asarray(x, np.float32))), \
          f"{name}: unwritten (NaN) elements (seed {SEED})"
    lse = np.asarray(lse)[:, :, :T]
    return (out[:, :, :T], *(x[:, :, :T] for x in grads)), lse

  @pytest.mark.parametrize("case", CASES, ids=_case_id)
  def test_kernels_vs_numpy(self, case):
    N, H, T, d, K, dtype, mask, bq, bk = case
    rng = _rng(2, *case[:5], bq, bk)
    q, k, v, cm, g = make_inputs(rng, N, H, T, d, K, dtype, mask)
    bs = BlockSizes(bq, bk)
    (out, dq, dk, dv), lse = self._call_kernels(q, k, v, cm, g, bs)
    want = np_reference(q, k, v, cm, g)
    ftol, gtol = TOL[jnp.dtype(dtype)]
    assert out.dtype == dtype and dq.dtype == dtype
    assert_close(out, want[0], ftol, f"out {_case_id(case)}")
    for name, got, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), want[1:]):
      assert_close(got, ref, gtol, f"{name} {_case_id(case)}")
    empty = ~np.asarray(cm).any(-1)
    assert np.all(np.asarray(out, np.float32)[empty] == 0.0), f"empty rows not 0 (seed {SEED})"
    assert np.all(np.isposinf(lse[empty])), f"empty rows need lse=+inf (seed {SEED})"

  @pytest.mark.parametrize("case", [CASES[2], CASES[3]], ids=_case_id)
  def test_public_op_and_grad(self, case):
    """Through sparse_attention + jax.vjp (padding, custom_vjp, jit)."""
    N, H, T, d, K, dtype, mask, bq, bk = case
    rng = _rng(3, *case[:5], bq, bk)
    q, k, v, cm, g = make_inputs(rng, N, H, T, d, K, dtype, mask)
    bs = BlockSizes(bq, bk)
    f = lambda q, k, v: sparse_attention(q, k, v, cm, interpret=self.interpret,
                                         block_sizes=bs)
    out, vjp = jax.vjp(f, q, k, v)
    grads = vjp(g)
    want = np_reference(q, k, v, cm, g)
    ftol, gtol = TOL[jnp.dtype(dtype)]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, want[0], ftol, "out")
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want[1:]):
      assert got.dtype == dtype
      assert_close(got, ref, gtol, name)
    try:
      from sea_jax.ops import sparse_attention as xla_sparse_attention
    except ImportError as e:
      pytest.skip(f"sea_jax.ops.sparse_attention not importable ({e}); NumPy check passed")
    other = xla_sparse_attention(q, k, v, cm, query_block=32)
    assert_close(out, other, ftol if dtype == FP32 else 2e-2, "vs sea_jax.ops.sparse_attention")

  def test_nothing_kept(self):
    rng = _rng(4)
    q, k, v, _, g = make_inputs(rng, 1, 2, 40, 64, 8, np.float32)
    cm = jnp.zeros((1, 2, 40, 8), bool)
    f = lambda q, k, v: sparse_attention(q, k, v, cm, interpret=self.interpret,
                                         block_sizes=BlockSizes(16, 16))
    out, vjp = jax.vjp(f, q, k, v)
    assert np.all(np.asarray(out) == 0.0)
    for x in vjp(g):
      assert np.all(np.asarray(x) == 0.0)

  def test_default_blocks_long(self):
    """Default 64x64 tiles at a longer T (GPU only: too slow to interpret)."""
    if self.interpret:
      pytest.skip("long sequence: compiled GPU run only")
    rng = _rng(5)
    q, k, v, cm, g = make_inputs(rng, 1, 4, 1000, 64, 64, np.float32, "sea")
    out, vjp = jax.vjp(lambda q, k, v: sparse_attention(q, k, v, cm), q, k, v)
    want = np_reference(q, k, v, cm, g)
    assert_close(out, want[0], 1e-5, "out")
    for name, got, ref in zip(("dq", "dk", "dv"), vjp(g), want[1:]):
      assert_close(got, ref, 1e-4, name)


class TestSparseAttentionKernelInterpret(TestSparseAttentionKernel):
  """Same tests through the Pallas interpreter (CPU)."""
  interpret = True
