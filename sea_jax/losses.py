"""Distillation and language-model losses (SEA_SPEC §2), all in fp32.

Per-layer attention loss, for one decoder layer (teacher A^T = causal softmax of q_T k_T^T):
  L_approx  = 0.1 KL(A^T || softmax_s(E_up)) + MSE(softmax_s(E_up), A^T)
  L_prob    = 0.1 KL(A^T || softmax_s(q_S k_S^T)) + MSE(softmax_s(q_S k_S^T), A^T)
  L_context = MSE(teacher context, student context)
E_up[t, s] = E[t, bin_t(s)] for s <= t, -large beyond t (E = "est_logits", (N,H,T,K)).
KL is `batchmean` over the N*H*T rows (0 log 0 = 0, masked entries give 0); the map MSEs
average over all N*H*T*T entries, the zero upper triangle included.

The T x T maps are never held whole: `attention_layer_loss` scans over blocks of query rows,
each block body under `jax.checkpoint`, so forward and backward hold O(block * T) per head, and
each block scores only the keys it can see (`blocked_attention.causal_groups`). L_approx and
the kept mass are taken in the K bins of each row from the teacher's mass per bin
(`_compressed_terms`): the same numbers with an O(T * K) gradient.
This is the same formula as the dense one (not a sampled estimate); `dense_attention_layer_loss`
computes it with full T x T maps, for tests and memory comparisons.

Padded batches (`key_mask`, (N,T) bool, True = real token): padding keys are hidden from every
softmax (teacher, estimator, student), like `attention.dense_attention`; padding query rows
are left out of every sum, and the means divide by the real counts: KL by H * (#real rows),
map MSE by H * (#real rows) * T, context MSE by H * (#real rows) * d. With no padding this is
exactly the N*H*T and N*H*T*T of the spec.

Global terms: `cross_entropy` (targets aligned with logits: targets[:, t] is the token logits[:, t]
predicts; targets < 0 are ignored), `logit_kl` (KL(teacher || student) over the vocabulary,
batchmean over the N*T tokens), `hidden_mse` (mean over the L+1 hidden states of each MSE).
`distillation_loss` = 0.1 CE + 5 hidden + 0.2 KL + mean over layers of the layer loss.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from sea_jax.ops.blocked_attention import SCORE_BYTES, causal_groups, pick_block
from sea_jax.ops.dense import repeat_kv
from sea_jax.ops.bins import bin_index, row_bounds

NEG = -1e30  # "-large": exp(NEG - lse) is exactly 0 in fp32
KL_WEIGHT = 0.1  # weight of the KL term inside L_approx and L_prob


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _teacher(x) -> jax.Array:
  return jax.lax.stop_gradient(_f32(x))


def _sum(x: jax.Array) -> jax.Array:
  """Sum over the last axis first, then the rest (shorter fp32 accumulation chains)."""
  return jnp.sum(jnp.sum(x, axis=-1))


def _masked_softmax(logits: jax.Array, visible: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(log p, p) of the softmax over the last axis of the visible entries, one exp per entry;
  log p is -large (finite) and p is 0 where not visible."""
  x = jnp.where(visible, logits, NEG)
  shifted = x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
  e = jnp.where(visible, jnp.exp(shifted), 0.0)
  total = jnp.sum(e, axis=-1, keepdims=True)
  log_p = shifted - jnp.log(jnp.maximum(total, 1e-30))
  return log_p, e / jnp.maximum(total, 1e-30)


def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
  """(N,H,B,d) x (N,H,T,d) -> (N,H,B,T) fp32."""
  return jnp.einsum("nhbd,nhsd->nhbs", q, k, preferred_element_type=jnp.float32,
                    precision=jax.lax.Precision.HIGHEST)


def _expand_est(est: jax.Array, rows: jax.Array, T: int, K: int) -> jax.Array:
  """E_up before masking: (N,H,B,K) -> (N,H,B,T), E_up[t,s] = E[t, bin_t(s)]."""
  bins = bin_index(rows[:, None], jnp.arange(T)[None, :], K)
  bins = jnp.clip(bins, 0, K - 1)  # s > t gives bins >= K; those entries are masked later
  return jnp.take_along_axis(est, jnp.broadcast_to(bins, est.shape[:2] + bins.shape), axis=-1)


