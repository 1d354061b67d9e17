"""SEA and Performer attention cores behind the seam of `sea_jax.attention`.

Both take the model's projections q (N,H,T,d) scaled by d^-1/2 and k, v (N,Hkv,T,d) (after
RoPE in the Llama family) and return (context (N,H,T,d), aux). Under grouped-query attention
the Performer branch, the estimator and the causal mean work per query head (each reads its kv
head; O(T) memory either way), and the sparse attention reads kv head h // G without copies.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import sparse_attention as pallas_sparse_attention
from sea_jax.config import AttentionShape, ConfigError, check_sea_K
from sea_jax.layers import normal_init, param
from sea_jax.ops.bins import nonempty_bins
from sea_jax.ops.blocked_attention import blocked_attention
from sea_jax.ops.dense import repeat_kv
from sea_jax.ops.pooled_keys import key_prefix_sums, pooled_key_logits, pooled_key_row
from sea_jax.ops.sparse import sparse_attention
from sea_jax.sea.decode import (PerformerState, SEAState, attend_kept, kept_key_bound,
                                to_left_padding, to_right_padding)
from sea_jax.sea.estimator import HISTORY_ROWS, Estimator, PooledKeyMix, history_at
from sea_jax.sea.performer import (causal_linear_attention, linear_attention_state,
                                   linear_attention_step, num_random_features,
                                   orthogonal_random_features, relu_features)
from sea_jax.sea.topk import check_k, grouped_topk_mask, grouped_topk_row
from sea_jax.sharding import per_shard


class RandomFeatures(nnx.Variable):
  """Fixed (m, d) orthogonal random features: checkpointed, never trained (not an nnx.Param)."""


def _random_features(rngs: nnx.Rngs, head_dim: int, nbf: float) -> RandomFeatures:
  m = num_random_features(head_dim, nbf)
  W = orthogonal_random_features(rngs.params(), m, head_dim)
  return RandomFeatures(W, out_sharding=(None, "head_dim"), eager_sharding=False)


# On CPU the tile list's per-tile scan costs more than it saves below this many query blocks:
# one SEA distillation step of the small recipe (T = 512, 4 query blocks) runs 1.66x faster
# with the blocked form, and the tile list wins from T = 2048 at opt-125m's heads (0.71x the
# blocked form's fwd+bwd; 0.51x at 4096). BENCHMARKS.md, "Which sparse path auto picks".
AUTO_TILE_MIN_BLOCKS = 16


def resolve_sparse_impl(impl: str, T: int, query_block: int) -> str:
  """The implementation `impl` runs on this backend at length T: "auto" is pallas on GPU/TPU,
  and on CPU the tile list ("xla") from AUTO_TILE_MIN_BLOCKS query blocks, "blocked" below."""
  if impl == "auto":
    if jax.default_backend() in ("gpu", "tpu"):
      return "pallas"
    return "xla" if -(-T // max(1, query_block)) >= AUTO_TILE_MIN_BLOCKS else "blocked"
  return impl


def sparse_dispatch(impl: str, q, k, v, compressed_mask, *, query_block: int):
  """Runs the sparse attention implementation `impl` ("auto", "xla", "blocked" or "pallas");
  q (N,H,T,d), k, v (N,Hkv,T,d), M̂ (N,H,T,K) -> (N,H,T,d). All give the same result.
  Under an ambient mesh each device runs it on its own (batch, head) shard (`per_shard`)."""
  impl = resolve_sparse_impl(impl, q.shape[2], query_block)
  if impl == "xla":
    fn = lambda q, k, v, cm: sparse_attention(q, k, v, cm, query_block=query_block)  # noqa: E731
  elif impl == "blocked":
    fn = lambda q, k, v, cm: blocked_attention(q, k, v, compressed_mask=cm)  # noqa: E731
  elif impl == "pallas":
    if jax.default_backend() not in ("gpu", "tpu"):
      raise ConfigError(f"sparse_impl 'pallas' needs a GPU or TPU (this is "
                        f"{jax.default_backend()}); choose 'auto', 'xla' or 'blocked'")
    fn = pallas_sparse_attention
  else:
    raise ConfigError(f"unknown sparse_impl {impl!r}; choose 'auto', 'xla', 'blocked' or "
                      "'pallas'")
  return per_shard(fn, q, k, v, compressed_mask)


def causal_mean(v: jax.Array) -> jax.Array:
  """C_avg[t] = mean(v[0..t]) in fp32: (N,H,T,d) -> (N,H,T,d)."""
  T = v.shape[2]
  dtype = jnp.promote_types(v.dtype, jnp.float32)
  counts = jnp.arange(1, T + 1, dtype=dtype)[:, None]
  return jnp.cumsum(v.astype(dtype), axis=2) / counts


def masked_bin_softmax(est_logits: jax.Array) -> jax.Array:
  """Â = softmax over all K of Ê, fp32, with empty bins then set to 0: (N,H,T,K) -> same.

  Not renormalised over the non-empty bins (SEA_SPEC §1.4): in rows with t + 1 < K each head's
  non-empty cells keep the mass the softmax over K gave them, so heads compete for the grouped
  budget on that scale; a row's sum is then below 1.
  """
  T, K = est_logits.shape[-2:]
  nonempty = nonempty_bins(T, K)
  dtype = jnp.promote_types(est_logits.dtype, jnp.float32)
  probs = jax.nn.softmax(est_logits.astype(dtype), axis=-1)
  return jnp.where(nonempty, probs, 0.0)


def position_values(table: jax.Array, T: int, max_positions: int) -> jax.Array:
  """P's rows for positions 0..T-1: (R, d) -> (T, d) (`position_values_at`)."""
  if table.shape[0] >= max_positions:
    return table[:T]
  return position_values_at(table, jnp.arange(T, dtype=jnp.int32), max_positions)


