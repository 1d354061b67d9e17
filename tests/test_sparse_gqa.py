"""Grouped-query attention (k, v with Hkv = H / G heads) in SEA's sparse attention.

Every op (the XLA tile list, its reference, the Pallas GPU kernels in interpret mode, the TPU
kernels in TPU interpret mode) against an independent float64 NumPy computation that repeats
k and v explicitly (`np.repeat(k, G, axis=1)`, Hugging Face's `repeat_kv` order) and sums the
repeated dk, dv over each group. Fresh random inputs each run; the seed is in every message.
"""
from __future__ import annotations

import functools
import os
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import BlockSizes, build_block_map
from pallas_kernels import gpu as gpu_lib
from pallas_kernels import sparse_attention as pallas_sparse_attention
from pallas_kernels import tpu as tpu_lib
from sea_jax.ops.sparse import sparse_attention, sparse_attention_reference
from sea_jax.sea.topk import grouped_topk_mask

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_sea_pieces import make_rng, rel_err  # noqa: E402

XLA_OPS = {"tiles": functools.partial(sparse_attention, full_rung="tiles"),
           "default": sparse_attention, "reference": sparse_attention_reference}
H = 4
GROUPS = (1, 2, 4)   # Hkv = 4, 2, 1

try:   # unwritten VMEM starts as NaN, so an output block a kernel never stores shows up
  TPU_INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan")
except TypeError:
  TPU_INTERPRET = pltpu.InterpretParams()


def f32(*xs):
  return [np.asarray(x, np.float32) for x in xs]


def max_rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


# --- float64 NumPy reference with k, v repeated explicitly ------------------------------------


def np_dense_mask(cm: np.ndarray) -> np.ndarray:
  """(N,H,T,K) bool -> (N,H,T,T): cm[t, bin_t(s)] for s <= t, bin_t(s) = ((2s+1)K-1)//(2(t+1))."""
  T, K = cm.shape[2:]
  t = np.arange(T)[:, None]
  s = np.arange(T)[None, :]
  bins = np.where(s <= t, ((2 * s + 1) * K - 1) // (2 * (t + 1)), 0)
  dense = np.take_along_axis(cm, np.broadcast_to(bins, (*cm.shape[:2], T, T)), axis=-1)
  return dense & (s <= t)


def np_gqa_attention(q, k, v, cm, w):
  """float64 (out, dq, dk, dv) for the cotangent w; dk, dv (N,Hkv,T,d) summed over groups."""
  q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, w))
  N, Hq, T, d = q.shape
  G = Hq // k.shape[1]
  kr, vr = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
  mask = np_dense_mask(np.asarray(cm))
  s = np.where(mask, q @ np.swapaxes(kr, -1, -2), -np.inf)
  m = np.max(s, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.where(mask, np.exp(s - m), 0.0)
  l = p.sum(-1, keepdims=True)
  p = p / np.where(l > 0, l, 1.0)
  out = p @ vr
  dp = w @ np.swapaxes(vr, -1, -2)
  ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
  dq = ds @ kr
  dk = (np.swapaxes(ds, -1, -2) @ q).reshape(N, -1, G, T, d).sum(2)
  dv = (np.swapaxes(p, -1, -2) @ w).reshape(N, -1, G, T, d).sum(2)
  return out, dq, dk, dv


# --- inputs ----------------------------------------------------------------------------------


def special_rows(rng, cm: np.ndarray) -> np.ndarray:
  """A few rows of every head keep nothing, a few keep every bin."""
  cm = cm.copy()
  T = cm.shape[2]
  for n in range(cm.shape[0]):
    for h in range(cm.shape[1]):
      rows = rng.choice(T, size=min(6, T), replace=False)
      cm[n, h, rows[:3]] = False
      cm[n, h, rows[3:]] = True
  return cm


def make_mask(rng, N, T, K, kind: str) -> np.ndarray:
  if kind == "random":
    cm = rng.random((N, H, T, K)) < rng.uniform(0.1, 0.5)
  else:   # coherent: heads compete for one budget per row, as in the SEA layer
    probs = jax.nn.softmax(jnp.asarray(rng.standard_normal((N, H, T, K)) * 3, jnp.float32), -1)
    cm = np.asarray(grouped_topk_mask(probs, 2))
  return special_rows(rng, cm)


def make_inputs(rng, N, G, T, d, K, kind, dtype=np.float32):
  hkv = H // G
  q = rng.standard_normal((N, H, T, d)) * 2.0 * d ** -0.5
  k, v = (rng.standard_normal((N, hkv, T, d)) for _ in range(2))
  w = rng.standard_normal((N, H, T, d))
  q, k, v, w = (jnp.asarray(x, dtype) for x in (q, k, v, w))
  return q, k, v, jnp.asarray(make_mask(rng, N, T, K, kind)), w


def check_special_rows(cm, out, msg):
  dense = np_dense_mask(np.asarray(cm))
  empty = ~dense.any(-1)
  assert empty.any(), msg
  assert (np.asarray(out, np.float32)[empty] == 0).all(), f"empty rows not 0, {msg}"
  full = np.asarray(cm).all(-1)   # every bin kept: the row attends to all of s <= t
  assert full.any() and dense[full].sum() == sum(t + 1 for t in np.nonzero(full)[2]), msg


# --- XLA tile list and reference -------------------------------------------------------------


# (N, T, d, K, query_block, mask kind): uneven T, T < K, random and coherent masks.
XLA_CASES = [(2, 77, 16, 16, 32, "random"), (1, 130, 16, 16, 32, "topk"),
             (1, 20, 8, 64, 32, "topk")]


@pytest.mark.parametrize("op", XLA_OPS)
@pytest.mark.parametrize("G", GROUPS)
@pytest.mark.parametrize("case", XLA_CASES, ids=lambda c: f"N{c[0]}T{c[1]}K{c[3]}-{c[5]}")
def test_xla_ops_match_repeated_kv_float64(op, G, case):
  N, T, d, K, block, kind = case
  rng, seed = make_rng()
  q, k, v, cm, w = make_inputs(rng, N, G, T, d, K, kind)
  msg = f"seed={seed} op={op} G={G} case={case}"
  f = lambda q, k, v: XLA_OPS[op](q, k, v, cm, query_block=block)  # noqa: E731
  out = f(q, k, v)
  grads = jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)
  want = np_gqa_attention(q, k, v, cm, w)
  assert out.shape == q.shape and out.dtype == jnp.float32, msg
  assert grads[1].shape == k.shape and grads[2].shape == v.shape, msg
  for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), want):
    assert rel_err(got, ref) <= 1e-5, f"{name} rel err {rel_err(got, ref):.2e}, {msg}"
  check_special_rows(cm, out, msg)


