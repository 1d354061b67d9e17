"""sea_jax.losses against plain float64 NumPy formulas (SEA_SPEC §2)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import seed_of

from sea_jax import losses

SEED = seed_of("test_losses")
print(f"test_losses seed: {SEED}")
RTOL = 1e-5


def _rng(salt: int) -> np.random.Generator:
  return np.random.default_rng([SEED, salt])


def _close(got, want, rtol=RTOL, what=""):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
  assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol} (seed {SEED})"


# ---------------------------------------------------------------- inputs and NumPy reference

def _aux_pair(rng, N, H, T, d, K):
  """Random teacher/student aux dicts (float32 arrays, q pre-scaled); nothing zero."""
  def x(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)
  teacher = {"q": x(N, H, T, d, scale=2 * d**-0.5), "k": x(N, H, T, d), "context": x(N, H, T, d)}
  student = {"q": x(N, H, T, d, scale=2 * d**-0.5), "k": x(N, H, T, d), "context": x(N, H, T, d),
             "est_logits": x(N, H, T, K, scale=2.0)}
  return teacher, student


def _np_softmax(x, visible):
  """Softmax over the visible entries; rows with none visible give zeros."""
  x = np.where(visible, x, -np.inf)
  x = x - np.where(visible.any(-1, keepdims=True), x.max(-1, keepdims=True), 0.0)
  e = np.where(visible, np.exp(x), 0.0)
  return e / np.maximum(e.sum(-1, keepdims=True), 1e-300)


def _np_layer_loss(teacher, student, K, key_mask=None):
  """Dense float64 SEA_SPEC §2 layer loss; bins from the spec's float formula."""
  t64 = {k: np.asarray(v, np.float64) for k, v in teacher.items()}
  s64 = {k: np.asarray(v, np.float64) for k, v in student.items()}
  N, H, T, d = t64["q"].shape
  t, s = np.arange(T)[:, None], np.arange(T)[None, :]
  visible = np.broadcast_to((s <= t)[None, None], (N, H, T, T))
  rows = np.ones((N, T))
  if key_mask is not None:
    visible = visible & key_mask[:, None, None, :]
    rows = key_mask.astype(np.float64)
  w = rows[:, None, :, None]
  n_rows = H * rows.sum()
  a = _np_softmax(t64["q"] @ np.swapaxes(t64["k"], -1, -2), visible)
  bins = np.clip(np.floor((s + 0.5) * K / (t + 1) - 1e-4).astype(int), 0, K - 1)
  e_up = np.take_along_axis(s64["est_logits"], np.broadcast_to(bins, (N, H, T, T)), axis=-1)

  def terms(p):
    with np.errstate(divide="ignore", invalid="ignore"):
      kl = np.where(a > 0, a * (np.log(a) - np.log(p)), 0.0)
    return 0.1 * (kl * w).sum() / n_rows + (((p - a) ** 2) * w).sum() / (n_rows * T)

  approx = terms(_np_softmax(e_up, visible))
  prob = terms(_np_softmax(s64["q"] @ np.swapaxes(s64["k"], -1, -2), visible))
  context = (((s64["context"] - t64["context"]) ** 2) * w).sum() / (n_rows * d)
  return {"approx": approx, "prob": prob, "context": context, "total": approx + prob + context}


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_ce(logits, targets):
  lp = _np_log_softmax(logits)
  return -np.take_along_axis(lp, targets[..., None], axis=-1).mean()


def _np_kl(tl, sl):
  lt, ls = _np_log_softmax(tl), _np_log_softmax(sl)
  return (np.exp(lt) * (lt - ls)).sum(-1).mean()


def _np_hidden(th, sh):
  return np.mean([((np.float64(a) - np.float64(b)) ** 2).mean() for a, b in zip(th, sh)])


# ---------------------------------------------------------------- per-layer loss

SHAPES = [  # (N, H, T, d, K, query_block)
    (2, 3, 37, 8, 64, 16),   # T < K, T not a multiple of the block
    (1, 2, 100, 16, 16, 32),  # T > K, T not a multiple of the block
    (2, 2, 48, 8, 8, 16),    # T a multiple of the block
    (1, 2, 5, 4, 8, 128),    # T < block
]


@pytest.mark.parametrize("shape", SHAPES)
def test_layer_loss_matches_numpy(shape):
  N, H, T, d, K, block = shape
  teacher, student = _aux_pair(_rng(hash(shape) % 1000), N, H, T, d, K)
  want = _np_layer_loss(teacher, student, K)
  chunked = jax.jit(lambda t, s: losses.attention_layer_loss(t, s, K=K, query_block=block))(
      teacher, student)
  dense = jax.jit(lambda t, s: losses.dense_attention_layer_loss(t, s, K=K))(teacher, student)
  for name in ("approx", "prob", "context", "total"):
    _close(chunked[name], want[name], what=f"chunked {name}")
    _close(dense[name], want[name], what=f"dense {name}")


