"""Distillation and language-model losses (SEA_SPEC §2), all in fp32.

Per-layer attention loss, for one decoder layer (teacher A^T = causal softmax of q_T k_T^T):
  L_approx  = 0.1 KL(A^T || softmax_s(E_up)) + MSE(softmax_s(E_up), A^T)
  L_prob    = 0.1 KL(A^T || softmax_s(q_S k_S^T)) + MSE(softmax_s(q_S k_S^T), A^T)
  L_context = MSE(teacher context, student context)
E_up[t, s] = E[t, bin_t(s)] for s <= t, -large beyond t (E = "est_logits", (N,H,T,K)).
KL is `batchmean` over the N*H*T rows (0 log 0 = 0, masked entries give 0); the map MSEs
average over all N*H*T*T entries, the zero upper triangle included.

The T x T maps are never held whole: `attention_layer_loss` scans over blocks of query rows,
each block body under `jax.checkpoint`, so forward and backward hold O(block * T) per head.
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

from sea_jax.attention import repeat_kv
from sea_jax.sea.bins import bin_index

NEG = -1e30  # "-large": exp(NEG - lse) is exactly 0 in fp32
KL_WEIGHT = 0.1  # weight of the KL term inside L_approx and L_prob


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _teacher(x) -> jax.Array:
  return jax.lax.stop_gradient(_f32(x))


def _sum(x: jax.Array) -> jax.Array:
  """Sum over the last axis first, then the rest (shorter fp32 accumulation chains)."""
  return jnp.sum(jnp.sum(x, axis=-1))


def _masked_log_softmax(logits: jax.Array, visible: jax.Array) -> jax.Array:
  """log softmax over the last axis of the visible entries; -large (finite) elsewhere."""
  return jax.nn.log_softmax(jnp.where(visible, logits, NEG), axis=-1)


def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
  """(N,H,B,d) x (N,H,T,d) -> (N,H,B,T) fp32."""
  return jnp.einsum("nhbd,nhsd->nhbs", q, k, preferred_element_type=jnp.float32,
                    precision=jax.lax.Precision.HIGHEST)


def _expand_est(est: jax.Array, rows: jax.Array, T: int, K: int) -> jax.Array:
  """E_up before masking: (N,H,B,K) -> (N,H,B,T), E_up[t,s] = E[t, bin_t(s)]."""
  bins = bin_index(rows[:, None], jnp.arange(T)[None, :], K)
  bins = jnp.clip(bins, 0, K - 1)  # s > t gives bins >= K; those entries are masked later
  return jnp.take_along_axis(est, jnp.broadcast_to(bins, est.shape[:2] + bins.shape), axis=-1)


def _map_terms(log_a, a, log_p, visible, row_w):
  """(KL sum, squared-error sum) of one student map vs the teacher's, rows weighted by row_w."""
  p = jnp.where(visible, jnp.exp(log_p), 0.0)
  kl = jnp.where(visible, a * (log_a - log_p), 0.0)
  return _sum(kl * row_w), _sum(jnp.square(p - a) * row_w)


