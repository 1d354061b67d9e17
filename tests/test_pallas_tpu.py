"""TPU (Mosaic) SEA sparse-attention kernels, in TPU interpret mode on CPU, vs a float64 oracle.

Shapes are tiny (N=1, H=2, T<=48, d=64): interpret mode simulates every grid step.
Fresh random inputs each run; the seed is in every failure message (SEA_TEST_SEED=... repeats it).
"""
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from conftest import current_seed  # noqa: E402
import pytest  # noqa: E402
from jax.experimental.pallas import tpu as pltpu  # noqa: E402

from pallas_kernels import tpu  # noqa: E402
from sea_jax.ops.block_map import build_block_map  # noqa: E402
from sea_jax.ops.bins import bin_index  # noqa: E402

# Unwritten VMEM starts as NaN, so an output block the kernel never stores shows up.
try:
  INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan")
except TypeError:  # field renamed in a later JAX
  INTERPRET = pltpu.InterpretParams()


def _seed():
  return current_seed()


# ------------------------------------------------------------------------------ oracle


def dense_mask(cm):
  """(N, H, T, K) bool -> (N, H, T, T) bool, the mask the compressed one stands for."""
  N, H, T, K = cm.shape
  t = np.arange(T)[:, None]
  s = np.arange(T)[None, :]
  causal = s <= t
  b = np.where(causal, ((2 * s + 1) * K - 1) // (2 * (t + 1)), 0)
  return np.take_along_axis(cm, np.broadcast_to(b, (N, H, T, T)), axis=-1) & causal


def reference(q, k, v, cm, d_out):
  """float64 dense masked softmax: out, lse, dq, dk, dv (empty rows: 0 / NEG_INF)."""
  q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
  M = dense_mask(np.asarray(cm))
  s = np.where(M, q @ np.swapaxes(k, -1, -2), -np.inf)
  has = M.any(-1, keepdims=True)
  m = np.where(has, s.max(-1, keepdims=True), 0.0)
  e = np.where(M, np.exp(s - m), 0.0)
  l = e.sum(-1, keepdims=True)
  p = e / np.where(has, l, 1.0)
  out = p @ v
  lse = np.where(has, m + np.log(np.where(has, l, 1.0)), tpu.NEG_INF)[..., 0]
  dp = d_out @ np.swapaxes(v, -1, -2)
  delta = (d_out * out).sum(-1, keepdims=True)
  ds = p * (dp - delta)
  return out, lse, ds @ k, np.swapaxes(ds, -1, -2) @ q, np.swapaxes(p, -1, -2) @ d_out


def rel_err(x, ref):
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  return np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30)


# ------------------------------------------------------------------------------ inputs