def _map_terms(log_a, a, logits, visible, row_w):
  """(KL sum, squared-error sum) of a student map, softmax of `logits` over the visible keys,
  against the teacher's (log A, A), rows weighted by row_w.

  KL(A || p) per row is sum A log A - sum A s + lse(s) sum A: linear in the student's scores s
  but for the row's log-sum-exp, which keeps the backward to p - A (and one exp per entry).
  """
  s = jnp.where(visible, logits, NEG)
  top = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  e = jnp.where(visible, jnp.exp(s - top), 0.0)
  total = jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)
  p = e / total
  lse = (top + jnp.log(total))[..., 0]
  kl = jnp.sum(jnp.where(visible, a * (log_a - s), 0.0), axis=-1) + lse * jnp.sum(a, axis=-1)
  return _sum(kl * row_w[..., 0]), _sum(jnp.square(p - a) * row_w)


def _teacher_map(qt, kt, key_real, rows):
  """The teacher's attention of one block of query rows, no gradient: visible (.., B, T) bool,
  log A and A (N,H,B,T) fp32 (A = 0 where not visible)."""
  T = kt.shape[2]
  visible = (jnp.arange(T)[None, :] <= rows[:, None])[None, None]  # (1,1,B,T)
  if key_real is not None:
    visible = visible & key_real[:, None, None, :]
  log_a, a = jax.lax.stop_gradient(_masked_softmax(_scores(qt, kt), visible))
  return visible, log_a, a


PREFIX_CHUNK = 32  # keys per chunk of the two-level prefix sum


def _prefix_sum(x: jax.Array) -> jax.Array:
  """Inclusive prefix sum over the last axis, in two levels: within chunks of PREFIX_CHUNK keys
  by a small triangular matmul, then across the chunk totals (on CPU 3x faster than
  `jnp.cumsum`, whose reduce_window spans the whole axis)."""
  T = x.shape[-1]
  c = PREFIX_CHUNK
  if T <= c:
    return jnp.cumsum(x, axis=-1)
  n = -(-T // c)
  xr = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n * c - T)]).reshape(x.shape[:-1] + (n, c))
  upper = jnp.triu(jnp.ones((c, c), x.dtype))  # upper[i, j] = 1 for i <= j
  inner = jnp.einsum("...ni,ij->...nj", xr, upper, precision=jax.lax.Precision.HIGHEST)
  totals = inner[..., -1]
  before = jnp.cumsum(totals, axis=-1) - totals
  return (inner + before[..., None]).reshape(x.shape[:-1] + (n * c,))[..., :T]


def _pool_bins(x, rows, K):
  """Per row t, the sums of x over the keys of each of its K bins: (..., B, T) -> (..., B, K).

  Bin b of row t covers keys [start, end) (`bins.row_bounds`, all <= t); the sums are
  differences of an exclusive prefix sum, so each key is counted once.
  """
  T = x.shape[-1]
  prefix = jnp.pad(_prefix_sum(x), [(0, 0)] * (x.ndim - 1) + [(1, 0)])
  starts, ends = (jnp.clip(b, 0, T) for b in row_bounds(rows, K))  # (B, K)
  take = lambda idx: jnp.take_along_axis(prefix, jnp.broadcast_to(idx, x.shape[:-1] + (K,)),
                                         axis=-1)
  return take(ends) - take(starts)


def _bin_counts(key_real, rows, K, T):
  """Visible keys per bin of each row: (N|1, 1, B, K) fp32 (exact small integers)."""
  if key_real is None:
    starts, ends = (jnp.clip(b, 0, T) for b in row_bounds(rows, K))
    return (ends - starts).astype(jnp.float32)[None, None]
  real = jnp.broadcast_to(key_real[:, None, None, :], (key_real.shape[0], 1, rows.shape[0], T))
  return jnp.round(_pool_bins(real.astype(jnp.float32), rows, K))