def _block_sums(kt, ks, key_real, qt, qs, est, mask, rows, row_w, *, K):
  """Loss sums over one block of query rows.

  kt, ks: (N,H,T,d) keys; key_real: (N,T) bool or None; qt, qs: (N,H,B,d) queries (pre-scaled);
  est: (N,H,B,K) or None; mask: the student's compressed mask (N,H,B,K) bool or None;
  rows: (B,) query indices; row_w: (N,B) 1.0 for counted rows.
  -> (5,) fp32: [KL est, SE est, KL prob, SE prob, teacher mass on kept keys] sums over the block.
  """
  T = kt.shape[2]
  visible = (jnp.arange(T)[None, :] <= rows[:, None])[None, None]  # (1,1,B,T)
  if key_real is not None:
    visible = visible & key_real[:, None, None, :]
  w = row_w[:, None, :, None]  # (N,1,B,1)
  log_a = jax.lax.stop_gradient(_masked_log_softmax(_scores(qt, kt), visible))
  a = jnp.where(visible, jnp.exp(log_a), 0.0)
  kl_p, se_p = _map_terms(log_a, a, _masked_log_softmax(_scores(qs, ks), visible), visible, w)
  if est is None:
    kl_e = se_e = jnp.zeros((), jnp.float32)
  else:
    e_up = _expand_est(est, rows, T, K)
    kl_e, se_e = _map_terms(log_a, a, _masked_log_softmax(e_up, visible), visible, w)
  if mask is None:
    kept = jnp.zeros((), jnp.float32)
  else:  # a diagnostic, no gradient: how much of the teacher's attention the kept keys hold
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
                         *, K: int, query_block: int = 128,
                         key_mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-layer loss {"approx","prob","context","total"} (fp32 scalars), O(query_block * T) memory.

  teacher_aux: "q", "k", "context" (N,H,T,d), q pre-scaled; student_aux: the same plus
  "est_logits" (N,H,T,K) (absent: approx = 0, e.g. a dense student layer). key_mask: (N,T) bool.
  T need not be a multiple of query_block: padded rows are left out of every sum.
  With "compressed_mask" (N,H,T,K) in student_aux the dict also holds "coverage": the mean over
  rows of the teacher's attention mass on the keys SEA kept (a diagnostic, no gradient).
  """
  qt, kt, qs, ks, est, mask, key_real, row_w = _layer_inputs(teacher_aux, student_aux, K,
                                                             key_mask)
  N, H, T, _ = qs.shape
  B = max(1, min(query_block, T))
  nb = -(-T // B)
  pad = nb * B - T

  def blocks(x):  # (N,H,T,...) -> (nb,N,H,B,...), rows zero-padded
    x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
    return jnp.moveaxis(x.reshape(x.shape[:2] + (nb, B) + x.shape[3:]), 2, 0)

  rows = jnp.arange(nb * B, dtype=jnp.int32).reshape(nb, B)
  w_blocks = jnp.moveaxis(jnp.pad(row_w, [(0, 0), (0, pad)]).reshape(N, nb, B), 1, 0)
  est_blocks = None if est is None else blocks(est)
  mask_blocks = None if mask is None else blocks(mask)
  block_fn = jax.checkpoint(functools.partial(_block_sums, K=K))

  def body(acc, xs):
    qt_b, qs_b, est_b, mask_b, rows_b, w_b = xs
    return acc + block_fn(kt, ks, key_real, qt_b, qs_b, est_b, mask_b, rows_b, w_b), None

  with jax.named_scope("attention_layer_loss"):
    xs = (blocks(qt), blocks(qs), est_blocks, mask_blocks, rows, w_blocks)
    sums, _ = jax.lax.scan(body, jnp.zeros((5,), jnp.float32), xs)
    return _finish(sums, teacher_aux, student_aux, row_w, H, T)


def dense_attention_layer_loss(teacher_aux: Mapping[str, jax.Array],
                               student_aux: Mapping[str, jax.Array], *, K: int,
                               key_mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """`attention_layer_loss` computed with whole (N,H,T,T) maps (reference; O(T^2) memory)."""
  qt, kt, qs, ks, est, mask, key_real, row_w = _layer_inputs(teacher_aux, student_aux, K,
                                                             key_mask)
  _, H, T, _ = qs.shape
  rows = jnp.arange(T, dtype=jnp.int32)
  sums = _block_sums(kt, ks, key_real, qt, qs, est, mask, rows, row_w, K=K)
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
  log_s = jax.nn.log_softmax(_f32(student_logits), axis=-1)
  kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)  # p_T = 0 gives 0 * finite = 0
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
                      weights: LossWeights = LossWeights(), query_block: int = 128,
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