def test_layer_loss_key_mask_matches_numpy():
  N, H, T, d, K = 3, 2, 29, 8, 16
  teacher, student = _aux_pair(_rng(7), N, H, T, d, K)
  key_mask = np.ones((N, T), bool)
  key_mask[0, :6] = False   # left padding
  key_mask[1, -9:] = False  # right padding
  want = _np_layer_loss(teacher, student, K, key_mask)
  fn = jax.jit(lambda t, s, m: losses.attention_layer_loss(t, s, K=K, query_block=8, key_mask=m))
  got = fn(teacher, student, key_mask)
  for name in want:
    _close(got[name], want[name], what=f"masked {name}")
  full = fn(teacher, student, np.ones((N, T), bool))
  _close(full["total"], _np_layer_loss(teacher, student, K)["total"], what="all-real mask")


def test_layer_loss_without_estimator():
  teacher, student = _aux_pair(_rng(8), 1, 2, 20, 4, 8)
  del student["est_logits"]
  got = jax.jit(lambda t, s: losses.attention_layer_loss(t, s, K=8, query_block=8))(
      teacher, student)
  assert float(got["approx"]) == 0.0 and float(got["prob"]) > 0.0


def test_layer_loss_rejects_bad_K():
  teacher, student = _aux_pair(_rng(9), 1, 1, 8, 4, 8)
  with pytest.raises(ValueError, match="est_logits"):
    losses.attention_layer_loss(teacher, student, K=16)


@pytest.mark.parametrize("shape", [(2, 2, 37, 8, 64, 16), (1, 2, 70, 8, 16, 32)])
def test_chunked_gradients_match_dense(shape):
  N, H, T, d, K, block = shape
  teacher, student = _aux_pair(_rng(11 + T), N, H, T, d, K)

  def grads(fn):
    return jax.jit(jax.grad(lambda t, s: fn(t, s)["total"], argnums=(0, 1)))(teacher, student)

  g_t, g_chunk = grads(lambda t, s: losses.attention_layer_loss(t, s, K=K, query_block=block))
  _, g_dense = grads(lambda t, s: losses.dense_attention_layer_loss(t, s, K=K))
  for name in ("q", "k", "context", "est_logits"):
    assert np.all(np.isfinite(g_chunk[name])) and np.any(g_chunk[name] != 0), name
    _close(g_chunk[name], g_dense[name], rtol=1e-4, what=f"grad {name}")
  for name, g in g_t.items():  # teacher side is stop_gradient'ed
    assert not np.any(g), f"teacher {name} got a gradient"


def test_chunked_memory_far_below_dense():
  N, H, T, d, K = 1, 12, 4096, 64, 256
  spec = jax.ShapeDtypeStruct((N, H, T, d), jnp.float32)
  teacher = {"q": spec, "k": spec, "context": spec}
  student = dict(teacher, est_logits=jax.ShapeDtypeStruct((N, H, T, K), jnp.float32))

  def temp_bytes(fn):
    grad = jax.jit(jax.grad(lambda t, s: fn(t, s)["total"], argnums=1))
    analysis = grad.lower(teacher, student).compile().memory_analysis()
    if analysis is None:
      pytest.skip("memory_analysis unavailable on this backend")
    return analysis.temp_size_in_bytes

  chunked = temp_bytes(lambda t, s: losses.attention_layer_loss(t, s, K=K, query_block=128))
  dense = temp_bytes(lambda t, s: losses.dense_attention_layer_loss(t, s, K=K))
  print(f"temp bytes at T={T}: chunked {chunked}, dense {dense}")
  assert chunked < dense / 4


# ---------------------------------------------------------------- global terms

def test_cross_entropy_matches_numpy():
  rng = _rng(20)
  logits = (3 * rng.standard_normal((2, 9, 31))).astype(np.float32)
  targets = rng.integers(0, 31, (2, 9))
  _close(losses.cross_entropy(logits, targets), _np_ce(logits, targets), what="ce")
  _close(losses.lm_loss(logits, targets), _np_ce(logits, targets), what="lm_loss")
  ignored = targets.copy()
  ignored[:, -1] = -100
  _close(losses.cross_entropy(logits, ignored), _np_ce(logits[:, :-1], targets[:, :-1]),
         what="ce ignore")
  weights = rng.uniform(0.5, 2.0, (2, 9))
  lp = _np_log_softmax(logits)
  ce_tok = -np.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
  _close(losses.cross_entropy(logits, targets, weights), (ce_tok * weights).sum() / weights.sum(),
         what="ce weighted")
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  got = losses.cross_entropy(bf16, targets)
  assert got.dtype == jnp.float32
  _close(got, _np_ce(np.asarray(bf16.astype(jnp.float32)), targets), what="ce bf16")