def _teacher_bins(visible, log_a, a, key_real, rows, K):
  """What the compressed terms need of one block's teacher map (no gradient): the teacher's
  mass per bin A_b and the visible keys per bin n_b (N,H,B,K); per row sum_s A log A and the
  within-bin squared deviation sum_s (A_s - A_b / n_b)^2 (N,H,B)."""
  neg_entropy = jnp.sum(jnp.where(visible, a * log_a, 0.0), axis=-1)
  mass = _pool_bins(a, rows, K)
  count = jnp.broadcast_to(_bin_counts(key_real, rows, K, a.shape[-1]), mass.shape)
  spread = jnp.sum(jnp.square(a), axis=-1) - jnp.sum(_per_key(mass, count) * mass, axis=-1)
  return mass, count, neg_entropy, jnp.maximum(spread, 0.0)


def _per_key(mass, count):
  """A_b / n_b, 0 in empty bins."""
  return jnp.where(count > 0, mass / jnp.maximum(count, 1.0), 0.0)


def _compressed_terms(est, mass, count, neg_entropy, spread, row_w):
  """(KL sum, squared-error sum) of softmax_s(E_up) against the teacher, in the K bins.

  softmax over the T keys of E_up gives every visible key of bin b the same probability
  p_b = exp(E_b) / sum_b' n_b' exp(E_b'), so with the teacher's bin mass A_b:
    KL(A || p) = sum_s A log A - sum_b A_b log p_b,
    sum_s (p_s - A_s)^2 = sum_b n_b (p_b - A_b / n_b)^2 + sum_s (A_s - A_b / n_b)^2:
  the numbers of the T x T form, with the gradient of E in O(K) per row.
  est, mass, count: (N,H,B,K); neg_entropy, spread: (N,H,B) (teacher, no gradient); row_w (N,B).
  """
  occupied = count > 0
  log_z = jax.nn.logsumexp(jnp.where(occupied, est + jnp.log(jnp.maximum(count, 1.0)), NEG),
                           axis=-1, keepdims=True)
  log_p = jnp.where(occupied, est - log_z, 0.0)
  p = jnp.where(occupied, jnp.exp(log_p), 0.0)
  w = row_w[:, None, :]
  kl = neg_entropy - jnp.sum(mass * log_p, axis=-1)
  se = jnp.sum(count * jnp.square(p - _per_key(mass, count)), axis=-1) + spread
  return _sum(kl * w), _sum(se * w)


def _block_terms(kt, ks, key_real, qt, qs, rows, row_w, *, K, bins: bool, prob: bool = True):
  """One block of query rows: L_prob's sums, and the teacher's per-bin statistics.

  kt, ks: (N,H,T,d) keys; key_real: (N,T) bool or None; qt, qs: (N,H,B,d) queries (pre-scaled);
  rows: (B,) query indices; row_w: (N,B) 1.0 for counted rows.
  -> ((2,) fp32 [KL prob, SE prob] sums over the block, `_teacher_bins` of the block (no
  gradient) when `bins`, else None). L_prob compares two T x T maps; L_approx and the kept
  mass need only the teacher's bins (`_compressed_terms`), taken outside the block loop.
  """
  visible, log_a, a = _teacher_map(qt, kt, key_real, rows)
  w = row_w[:, None, :, None]  # (N,1,B,1)
  if prob:
    kl_p, se_p = _map_terms(log_a, a, _scores(qs, ks), visible, w)
  else:
    kl_p = se_p = jnp.zeros((), jnp.float32)
  stats = None
  if bins:
    stats = jax.lax.stop_gradient(_teacher_bins(visible, log_a, a, key_real, rows, K))
  return jnp.stack([kl_p, se_p]), stats


def _dense_block_sums(kt, ks, key_real, qt, qs, est, mask, rows, row_w, *, K):
  """The five loss sums of a block of query rows by the spec's T x T formula, E_up and the
  kept mask expanded to every key (the reference the compressed form is tested against):
  (5,) fp32 [KL est, SE est, KL prob, SE prob, teacher mass on kept keys]."""
  T = kt.shape[2]
  visible, log_a, a = _teacher_map(qt, kt, key_real, rows)
  w = row_w[:, None, :, None]  # (N,1,B,1)
  kl_p, se_p = _map_terms(log_a, a, _scores(qs, ks), visible, w)
  if est is None:
    kl_e = se_e = jnp.zeros((), jnp.float32)
  else:
    e_up = _expand_est(est, rows, T, K)
    kl_e, se_e = _map_terms(log_a, a, e_up, visible, w)
  if mask is None:
    kept = jnp.zeros((), jnp.float32)
  else:
    kept_keys = _expand_est(mask, rows, T, K) & visible
    kept = jax.lax.stop_gradient(_sum(jnp.where(kept_keys, a, 0.0) * w))
  return jnp.stack([kl_e, se_e, kl_p, se_p, kept])