@pytest.mark.parametrize("G", (2, 4))
def test_xla_ops_float64_are_exact(G):
  """With jax x64 and fp64 inputs both ops agree with NumPy to fp64 rounding."""
  rng, seed = make_rng()
  with jax.enable_x64(True):
    q, k, v, cm, w = make_inputs(rng, 1, G, 70, 16, 16, "topk", np.float64)
    want = np_gqa_attention(q, k, v, cm, w)
    for op, fn in XLA_OPS.items():
      f = lambda q, k, v: fn(q, k, v, cm, query_block=32)  # noqa: E731
      out = f(q, k, v)
      grads = jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)
      assert out.dtype == jnp.float64
      for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), want):
        err = rel_err(got, ref)
        assert err <= 1e-12, f"seed={seed} op={op} G={G}: {name} rel err {err:.2e}"


@pytest.mark.parametrize("G", (2, 4))
def test_xla_ops_bf16_forward(G):
  rng, seed = make_rng()
  q, k, v, cm, _ = make_inputs(rng, 1, G, 77, 32, 16, "random", jnp.bfloat16)
  want = np_gqa_attention(*f32(q, k, v), cm, np.ones(q.shape))[0]
  for op, fn in XLA_OPS.items():
    got = fn(q, k, v, cm, query_block=32)
    assert got.dtype == jnp.bfloat16
    assert rel_err(got, want) <= 2e-2, f"seed={seed} op={op} G={G}: {rel_err(got, want):.2e}"


# --- shape checks ----------------------------------------------------------------------------


def _bad_shapes():
  q = jnp.zeros((1, 4, 16, 8), jnp.float32)
  cm = jnp.zeros((1, 4, 16, 8), bool)
  kv = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
  return q, cm, [
      (kv(1, 2, 16, 8), kv(1, 1, 16, 8), r"k and v must have the same.*k.shape=\(1, 2, 16, 8\)"
       r".*v.shape=\(1, 1, 16, 8\)"),
      (kv(1, 3, 16, 8), kv(1, 3, 16, 8), r"H=4 must be a multiple of .*Hkv=3.*k.shape=\(1, 3"),
      (kv(1, 2, 17, 8), kv(1, 2, 17, 8), r"N, T and d.*k.shape=\(1, 2, 17, 8\)"),
      (kv(1, 2, 16, 4), kv(1, 2, 16, 4), r"N, T and d.*k.shape=\(1, 2, 16, 4\)"),
      (kv(2, 2, 16, 8), kv(2, 2, 16, 8), r"N, T and d.*q.shape=\(1, 4, 16, 8\)"),
  ]