def test_logit_kl_matches_numpy():
  rng = _rng(21)
  tl = (2 * rng.standard_normal((2, 7, 40))).astype(np.float32)
  sl = (2 * rng.standard_normal((2, 7, 40))).astype(np.float32)
  _close(losses.logit_kl(tl, sl), _np_kl(tl, sl), what="kl")
  g_t, g_s = jax.grad(losses.logit_kl, argnums=(0, 1))(tl, sl)
  assert not np.any(g_t) and np.any(g_s)


def test_hidden_mse_matches_numpy():
  rng = _rng(22)
  th = [rng.standard_normal((2, 5, 12)).astype(np.float32) for _ in range(4)]
  sh = [rng.standard_normal((2, 5, 12)).astype(np.float32) for _ in range(4)]
  _close(losses.hidden_mse(th, sh), _np_hidden(th, sh), what="hidden")
  with pytest.raises(ValueError):
    losses.hidden_mse(th, sh[:-1])


# ---------------------------------------------------------------- combined loss

@dataclasses.dataclass
class _Out:
  logits: np.ndarray
  hidden_states: list
  attn_aux: list


def _model_outputs(rng, N=2, T=21, V=33, D=10, L=2, H=2, d=4, K=16):
  t_aux, s_aux = zip(*[_aux_pair(rng, N, H, T, d, K) for _ in range(L)])
  def x(*shape):
    return rng.standard_normal(shape).astype(np.float32)
  teacher = {"logits": 2 * x(N, T, V), "hidden_states": [x(N, T, D) for _ in range(L + 1)],
             "attn_aux": list(t_aux)}
  student = {"logits": 2 * x(N, T, V), "hidden_states": [x(N, T, D) for _ in range(L + 1)],
             "attn_aux": list(s_aux)}
  return teacher, student, rng.integers(0, V, (N, T)), K


def test_distillation_loss_matches_numpy():
  teacher, student, targets, K = _model_outputs(_rng(30))
  layers = [_np_layer_loss(ta, sa, K) for ta, sa in zip(teacher["attn_aux"], student["attn_aux"])]
  want = {"ce": _np_ce(student["logits"], targets),
          "hidden": _np_hidden(teacher["hidden_states"], student["hidden_states"]),
          "kl": _np_kl(teacher["logits"], student["logits"])}
  for name in ("approx", "prob", "context"):
    want[name] = np.mean([l[name] for l in layers])
  want["layer"] = np.mean([l["total"] for l in layers])
  want["total"] = 0.1 * want["ce"] + 5 * want["hidden"] + 0.2 * want["kl"] + want["layer"]

  fn = jax.jit(lambda t, s, y: losses.distillation_loss(t, s, y, K=K, query_block=8))
  total, terms = fn(teacher, student, targets)
  assert set(terms) >= set(want)
  for name in want:
    _close(terms[name], want[name], what=name)
  _close(total, want["total"], what="total")
  total_dc, _ = jax.jit(lambda t, s, y: losses.distillation_loss(
      _Out(**t), _Out(**s), y, K=K, query_block=8))(teacher, student, targets)
  _close(total_dc, want["total"], what="dataclass total")
  weights = losses.LossWeights(ce=1.0, hidden=0.0, kl=0.0, layer=0.0)
  only_ce, _ = jax.jit(lambda t, s, y: losses.distillation_loss(
      t, s, y, K=K, weights=weights, query_block=8))(teacher, student, targets)
  _close(only_ce, want["ce"], what="weights")


def test_distillation_loss_ignores_padding_values():
  teacher, student, targets, K = _model_outputs(_rng(31), T=13)
  key_mask = np.ones(targets.shape, bool)
  key_mask[1, -4:] = False
  fn = jax.jit(lambda t, s: losses.distillation_loss(t, s, targets, K=K, key_mask=key_mask)[0])
  base = fn(teacher, student)
  rng = _rng(32)

  def scramble(tree):  # new values at padded positions (T is axis 1 of (N,T,...), 2 of (N,H,T,...))
    def f(x):
      x = np.array(x)
      if x.ndim == 4:
        x[1, :, -4:] = rng.standard_normal(x[1, :, -4:].shape)
      else:
        x[1, -4:] = rng.standard_normal(x[1, -4:].shape)
      return x
    return jax.tree.map(f, tree)

  teacher2, student2 = scramble(teacher), scramble(student)
  got = fn(teacher2, student2)
  _close(got, base, rtol=1e-6, what="padding invariance")