def _layer_inputs(teacher_aux, student_aux, K, key_mask):
  """fp32 inputs (teacher stop_gradient'ed), est or None, row weights (N,T), key mask."""
  # k keeps its Hkv heads in the aux (grouped-query attention): one copy per query head here,
  # O(T) like q (the T x T maps are built per query block below)
  qt, qs = _teacher(teacher_aux["q"]), _f32(student_aux["q"])
  kt = repeat_kv(_teacher(teacher_aux["k"]), qt.shape[1])
  ks = repeat_kv(_f32(student_aux["k"]), qs.shape[1])
  if qt.shape != qs.shape or kt.shape != ks.shape or qt.shape != kt.shape:
    raise ValueError(f"q/k shapes differ: teacher {qt.shape}, {kt.shape}; "
                     f"student {qs.shape}, {ks.shape}")
  est = student_aux.get("est_logits")
  if est is not None:
    est = _f32(est)
    if est.shape != qs.shape[:3] + (K,):
      raise ValueError(f"est_logits shape {est.shape}, expected {qs.shape[:3] + (K,)} (K={K})")
  mask = student_aux.get("compressed_mask")
  if mask is not None and mask.shape != qs.shape[:3] + (K,):
    raise ValueError(f"compressed_mask shape {mask.shape}, expected {qs.shape[:3] + (K,)}")
  N, _, T, _ = qs.shape
  if key_mask is None:
    key_real, row_w = None, jnp.ones((N, T), jnp.float32)
  else:
    key_real = jnp.asarray(key_mask, bool)
    if key_real.shape != (N, T):
      raise ValueError(f"key_mask shape {key_real.shape}, expected {(N, T)}")
    row_w = key_real.astype(jnp.float32)
  return qt, kt, qs, ks, est, mask, key_real, row_w


def _finish(sums, teacher_aux, student_aux, row_w, H, T):
  """Turn the four map sums into the per-layer loss dict."""
  rows = H * jnp.sum(row_w)  # N*H*T without padding
  kl_e, kl_p = sums[0] / rows, sums[2] / rows
  se_e, se_p = sums[1] / (rows * T), sums[3] / (rows * T)
  ct, cs = _teacher(teacher_aux["context"]), _f32(student_aux["context"])
  if ct.shape != cs.shape:
    raise ValueError(f"context shapes differ: teacher {ct.shape}, student {cs.shape}")
  w = row_w[:, None, :, None]
  context = _sum(jnp.square(cs - ct) * w) / (rows * ct.shape[-1])
  approx = KL_WEIGHT * kl_e + se_e
  prob = KL_WEIGHT * kl_p + se_p
  out = {"approx": approx, "prob": prob, "context": context, "total": approx + prob + context}
  if "compressed_mask" in student_aux:
    out["coverage"] = sums[4] / rows  # mean over rows of the teacher's mass on kept keys
  return out