@pytest.mark.parametrize("op", ["tiles", "reference", "pallas"])
def test_shape_errors_name_the_shapes(op):
  fn = {"pallas": lambda *a: pallas_sparse_attention(*a, interpret=True), **XLA_OPS}[op]
  q, cm, cases = _bad_shapes()
  for k, v, pattern in cases:
    with pytest.raises(ValueError, match=pattern):
      fn(q, k, v, cm)
  with pytest.raises(ValueError, match=r"compressed_mask.shape=\(1, 2, 16, 8\)"):
    fn(q, q[:, :2], q[:, :2], cm[:, :2])   # the mask is per query head


# --- memory ----------------------------------------------------------------------------------


def xla_temp_bytes(T: int, Hkv: int, repeat: bool = False, N=1, Hq=8, d=64, K=64,
                   full_rung: str = "tiles") -> int:
  """XLA's planned temp bytes of jit(grad) of the XLA op (fwd + bwd), compiled, not run (the
  pattern of test_sea_memory). repeat=True: k, v repeated to Hq heads before the op.
  full_rung="tiles" measures the tile list alone; the default op's every-tile rung is
  blocked_attention, whose O(block · T) scores dwarf k and v at these sizes."""
  def loss(q, k, v, cm):
    if repeat:
      k, v = (jnp.repeat(x, Hq // Hkv, axis=1) for x in (k, v))
    return jnp.sum(sparse_attention(q, k, v, cm, query_block=128, full_rung=full_rung))

  q = jax.ShapeDtypeStruct((N, Hq, T, d), jnp.float32)
  kv = jax.ShapeDtypeStruct((N, Hkv, T, d), jnp.float32)
  cm = jax.ShapeDtypeStruct((N, Hq, T, K), jnp.bool_)
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, cm)
  return lowered.compile().memory_analysis().temp_size_in_bytes


@pytest.fixture(scope="module")
def measured():
  """8 query heads on 2 kv heads; T = 1024, 2048 (8 and 16 query blocks, same ladder shape)."""
  return {"gqa": {T: xla_temp_bytes(T, 2) for T in (1024, 2048)},
          "repeated": xla_temp_bytes(1024, 2, repeat=True),
          "default": {T: xla_temp_bytes(T, 2, full_rung="blocked") for T in (2048, 4096)}}


@pytest.mark.parametrize("path,lengths", [("gqa", (1024, 2048)), ("default", (2048, 4096))])
def test_gqa_memory_is_linear_in_length(measured, path, lengths):
  small, large = (measured[path][T] for T in lengths)
  assert large < 2.5 * small, f"{path} temp bytes: T={lengths[0]} {small}, T={lengths[1]} " \
                              f"{large} ({large / small:.2f}x)"


def test_gqa_memory_is_below_repeated_kv(measured):
  """Repeating k, v (and accumulating dk, dv at 8 heads) costs ~2x the temp bytes here."""
  gqa, repeated = measured["gqa"][1024], measured["repeated"]
  assert gqa < 0.7 * repeated, f"GQA temp bytes {gqa}, with k, v repeated {repeated}"


# --- Pallas GPU kernels (interpret mode) -----------------------------------------------------


@pytest.mark.parametrize("G", GROUPS)
def test_gpu_kernels_interpret(G):
  """Kernel level, outputs poisoned with NaN (every element must be written)."""
  rng, seed = make_rng()
  N, T, d, K, bs = 1, 48, 32, 8, BlockSizes(16, 16)
  q, k, v, cm, w = make_inputs(rng, N, G, T, d, K, "random")
  bmap = build_block_map(cm, block_q=16, block_k=16)
  out, lse = gpu_lib.forward(q, k, v, cm, bmap, block_sizes=bs, interpret=True, poison=True)
  grads = gpu_lib.backward(q, k, v, cm, bmap, out, lse, w, block_sizes=bs, interpret=True,
                           poison=True)
  msg = f"seed={seed} G={G}"
  assert grads[1].shape == k.shape and grads[2].shape == v.shape, msg
  want = np_gqa_attention(q, k, v, cm, w)
  for name, got, ref, tol in zip(("out", "dq", "dk", "dv"), (out, *grads), want,
                                 (1e-5, 1e-4, 1e-4, 1e-4)):
    assert not np.isnan(np.asarray(got)).any(), f"{name}: unwritten elements, {msg}"
    assert max_rel_err(got, ref) <= tol, f"{name} {max_rel_err(got, ref):.2e}, {msg}"
  check_special_rows(cm, out, msg)


@pytest.mark.parametrize("G,dtype", [(2, np.float32), (4, jnp.bfloat16)])
def test_gpu_public_op_interpret(G, dtype):
  """Through pallas_kernels.sparse_attention (T padding, custom_vjp) and jax.vjp."""
  rng, seed = make_rng()
  q, k, v, cm, w = make_inputs(rng, 1, G, 40, 32, 64, "topk", dtype)   # T < K
  f = lambda q, k, v: pallas_sparse_attention(q, k, v, cm, interpret=True,  # noqa: E731
                                              block_sizes=BlockSizes(16, 16))
  out, vjp = jax.vjp(f, q, k, v)
  grads = vjp(w)
  q32, k32, v32, w32 = f32(q, k, v, w)
  want = np_gqa_attention(q32, k32, v32, cm, w32)
  ftol, gtol = (1e-5, 1e-4) if dtype == np.float32 else (2e-2, 3e-2)
  msg = f"seed={seed} G={G} dtype={jnp.dtype(dtype).name}"
  assert out.dtype == dtype and grads[1].shape == k.shape and grads[1].dtype == dtype, msg
  for name, got, ref, tol in zip(("out", "dq", "dk", "dv"), (out, *grads), want,
                                 (ftol, gtol, gtol, gtol)):
    assert max_rel_err(got, ref) <= tol, f"{name} {max_rel_err(got, ref):.2e}, {msg}"


# --- TPU kernels (TPU interpret mode) --------------------------------------------------------


@pytest.mark.parametrize("G,smem_words", [(1, None), (2, None), (4, None), (2, 8)])
def test_tpu_kernels_interpret(G, smem_words, monkeypatch):
  """smem_words=8: one kv group per pallas_call (heads run as a lax.map over chunks)."""
  if smem_words is not None:
    monkeypatch.setattr(tpu_lib, "SMEM_VISIT_WORDS", smem_words)
  rng, seed = make_rng()
  N, T, d, K, B = 1, 32, 64, 8, 16
  q, k, v, cm, w = make_inputs(rng, N, G, T, d, K, "random")
  bm = build_block_map(cm, block_q=B, block_k=B)
  blocks = BlockSizes(block_q=B, block_k=B)
  out, lse = tpu_lib.forward(q, k, v, cm, bm, block_sizes=blocks, interpret=TPU_INTERPRET)
  grads = tpu_lib.backward(q, k, v, cm, bm, out, lse, w, block_sizes=blocks,
                           interpret=TPU_INTERPRET)
  msg = f"seed={seed} G={G} smem_words={smem_words}"
  assert out.shape == q.shape and lse.shape == (N, H, T), msg
  assert grads[1].shape == k.shape and grads[2].shape == v.shape, msg
  want = np_gqa_attention(q, k, v, cm, w)
  for name, got, ref, tol in zip(("out", "dq", "dk", "dv"), (out, *grads), want,
                                 (1e-5, 1e-4, 1e-4, 1e-4)):
    assert np.isfinite(np.asarray(got)).all(), f"{name} not finite, {msg}"
    assert max_rel_err(got, ref) <= tol, f"{name} {max_rel_err(got, ref):.2e}, {msg}"
  check_special_rows(cm, out, msg)


def test_tpu_public_op_interpret_bf16():
  rng, seed = make_rng()
  q, k, v, cm, w = make_inputs(rng, 1, 4, 40, 64, 16, "topk", jnp.bfloat16)
  f = lambda q, k, v: pallas_sparse_attention(q, k, v, cm, backend="tpu",  # noqa: E731
                                              interpret=True, block_sizes=BlockSizes(16, 16))
  out, vjp = jax.vjp(f, q, k, v)
  grads = vjp(w)
  q32, k32, v32, w32 = f32(q, k, v, w)
  want = np_gqa_attention(q32, k32, v32, cm, w32)
  assert out.dtype == jnp.bfloat16 and grads[1].shape == k.shape
  for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), want):
    tol = 2e-2 if name == "out" else 3e-2
    assert max_rel_err(got, ref) <= tol, f"seed={seed}: {name} {max_rel_err(got, ref):.2e}"