def position_values_at(table: jax.Array, positions: jax.Array, max_positions: int) -> jax.Array:
  """P's rows for int positions (any shape S): (R, d) -> (*S, d).

  R == max_positions: row s for position s (OPT: one learned row per position). R <
  max_positions (long context, SEAConfig.position_rows): position s reads the table by linear
  interpolation at u = s (R - 1) / (max_positions - 1), clamped to the last row beyond
  max_positions.
  """
  R = table.shape[0]
  if R >= max_positions:
    return table[positions]
  u = positions.astype(jnp.float32) * ((R - 1) / max(max_positions - 1, 1))
  u = jnp.minimum(u, R - 1)
  lo = jnp.floor(u).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, R - 1)
  w = (u - lo)[..., None].astype(table.dtype)
  return table[lo] * (1 - w) + table[hi] * w


def _performer_values(pos: jax.Array, v_heads: jax.Array) -> jax.Array:
  """The Performer branch's values [P rows; v] (N,H,T,2d) in fp32 (fp64): pos broadcastable
  to v_heads (N,H,T,d)."""
  wide = jnp.promote_types(v_heads.dtype, jnp.float32)
  return jnp.concatenate([jnp.broadcast_to(pos.astype(wide), v_heads.shape),
                          v_heads.astype(wide)], axis=-1)


def _static_k(keys_per_head) -> int:
  if not isinstance(keys_per_head, (int, np.integer)):
    raise ConfigError("decoding with SEA needs a Python int sea_k (the kept-key list's length "
                      "is static)")
  return int(keys_per_head)


def _prefill_rows(cache, T: int):
  """A prefill's rows from its LayerKV (slots 0..T-1, left-padded): lengths (N,), offsets (N,)
  and valid (N, 1, T), True at each row's real positions after `to_right_padding`."""
  lengths = jnp.sum(cache.key_mask[:, :T], axis=-1).astype(jnp.int32)
  valid = jnp.arange(T, dtype=jnp.int32)[None] < lengths[:, None]
  return lengths, T - lengths, valid[:, None]


def _step_rows(cache):
  """A decode step's row positions t (N,) and left-padding offsets (N,) from its LayerKV."""
  t = jnp.sum(cache.key_mask, axis=-1).astype(jnp.int32) - 1
  return t, cache.start - t