def attention_layer_loss(teacher_aux: Mapping[str, jax.Array], student_aux: Mapping[str, jax.Array],
                         *, K: int, query_block: int | None = None,
                         key_mask: jax.Array | None = None, prob: bool = True
                         ) -> dict[str, jax.Array]:
  """Per-layer loss {"approx","prob","context","total"} (fp32 scalars), O(query_block * T) memory.

  prob=False leaves L_prob out (0): the student's scores are the teacher's when the layer is
  trained on the teacher's own q, k (`training.step`'s layerwise mode), so it is a constant.

  teacher_aux: "q", "k", "context" (N,H,T,d), q pre-scaled; student_aux: the same plus
  "est_logits" (N,H,T,K) (absent: approx = 0, e.g. a dense student layer). key_mask: (N,T) bool.
  T need not be a multiple of query_block (default: `blocked_attention.pick_block`): padded
  rows are left out of every sum. Blocks of query rows are grouped by the keys they can see
  (`blocked_attention.causal_groups`), so the T x T maps of L_prob cover about the causal
  triangle, not the square.
  With "compressed_mask" (N,H,T,K) in student_aux the dict also holds "coverage": the mean over
  rows of the teacher's attention mass on the keys SEA kept (a diagnostic, no gradient).
  """
  qt, kt, qs, ks, est, mask, key_real, row_w = _layer_inputs(teacher_aux, student_aux, K,
                                                             key_mask)
  N, H, T, _ = qs.shape
  B = max(1, min(query_block or pick_block(N * H, T, qs.shape[-1], score_bytes=SCORE_BYTES // 2,
                                                smallest=16), T))
  bins = est is not None or mask is not None
  block_fn = jax.checkpoint(functools.partial(_block_terms, K=K, bins=bins, prob=prob))

  def blocks(x, first, n):  # rows of blocks first..first+n-1 of (N,H,T,...) -> (n,N,H,B,...)
    x = x[:, :, first * B:(first + n) * B]
    x = jnp.pad(x, [(0, 0), (0, 0), (0, n * B - x.shape[2])] + [(0, 0)] * (x.ndim - 3))
    return jnp.moveaxis(x.reshape(x.shape[:2] + (n, B) + x.shape[3:]), 2, 0)

  def unblock(x, rows):  # (n,N,H,B,...) -> (N,H,rows,...)
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(x.shape[:2] + (x.shape[2] * B,) + x.shape[4:])[:, :, :rows]

  prob = jnp.zeros((2,), jnp.float32)
  stats = []
  with jax.named_scope("attention_layer_loss"):
    for first, n, L in causal_groups(T, B):
      kt_l, ks_l = kt[:, :, :L], ks[:, :, :L]
      real_l = None if key_real is None else key_real[:, :L]

      def body(acc, xs, kt_l=kt_l, ks_l=ks_l, real_l=real_l):
        qt_b, qs_b, rows_b, w_b = xs
        sums, block_stats = block_fn(kt_l, ks_l, real_l, qt_b, qs_b, rows_b, w_b)
        return acc + sums, block_stats

      rows = first * B + jnp.arange(n * B, dtype=jnp.int32).reshape(n, B)
      w = jnp.pad(row_w[:, first * B:(first + n) * B], [(0, 0), (0, n * B - min(n * B, T - first * B))])
      prob, group_stats = jax.lax.scan(body, prob, (blocks(qt, first, n), blocks(qs, first, n),
                                                    rows, jnp.moveaxis(w.reshape(N, n, B), 1, 0)))
      if bins:  # teacher mass per bin etc. of these rows, over the keys they see
        stats.append([unblock(x, min(n * B, T - first * B)) for x in group_stats])
    zero = jnp.zeros((), jnp.float32)
    kl_e = se_e = kept = zero
    if bins:
      mass, count, neg_entropy, spread = (jnp.concatenate(xs, axis=2) for xs in zip(*stats))
      if est is not None:
        kl_e, se_e = _compressed_terms(est, mass, count, neg_entropy, spread, row_w)
      if mask is not None:  # a diagnostic, no gradient: the teacher's mass on the kept keys
        kept = _sum(jnp.where(mask, mass, 0.0) * row_w[:, None, :, None])
    sums = jnp.stack([kl_e, se_e, prob[0], prob[1], kept])
    return _finish(sums, teacher_aux, student_aux, row_w, H, T)