def make_mask(rng, N, H, T, K):
  """Rows: empty, full, 'recent' (last 2 bins) or random.

  Head 1: first half of the rows empty (a query block with no visit), the rest recent or
  empty (key blocks skipped).
  """
  mode = rng.choice(4, size=(N, H, T), p=[0.1, 0.1, 0.3, 0.5])
  mode[:, 1] = np.where(rng.random((N, T)) < 0.2, 0, 2)
  mode[:, 1, :T // 2] = 0
  mode[:, 0, 0] = 0  # at least one empty and one full row
  mode[:, 0, 1] = 1
  rand = rng.random((N, H, T, K)) < rng.uniform(0.1, 0.6)
  recent = np.broadcast_to(np.arange(K) >= K - 2, (N, H, T, K))
  m = mode[..., None]
  return np.where(m == 1, True, np.where(m == 2, recent, np.where(m == 3, rand, False)))


def make_inputs(rng, N, H, T, d, K, dtype):
  q = rng.standard_normal((N, H, T, d)) * d**-0.5 * 2.0
  k, v, do = (rng.standard_normal((N, H, T, d)) for _ in range(3))
  q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
  return q, k, v, make_mask(rng, N, H, T, K), jnp.asarray(do, dtype)


def run_kernels(q, k, v, cm, do, bq, bk):
  cmj = jnp.asarray(cm)
  bm = build_block_map(cmj, block_q=bq, block_k=bk)
  # the kernels read block_q / block_k off block_sizes (BlockSizes itself asks for >= 16, a
  # Triton limit; TPU interpret mode runs 8-wide tiles)
  blocks = types.SimpleNamespace(block_q=bq, block_k=bk)
  out, lse = tpu.forward(q, k, v, cmj, bm, block_sizes=blocks, interpret=INTERPRET)
  grads = tpu.backward(q, k, v, cmj, bm, out, lse, do, block_sizes=blocks,
                       interpret=INTERPRET)
  return bm, out, lse, grads


def check(seed, dtype, T, K, bq, bk, fwd_tol, grad_tol, N=1, H=2, d=64):
  rng = np.random.default_rng(seed)
  q, k, v, cm, do = make_inputs(rng, N, H, T, d, K, dtype)
  bm, out, lse, (dq, dk, dv) = run_kernels(q, k, v, cm, do, bq, bk)
  r_out, r_lse, r_dq, r_dk, r_dv = reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                              v.astype(jnp.float32), cm,
                                              do.astype(jnp.float32))
  msg = f"seed={seed} dtype={jnp.dtype(dtype).name} T={T} K={K} bq={bq} bk={bk}"
  assert out.shape == q.shape and out.dtype == q.dtype, msg
  assert lse.shape == (N, H, T) and lse.dtype == jnp.float32, msg
  for name, x in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
    assert np.isfinite(np.asarray(jnp.asarray(x, jnp.float32))).all(), f"{name} not finite, {msg}"
  for g, ref in ((dq, q), (dk, k), (dv, v)):
    assert g.shape == ref.shape and g.dtype == ref.dtype, msg
  # Some tiles must be skipped for the visit/skip path to be exercised.
  causal_tiles = sum(min(((i + 1) * bq - 1) // bk + 1, T // bk) for i in range(T // bq))
  assert int(bm.q_counts.sum()) < N * H * causal_tiles, msg
  empty = ~dense_mask(cm).any(-1)
  assert empty.any() and (~empty).any(), msg
  o = np.asarray(jnp.asarray(out, jnp.float32))
  assert (o[empty] == 0.0).all(), f"empty rows not exactly zero, {msg}"
  assert (np.asarray(lse)[empty] == np.float32(tpu.NEG_INF)).all(), msg
  assert rel_err(out, r_out) <= fwd_tol, f"out {rel_err(out, r_out):.2e}, {msg}"
  lse_err = np.max(np.abs(np.asarray(lse)[~empty] - r_lse[~empty]))
  assert lse_err <= fwd_tol * 10, f"lse abs err {lse_err:.2e}, {msg}"
  for name, x, ref in (("dq", dq, r_dq), ("dk", dk, r_dk), ("dv", dv, r_dv)):
    assert rel_err(x, ref) <= grad_tol, f"{name} {rel_err(x, ref):.2e}, {msg}"


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("K", [8, 40, 256])
def test_tile_keep_matches_bin_index(K):
  """The in-kernel fp32 + integer-correction bin lookup equals the exact integer formula."""
  seed = _seed()
  rng = np.random.default_rng(seed)
  T = 300
  cm = rng.random((T, K)) < 0.5
  words = np.asarray(tpu.pack_mask_words(jnp.asarray(cm)[None, None]))[0, 0]  # (nW, T)
  t = jnp.arange(T, dtype=jnp.int32)[:, None]
  s = jnp.arange(T, dtype=jnp.int32)[None, :]
  tt, ss = jnp.broadcast_arrays(t, s)
  keep = tpu._tile_keep(tt, ss, [jnp.asarray(w)[:, None] for w in words], K)
  np.testing.assert_array_equal(np.asarray(keep), dense_mask(cm[None, None])[0, 0],
                                err_msg=f"seed={seed}")
  # Long rows, where the fp32 quotient is least exact: transposed orientation as in dk/dv.
  t = jnp.asarray(np.sort(rng.integers(60000, 70000, size=64)), jnp.int32)[None, :]
  s = jnp.asarray(rng.integers(0, 60000, size=256), jnp.int32)[:, None]
  ss, tt = jnp.broadcast_arrays(s, t)
  cm = rng.random((64, K)) < 0.5
  words = np.asarray(tpu.pack_mask_words(jnp.asarray(cm)[None, None]))[0, 0]
  keep = tpu._tile_keep(tt, ss, [jnp.asarray(w)[None, :] for w in words], K)
  bins = np.asarray(bin_index(tt, ss, K))
  want = cm[np.broadcast_to(np.arange(64)[None, :], bins.shape), bins]
  np.testing.assert_array_equal(np.asarray(keep), want, err_msg=f"seed={seed}")


def test_pack_mask_words():
  rng = np.random.default_rng(_seed())
  cm = rng.random((1, 2, 5, 70)) < 0.5
  words = np.asarray(tpu.pack_mask_words(jnp.asarray(cm))).view(np.uint32)  # (1, 2, 3, 5)
  b = np.arange(70)
  got = (words[:, :, b // 32, :] >> (b % 32)[:, None].astype(np.uint32)) & 1
  np.testing.assert_array_equal(np.moveaxis(got, 2, 3).astype(bool), cm)


def test_fp32_forward_backward():
  check(_seed(), jnp.float32, T=48, K=8, bq=16, bk=16, fwd_tol=1e-5, grad_tol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("bq,bk,smem_words", [(16, 8, None), (8, 16, 8)])
def test_fp32_unequal_blocks_multiword(bq, bk, smem_words, monkeypatch):
  """block_q != block_k, K = 40 (two mask words per row); smem_words: a visit-list budget
  of one head per pallas_call, so heads run as a lax.map of separate calls."""
  if smem_words is not None:
    monkeypatch.setattr(tpu, "SMEM_VISIT_WORDS", smem_words)
  check(_seed(), jnp.float32, T=32, K=40, bq=bq, bk=bk, fwd_tol=1e-5, grad_tol=1e-4)


def test_bf16_forward_backward():
  check(_seed(), jnp.bfloat16, T=32, K=8, bq=16, bk=16, fwd_tol=1e-2, grad_tol=1e-2)


def test_all_empty_mask():
  """Nothing kept anywhere: no tile visited, exact zeros out and grads, lse = NEG_INF."""
  rng = np.random.default_rng(_seed())
  N, H, T, d, K, B = 1, 2, 32, 64, 8, 16
  q, k, v, _, do = make_inputs(rng, N, H, T, d, K, jnp.float32)
  cm = np.zeros((N, H, T, K), bool)
  bm, out, lse, grads = run_kernels(q, k, v, cm, do, B, B)
  assert int(bm.q_counts.sum()) == 0
  assert (np.asarray(out) == 0).all() and (np.asarray(lse) == np.float32(tpu.NEG_INF)).all()
  for g in grads:
    assert (np.asarray(g) == 0).all()


@pytest.mark.parametrize("dtype,H,Hkv", [(jnp.float32, 2, 2), (jnp.bfloat16, 2, 2),
                                        (jnp.bfloat16, 4, 1)])
def test_lowers_for_tpu(dtype, H, Hkv):
  """Forward + backward pass the Pallas -> Mosaic lowering (block-shape rules, every
  primitive has a TPU rule) at TPU block sizes, on CPU, also with grouped-query k, v
  (Hkv < H). Mosaic's own compile is not run."""
  N, T, d, K = 1, 512, 64, 40

  def f(q, k, v, cm):
    bm = build_block_map(cm, block_q=128, block_k=256)
    blocks = types.SimpleNamespace(block_q=128, block_k=256)
    out, lse = tpu.forward(q, k, v, cm, bm, block_sizes=blocks)
    return out, lse, tpu.backward(q, k, v, cm, bm, out, lse, out, block_sizes=blocks)

  x = jax.ShapeDtypeStruct((N, H, T, d), dtype)
  kv = jax.ShapeDtypeStruct((N, Hkv, T, d), dtype)
  cm = jax.ShapeDtypeStruct((N, H, T, K), jnp.bool_)
  text = jax.jit(f).trace(x, kv, kv, cm).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 3


def test_small_blocks_need_interpret():
  q = jnp.zeros((1, 1, 32, 64), jnp.float32)
  cm = jnp.ones((1, 1, 32, 8), bool)
  bm = build_block_map(cm, block_q=16, block_k=16)
  with pytest.raises(ValueError, match="multiple of 128"):
    tpu.forward(q, q, q, cm, bm, block_sizes=types.SimpleNamespace(block_q=16, block_k=16), interpret=False)