class SEAAttention(nnx.Module):
  """SEA attention core (SEA_SPEC §1.1–1.6).

  Holds the learned position table P (rows, d) ~ N(0,1) (rows = max_positions, capped by
  SEAConfig.table_rows; see `position_values`), the fixed random features W,
  and the estimator (encoder, row decoder, causal CNN, gates). `key_mask` is accepted and
  ignored: SEA assumes right padding, where causality already hides pads from real tokens.
  `deterministic` is ignored: the reference's training-only jitter of key ranks (§1.3) is not
  implemented, so train and eval forwards are identical.
  """

  def __init__(self, *, num_heads: int, head_dim: int, max_positions: int, K: int = 256,
               k: int = 64, nbf: float = 8.0, performer_chunk: int = 128,
               query_block: int = 128, sparse_impl: str = "xla", dtype=jnp.float32,
               param_dtype=jnp.float32, position_rows: int | None = None,
               pooled_keys: bool = False, rngs: nnx.Rngs):
    check_sea_K(K)
    check_k(k)
    rows = max_positions if position_rows is None else min(position_rows, max_positions)
    self.positions = param(rngs, normal_init(1.0), (rows, head_dim),
                           ("positions", "head_dim"), param_dtype)
    self.max_positions = max_positions
    self.features = _random_features(rngs, head_dim, nbf)
    self.estimator = Estimator(head_dim, num_heads, K, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)
    self.pooled = (PooledKeyMix(num_heads, param_dtype=param_dtype, rngs=rngs) if pooled_keys
                   else None)
    self.num_heads, self.head_dim, self.K, self.k = num_heads, head_dim, K, k
    self.performer_chunk, self.query_block = performer_chunk, query_block
    self.sparse_impl = sparse_impl
    self.dtype = dtype

  @classmethod
  def from_shape(cls, shape: AttentionShape, *, rngs: nnx.Rngs) -> "SEAAttention":
    sea = shape.sea
    sea.validate()
    return cls(num_heads=shape.num_heads, head_dim=shape.head_dim,
               max_positions=shape.max_positions, K=sea.K, k=sea.k, nbf=sea.nbf,
               performer_chunk=sea.performer_chunk, query_block=sea.query_block,
               sparse_impl=sea.sparse_impl, dtype=shape.dtype, param_dtype=shape.param_dtype,
               position_rows=sea.table_rows(shape.max_positions),
               pooled_keys=sea.pooled_keys, rngs=rngs)

  def __call__(self, q, k, v, *, key_mask=None, sea_k=None, deterministic=True,
               return_aux=False):
    """q (N,H,T,d), k, v (N,Hkv,T,d) -> (C_sea (N,H,T,d) in v.dtype, aux dict)."""
    del key_mask, deterministic
    context, aux, _ = self._forward(q, k, v, sea_k, return_aux=return_aux)
    return context, aux

  def _forward(self, q, k, v, sea_k, *, return_aux=False, return_history=False):
    """`__call__`'s computation; with return_history also the CNN's conv inputs (h0, h1)."""
    N, H, T, d = q.shape
    if T > self.max_positions and self.positions[...].shape[0] >= self.max_positions:
      raise ValueError(f"sequence length {T} exceeds SEA's position table "
                       f"({self.positions[...].shape[0]} rows)")
    k_heads, v_heads = repeat_kv(k, H), repeat_kv(v, H)  # per query head (O(T) memory)
    keys_per_head = self.k if sea_k is None else sea_k
    check_k(keys_per_head)

    with jax.named_scope("sea_performer"):
      W = self.features[...]
      table = position_values(self.positions[...], T, self.max_positions)
      v_cat = _performer_values(table, v_heads)
      c_perf = causal_linear_attention(relu_features(q, W), relu_features(k_heads, W), v_cat,
                                       self.performer_chunk)
    z_in = jnp.concatenate([c_perf.astype(self.dtype), v_heads.astype(self.dtype)], axis=-1)
    est_logits, s_prob, s_mix, *history = self.estimator(z_in, return_history=return_history)
    if self.pooled is not None:
      with jax.named_scope("sea_pooled_keys"):
        est_logits = self.pooled(est_logits, pooled_key_logits(q, k, self.K))
    with jax.named_scope("sea_topk"):
      est_probs = masked_bin_softmax(est_logits)
      mask = per_shard(lambda p: grouped_topk_mask(p, keys_per_head), est_probs,
                       split_heads=False)  # heads compete for one budget per row
    with jax.named_scope("sea_sparse"):
      c_sparse = sparse_dispatch(self.sparse_impl, q, k, v, mask, query_block=self.query_block)
      c_sparse = s_prob[..., None] * c_sparse.astype(s_prob.dtype)
    with jax.named_scope("sea_mix"):
      mean = repeat_kv(causal_mean(v), H)
      context = s_mix[..., None] * c_sparse + (1.0 - s_mix[..., None]) * mean
      context = context.astype(v.dtype)
    aux = {}
    if return_aux:
      aux = {"q": q, "k": k, "context": context, "est_logits": est_logits,
             "est_probs": est_probs, "compressed_mask": mask, "s_prob": s_prob, "s_mix": s_mix}
    return context, aux, (history[0] if history else None)

  # --- decoding (`sea_jax.sea.decode`) ---

  @classmethod
  def decode_state(cls, shape: AttentionShape, batch: int, max_len: int) -> SEAState:
    """The empty decode state of one layer for `batch` rows and a cache of max_len slots."""
    H, d, K = shape.num_heads, shape.head_dim, shape.sea.K
    m = num_random_features(d, shape.sea.nbf)
    history = jnp.zeros((batch, 2 * H, HISTORY_ROWS, K // 4), shape.dtype)
    key_sums = (jnp.zeros((batch, shape.num_kv_heads, max_len + 1, d), jnp.float32)
                if shape.sea.pooled_keys else None)
    return SEAState(performer=PerformerState(S=jnp.zeros((batch, H, m, 2 * d), jnp.float32),
                                             z=jnp.zeros((batch, H, m), jnp.float32)),
                    v_sum=jnp.zeros((batch, shape.num_kv_heads, d), jnp.float32),
                    history=(history, history), key_sums=key_sums)

  def cached(self, q, k, v, cache, *, sea_k=None):
    """With a KV cache (`attention.cached_attention`): q (N,H,T,d), the new k, v (N,Hkv,T,d),
    cache a `LayerKV` whose k, v already hold them and whose state is a `SEAState` ->
    (context (N,H,T,d), the new SEAState). T > 1 is a prefill from slot 0 (the full forward);
    T == 1 one decode step over the kept keys only."""
    keys_per_head = _static_k(self.k if sea_k is None else sea_k)
    if q.shape[2] > 1:
      return self._prefill(q, k, v, cache, keys_per_head)
    return self._step(q, k, v, cache, keys_per_head)

  def _prefill(self, q, k, v, cache, keys_per_head):
    N, H, T, d = q.shape
    lengths, offsets, valid = _prefill_rows(cache, T)
    key_sums = cache.state.key_sums
    if key_sums is not None:  # over the prefill's slots 0..T-1, padding slots adding nothing
      real = cache.key_mask[:, None, :T, None]
      sums = key_prefix_sums(jnp.where(real, k, jnp.zeros((), k.dtype)))
      key_sums = jax.lax.dynamic_update_slice(key_sums, sums.astype(key_sums.dtype), (0, 0, 0, 0))
    q, k, v = (to_right_padding(x, offsets) for x in (q, k, v))
    context, _, history = self._forward(q, k, v, keys_per_head, return_history=True)
    wide = jnp.promote_types(v.dtype, jnp.float32)
    table = position_values(self.positions[...], T, self.max_positions)
    v_cat = _performer_values(table, repeat_kv(v, H))
    S, z = linear_attention_state(relu_features(repeat_kv(k, H), self.features[...]), v_cat,
                                  valid)
    old = cache.state
    state = SEAState(
        performer=PerformerState(S=S.astype(old.performer.S.dtype), z=z.astype(old.performer.z.dtype)),
        v_sum=jnp.sum(jnp.where(valid[..., None], v.astype(wide), 0.0), axis=2).astype(
            old.v_sum.dtype),
        history=tuple(history_at(h, lengths, HISTORY_ROWS).astype(o.dtype)
                      for h, o in zip(history, old.history)),
        key_sums=key_sums)
    return to_left_padding(context, offsets), state

  def _step(self, q, k, v, cache, keys_per_head):
    N, H, _, d = q.shape
    t, offsets = _step_rows(cache)
    state = cache.state
    k_heads, v_heads = repeat_kv(k, H), repeat_kv(v, H)  # (N, H, 1, d)
    with jax.named_scope("sea_performer"):
      W = self.features[...]
      pos = position_values_at(self.positions[...], t, self.max_positions)
      v_cat = _performer_values(pos[:, None, None], v_heads)
      c_perf, (S, z) = linear_attention_step(relu_features(q, W), relu_features(k_heads, W),
                                             v_cat, (state.performer.S, state.performer.z))
    z_in = jnp.concatenate([c_perf.astype(self.dtype), v_heads.astype(self.dtype)], axis=-1)
    est_logits, s_prob, s_mix, history = self.estimator.step(z_in, state.history)
    key_sums = state.key_sums
    if self.pooled is not None:
      with jax.named_scope("sea_pooled_keys"):
        slot = cache.start  # the new key's slot: key_sums[slot + 1] = key_sums[slot] + k
        prev = jax.lax.dynamic_slice(key_sums, (0, 0, slot, 0), (N, k.shape[1], 1, d))
        real = jax.lax.dynamic_slice_in_dim(cache.key_mask, slot, 1, axis=1)[:, None, :, None]
        new = prev + jnp.where(real, k.astype(key_sums.dtype), 0.0)
        key_sums = jax.lax.dynamic_update_slice(key_sums, new, (0, 0, slot + 1, 0))
        pooled = pooled_key_row(q[:, :, 0], key_sums, t, offsets, self.K)
        est_logits = self.pooled(est_logits, pooled[:, :, None])
    with jax.named_scope("sea_topk"):
      probs = jax.nn.softmax(est_logits[:, :, 0].astype(jnp.promote_types(est_logits.dtype,
                                                                          jnp.float32)), -1)
      mask = grouped_topk_row(probs, t, keys_per_head)
    with jax.named_scope("sea_sparse"):
      length = kept_key_bound(cache.k.shape[2], H, self.K, keys_per_head)
      c_sparse = attend_kept(q[:, :, 0], cache.k, cache.v, mask, t, offsets, length)
      c_sparse = s_prob[..., None] * c_sparse[:, :, None].astype(s_prob.dtype)
    with jax.named_scope("sea_mix"):
      v_sum = state.v_sum + v[:, :, 0].astype(state.v_sum.dtype)
      mean = repeat_kv((v_sum / (t + 1).astype(v_sum.dtype)[:, None, None])[:, :, None], H)
      context = s_mix[..., None] * c_sparse + (1.0 - s_mix[..., None]) * mean
    return context.astype(v.dtype), SEAState(performer=PerformerState(S=S, z=z), v_sum=v_sum,
                                             history=history, key_sums=key_sums)


class PerformerAttention(nnx.Module):
  """The paper's linear baseline: causal ReLU-feature linear attention with fixed features W."""

  def __init__(self, *, head_dim: int, nbf: float = 8.0, chunk: int = 128, rngs: nnx.Rngs):
    self.features = _random_features(rngs, head_dim, nbf)
    self.chunk = chunk

  @classmethod
  def from_shape(cls, shape: AttentionShape, *, rngs: nnx.Rngs) -> "PerformerAttention":
    shape.sea.validate()
    return cls(head_dim=shape.head_dim, nbf=shape.sea.nbf, chunk=shape.sea.performer_chunk,
               rngs=rngs)

  def __call__(self, q, k, v, *, key_mask=None, sea_k=None, deterministic=True,
               return_aux=False):
    """q (N,H,T,d), k, v (N,Hkv,T,d) -> (context (N,H,T,d) in v.dtype, aux).
    key_mask: ignored (right padding)."""
    del key_mask, sea_k, deterministic
    W = self.features[...]
    H = q.shape[1]
    with jax.named_scope("performer_attention"):
      context = causal_linear_attention(relu_features(q, W), relu_features(repeat_kv(k, H), W),
                                        repeat_kv(v, H), self.chunk)
      context = context.astype(v.dtype)
    aux = {"q": q, "k": k, "context": context} if return_aux else {}
    return context, aux

  @classmethod
  def decode_state(cls, shape: AttentionShape, batch: int, max_len: int) -> PerformerState:
    del max_len
    m = num_random_features(shape.head_dim, shape.sea.nbf)
    return PerformerState(S=jnp.zeros((batch, shape.num_heads, m, shape.head_dim), jnp.float32),
                          z=jnp.zeros((batch, shape.num_heads, m), jnp.float32))

  def cached(self, q, k, v, cache, *, sea_k=None):
    """As `SEAAttention.cached`, with the running sums as the whole state (O(m·d) per step)."""
    del sea_k
    H, T = q.shape[1], q.shape[2]
    W = self.features[...]
    if T > 1:
      _, offsets, valid = _prefill_rows(cache, T)
      q, k, v = (to_right_padding(x, offsets) for x in (q, k, v))
      context, _ = self(q, k, v)
      S, z = linear_attention_state(relu_features(repeat_kv(k, H), W), repeat_kv(v, H), valid)
      return to_left_padding(context, offsets), PerformerState(S=S, z=z)
    with jax.named_scope("performer_attention"):
      context, (S, z) = linear_attention_step(
          relu_features(q, W), relu_features(repeat_kv(k, H), W), repeat_kv(v, H),
          (cache.state.S, cache.state.z))
    return context.astype(v.dtype), PerformerState(S=S, z=z)