def teacher_bin_mass(teacher_aux: Mapping[str, jax.Array], *, K: int,
                     query_block: int = 128) -> jax.Array:
  """The teacher's attention mass on each of every row's K bins: (N,H,T,K) fp32, one block of
  query rows at a time (O(query_block * T) per head). What an oracle estimator would predict:
  the grouped top-k of it is the best mask any estimator can keep at that k."""
  q = _teacher(teacher_aux["q"])
  k = repeat_kv(_teacher(teacher_aux["k"]), q.shape[1])
  N, H, T, d = q.shape
  B = min(query_block, T)
  n = -(-T // B)
  qb = jnp.pad(q, [(0, 0), (0, 0), (0, n * B - T), (0, 0)]).reshape(N, H, n, B, d)

  def one(i):
    rows = i * B + jnp.arange(B, dtype=jnp.int32)
    visible, log_a, a = _teacher_map(qb[:, :, i], k, None, rows)
    return _teacher_bins(visible, log_a, a, None, rows, K)[0]

  mass = jax.lax.map(one, jnp.arange(n))  # (n, N, H, B, K)
  return jnp.moveaxis(mass, 0, 2).reshape(N, H, n * B, K)[:, :, :T]


def dense_attention_layer_loss(teacher_aux: Mapping[str, jax.Array],
                               student_aux: Mapping[str, jax.Array], *, K: int,
                               key_mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """`attention_layer_loss` computed with whole (N,H,T,T) maps (reference; O(T^2) memory)."""
  qt, kt, qs, ks, est, mask, key_real, row_w = _layer_inputs(teacher_aux, student_aux, K,
                                                             key_mask)
  _, H, T, _ = qs.shape
  rows = jnp.arange(T, dtype=jnp.int32)
  sums = _dense_block_sums(kt, ks, key_real, qt, qs, est, mask, rows, row_w, K=K)
  return _finish(sums, teacher_aux, student_aux, row_w, H, T)


def _token_weights(shape, targets=None, weights=None) -> jax.Array:
  """(N,T) fp32 weights: `weights` (default 1), zero where targets < 0."""
  w = jnp.ones(shape, jnp.float32) if weights is None else _f32(weights)
  if targets is not None:
    w = jnp.where(targets >= 0, w, 0.0)
  return w


def _weighted_mean(x: jax.Array, w: jax.Array) -> jax.Array:
  return _sum(x * w) / jnp.maximum(_sum(w), 1e-12)


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  weights: jax.Array | None = None) -> jax.Array:
  """Mean next-token CE in fp32: logits (N,T,V) (any float dtype), targets (N,T) int.

  targets[:, t] is the token logits[:, t] predicts (shift before calling); targets < 0 are
  ignored; weights (N,T) optional, mean = sum(w * ce) / sum(w).
  """
  logits = _f32(logits)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
  return _weighted_mean(lse - picked, _token_weights(targets.shape, targets, weights))


def lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Plain pre-training loss: `cross_entropy`."""
  return cross_entropy(logits, targets, weights)


def logit_kl(teacher_logits: jax.Array, student_logits: jax.Array,
             weights: jax.Array | None = None) -> jax.Array:
  """KL(teacher || student) over the vocabulary, (N,T,V) each; batchmean over N*T tokens.

  weights (N,T) optional: weighted mean over tokens instead. Teacher side is stop_gradient'ed.
  """
  log_t = jax.nn.log_softmax(_teacher(teacher_logits), axis=-1)
  p_t = jnp.exp(log_t)
  s = _f32(student_logits)
  # sum p_T (log p_T - s + lse(s)): linear in s but for lse, so the backward is p_S - p_T
  kl = (jnp.sum(p_t * (log_t - s), axis=-1)
        + jax.nn.logsumexp(s, axis=-1) * jnp.sum(p_t, axis=-1))  # p_T = 0 gives 0 * finite
  return _weighted_mean(kl, _token_weights(kl.shape, None, weights))


def hidden_mse(teacher_hiddens: Sequence[jax.Array], student_hiddens: Sequence[jax.Array],
               weights: jax.Array | None = None) -> jax.Array:
  """Mean over the L+1 hidden states (N,T,D) of MSE(h_T, h_S); weights (N,T) optional."""
  if len(teacher_hiddens) != len(student_hiddens) or not teacher_hiddens:
    raise ValueError(f"{len(teacher_hiddens)} teacher vs {len(student_hiddens)} student hiddens")
  terms = []
  for ht, hs in zip(teacher_hiddens, student_hiddens):
    se = jnp.mean(jnp.square(_f32(hs) - _teacher(ht)), axis=-1)  # (N,T)
    terms.append(_weighted_mean(se, _token_weights(se.shape, None, weights)))
  return jnp.mean(jnp.stack(terms))


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Weights of the global distillation loss (SEA_SPEC §2)."""
  ce: float = 0.1
  hidden: float = 5.0
  kl: float = 0.2
  layer: float = 1.0


def _field(out: Any, name: str):
  return out[name] if isinstance(out, Mapping) else getattr(out, name)


def distillation_loss(teacher_out: Any, student_out: Any, targets: jax.Array, *, K: int,
                      weights: LossWeights = LossWeights(), query_block: int | None = None,
                      key_mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Global SEA distillation loss -> (total, terms), all fp32 scalars.

  teacher_out/student_out: dicts or objects with "logits" (N,T,V), "hidden_states" (L+1 of
  (N,T,D)), "attn_aux" (L aux dicts). targets (N,T) aligned with logits (< 0 ignored).
  key_mask (N,T) bool: padding tokens are left out of every term.
  terms: "ce", "hidden", "kl", "layer", "approx", "prob", "context" (layer terms averaged over
  layers), "total".
  """
  w_tok = None if key_mask is None else jnp.asarray(key_mask, bool).astype(jnp.float32)
  s_logits = _field(student_out, "logits")
  ce = cross_entropy(s_logits, targets, w_tok)
  kl = logit_kl(_field(teacher_out, "logits"), s_logits, w_tok)
  hidden = hidden_mse(_field(teacher_out, "hidden_states"), _field(student_out, "hidden_states"),
                      w_tok)
  t_aux, s_aux = _field(teacher_out, "attn_aux"), _field(student_out, "attn_aux")
  if len(t_aux) != len(s_aux) or not t_aux:
    raise ValueError(f"{len(t_aux)} teacher vs {len(s_aux)} student attention aux dicts")
  per_layer = [attention_layer_loss(ta, sa, K=K, query_block=query_block, key_mask=key_mask)
               for ta, sa in zip(t_aux, s_aux)]
  layer = {name: jnp.mean(jnp.stack([d[name] for d in per_layer]))
           for name in ("approx", "prob", "context", "total")}
  total = (weights.ce * ce + weights.hidden * hidden + weights.kl * kl
           + weights.layer * layer["total"])
  terms = {"ce": ce, "hidden": hidden, "kl": kl, "layer": layer["total"], "approx": layer["approx"],
           "prob": layer["prob"], "context": layer["context"], "total": total}
  terms.update(layer_diagnostics(per_layer, s_aux, key_mask))
  return total, terms


def layerwise_loss(teacher_aux: Sequence[Mapping[str, jax.Array]],
                   student_aux: Sequence[Mapping[str, jax.Array]], *, K: int,
                   query_block: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The attention warm-up's loss: each student layer ran on its teacher layer's own q, k, v
  (so L_prob is constant and left out) -> (mean over layers of L_approx + L_context, terms).

  terms: "approx", "context" (means over layers), "total", and `layer_diagnostics`.
  """
  if len(teacher_aux) != len(student_aux) or not teacher_aux:
    raise ValueError(f"{len(teacher_aux)} teacher vs {len(student_aux)} student aux dicts")
  per_layer = [attention_layer_loss(ta, sa, K=K, query_block=query_block, prob=False)
               for ta, sa in zip(teacher_aux, student_aux)]
  terms = {name: jnp.mean(jnp.stack([d[name] for d in per_layer]))
           for name in ("approx", "context")}
  terms["total"] = terms["approx"] + terms["context"]
  terms.update(layer_diagnostics(per_layer, student_aux))
  return terms["total"], terms


def layer_diagnostics(per_layer: Sequence[Mapping[str, jax.Array]],
                      student_aux: Sequence[Mapping[str, jax.Array]],
                      key_mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-layer diagnostics (no gradient): "coverage_{i}" (teacher mass on kept keys),
  "s_prob_{i}", "s_mix_{i}" (gate means over real tokens and heads) for each SEA layer i."""
  out = {}
  for i, (losses_i, aux) in enumerate(zip(per_layer, student_aux)):
    if "coverage" in losses_i:
      out[f"coverage_{i}"] = losses_i["coverage"]
    for gate in ("s_prob", "s_mix"):
      if gate in aux:
        g = jax.lax.stop_gradient(_f32(aux[gate]))  # (N,H,T)
        w = (jnp.ones((g.shape[0], g.shape[2]), jnp.float32) if key_mask is None
             else jnp.asarray(key_mask, bool).astype(jnp.float32))
        out[f"{gate}_{i}"] = _sum(g * w[:, None, :]) / jnp.maximum(g.shape[1] * _sum(w), 1.0)
  return out
