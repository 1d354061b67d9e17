"""The attention seam: one interface, implementations chosen by the config's `attention`.

An attention core receives the model's own projections (after RoPE in the Llama family) and
returns the per-head context:

  core(q, k, v, *, key_mask=None, sea_k=None, deterministic=True, return_aux=False)
      q: (N, H, T, d), already scaled by d**-0.5; k, v: (N, Hkv, T, d), Hkv dividing H
      (grouped-query attention: query head h reads kv head h // (H // Hkv); Hkv = H for OPT).
      key_mask: (N, T) bool, True for real tokens (None = all real).
      sea_k: keys per query per head for SEA (None = the config's k); ignored by others.
      -> (context (N, H, T, d), aux dict)

`aux` is empty unless `return_aux`; then it holds at least "q", "k", "context" (what the
distillation losses need; "k" keeps its Hkv heads) and, for SEA, the estimator outputs
(SEA_SPEC §1.7). Cores are built from the family-neutral `AttentionShape` and the SEA settings,
never from a family's config; implementations register themselves in `ATTENTION_CORES` by name.

Generation (`sea_jax.generate`) keeps a KV cache: `KVCache` holds every layer's k, v at
preallocated slots (and SEA / Performer layers' decode state), and `cached_attention` writes a
layer's new k, v into its slots; dense cores attend the new queries to every written slot,
SEA and Performer cores step from their state (`sea_jax.sea.decode`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sea_jax.blocked_attention import blocked_attention
from sea_jax.config import DENSE_IMPLS, ConfigError, SEAConfig
from sea_jax.sharding import per_shard

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class AttentionShape:
  """What an attention core needs to know about its model: heads, kv heads, head dim, the
  positions it may see, dtypes and the SEA settings."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_positions: int
  dtype: object
  param_dtype: object
  sea: SEAConfig
  dense_impl: str = "auto"

  @classmethod
  def of(cls, config) -> "AttentionShape":
    """From any family config (OPTConfig, LlamaConfig)."""
    return cls(num_heads=config.num_attention_heads, num_kv_heads=config.num_kv_heads,
               head_dim=config.head_dim, max_positions=config.max_position_embeddings,
               dtype=config.compute_dtype, param_dtype=config.params_dtype, sea=config.sea,
               dense_impl=config.dense_impl)


def repeat_kv(x: jax.Array, num_heads: int) -> jax.Array:
  """(N, Hkv, T, e) -> (N, num_heads, T, e): kv head g serves query heads [g*G, (g+1)*G)
  (Hugging Face's repeat_kv); identity when Hkv == num_heads."""
  groups = num_heads // x.shape[1]
  return x if groups == 1 else jnp.repeat(x, groups, axis=1)


def causal_key_mask(T: int, key_mask: jax.Array | None, q_offset: int = 0,
                    rows: int | None = None) -> jax.Array:
  """(N|1, 1, rows, T) bool: query q_offset+i may see key s (s <= t and key s is real)."""
  rows = T if rows is None else rows
  t = q_offset + jnp.arange(rows)[:, None]
  s = jnp.arange(T)[None, :]
  mask = (s <= t)[None, None]
  if key_mask is not None:
    mask = mask & key_mask[:, None, None, :].astype(bool)
  return mask


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    key_mask: jax.Array | None = None, q_offset=0) -> jax.Array:
  """Causal softmax attention with an fp32 softmax: q (N,H,T,d), k/v (N,Hkv,S,d) -> (N,H,T,d).

  Query i sits at key slot q_offset + i and sees slots s <= q_offset + i (self-attention: S = T,
  offset 0; a KV cache: S slots, the offset the first new slot, maybe traced); key_mask (N, S).
  Grouped-query attention reads each kv head for its G = H / Hkv query heads without copying it.
  """
  N, H, T, d = q.shape
  S = k.shape[2]
  G = H // k.shape[1]
  if G == 1:
    scores = jnp.einsum("nhtd,nhsd->nhts", q, k, preferred_element_type=jnp.float32)
  else:
    scores = jnp.einsum("nhgtd,nhsd->nhgts", q.reshape(N, H // G, G, T, d), k,
                        preferred_element_type=jnp.float32).reshape(N, H, T, S)
  mask = causal_key_mask(S, key_mask, q_offset, rows=T)
  scores = jnp.where(mask, scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = jnp.where(mask, probs, 0.0)  # fully masked rows (padding queries) give zeros
  if G == 1:
    return jnp.einsum("nhts,nhsd->nhtd", probs.astype(v.dtype), v)
  out = jnp.einsum("nhgts,nhsd->nhgtd", probs.astype(v.dtype).reshape(N, H // G, G, T, S), v)
  return out.reshape(N, H, T, v.shape[-1])


CACHE_CHUNKED_FROM = 2048  # a prefill into a cache of more slots runs one query block at a time


def dense_attention_chunked(q: jax.Array, k: jax.Array, v: jax.Array,
                            key_mask: jax.Array | None = None, *, block: int = 256,
                            q_offset=0) -> jax.Array:
  """`dense_attention` over a KV cache one query block at a time (a long prompt's prefill):
  the same fp32 softmax, never T x S.

  q (N,H,T,d), k/v (N,Hkv,S,d) -> (N,H,T,d), query i at slot q_offset + i (maybe traced). Each
  block of `block` query rows scores all S slots (O(block * S) memory per head); the block
  body is rematerialised under `lax.scan`. Self-attention (no cache) takes
  `blocked_attention.blocked_attention`, which visits only the keys each block can see.
  """
  N, H, T, d = q.shape
  S = k.shape[2]
  Hkv = k.shape[1]
  G = H // Hkv
  B = max(1, min(block, T))
  nb = -(-T // B)
  pad = nb * B - T
  qp = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else q
  q_blocks = jnp.moveaxis(qp.reshape(N, Hkv, G, nb, B, d), 3, 0)  # (nb,N,Hkv,G,B,d)

  @jax.checkpoint
  def one_block(q_blk, start):
    scores = jnp.einsum("nhgbd,nhsd->nhgbs", q_blk, k, preferred_element_type=jnp.float32)
    mask = causal_key_mask(S, key_mask, q_offset=q_offset + start, rows=B)
    mask = mask[:, :, None]  # (N|1,1,1,B,S)
    scores = jnp.where(mask, scores, NEG_INF)
    probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)
    return jnp.einsum("nhgbs,nhsd->nhgbd", probs.astype(v.dtype), v)

  def step(carry, xs):
    return carry, one_block(*xs)

  starts = jnp.arange(nb, dtype=jnp.int32) * B
  _, out = jax.lax.scan(step, None, (q_blocks, starts))
  out = jnp.moveaxis(out, 0, 3).reshape(N, H, nb * B, v.shape[-1])
  return out[:, :, :T]


def dense_attention_cudnn(q, k, v):
  """jax.nn.dot_product_attention with cuDNN's flash attention (GPU, bf16/fp16), causal, no
  padding mask (a padded batch takes the chunked path); q pre-scaled; GQA native."""
  out = jax.nn.dot_product_attention(
      q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), scale=1.0,
      is_causal=True, implementation="cudnn")
  return out.transpose(0, 2, 1, 3)


SPLASH_BLOCK = 128  # splash attention's tile (TPU lanes); T is padded up to a multiple of it


def dense_attention_splash(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Causal attention with splash attention (Pallas TPU flash attention, forward and backward):
  q (N,H,T,d) pre-scaled, k, v (N,Hkv,T,d) -> (N,H,T,d) in v.dtype; GQA through the
  multi-query kernel per kv head (k, v never repeated); no padding mask (a padded batch takes
  the chunked path). T is padded at the end to a multiple of SPLASH_BLOCK: causality hides the
  padded keys from every real query. Off TPU the kernel runs interpreted (tests)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  N, H, T, d = q.shape
  Hkv = k.shape[1]
  G = H // Hkv
  Tp = -(-T // SPLASH_BLOCK) * SPLASH_BLOCK
  if Tp > T:
    widths = ((0, 0), (0, 0), (0, Tp - T), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
  mask = sm.MultiHeadMask([sm.CausalMask((Tp, Tp)) for _ in range(G)])
  b = SPLASH_BLOCK
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                        block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  kernel = sk.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=jax.default_backend() != "tpu")
  q_groups = q.reshape(N, Hkv, G, Tp, d)
  out = jax.vmap(jax.vmap(kernel))(q_groups, k.astype(q.dtype), v.astype(q.dtype))
  return out.reshape(N, H, Tp, d)[:, :, :T].astype(v.dtype)


def resolve_dense_impl(impl: str, dtype) -> str:
  """The dense implementation that `impl` means for this backend and dtype: "auto" is cuDNN on
  GPU in bf16/fp16, splash attention on TPU, else "chunked" (`blocked_attention`: at every
  length it holds O(block · T) per head, and on CPU it runs 2-3x faster than the T x T
  reference; BENCHMARKS.md)."""
  if impl != "auto":
    return impl
  if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  if jax.default_backend() == "tpu":
    return "splash"
  return "chunked"


class DenseAttention(nnx.Module):
  """The model's own causal softmax attention; no parameters. `shape.dense_impl` picks the
  T x T reference, the blocked XLA path or cuDNN (see `resolve_dense_impl`)."""

  def __init__(self, shape: AttentionShape, *, rngs: nnx.Rngs):
    del rngs
    self.impl = shape.dense_impl

  def __call__(self, q, k, v, *, key_mask=None, sea_k=None, deterministic=True,
               return_aux=False):
    del sea_k, deterministic
    impl = resolve_dense_impl(self.impl, q.dtype)
    with jax.named_scope("dense_attention"):
      if impl == "reference":
        context = dense_attention(q, k, v, key_mask)
      elif impl == "cudnn" and key_mask is None:  # kernels: one per device's own shard
        context = per_shard(dense_attention_cudnn, q, k, v)
      elif impl == "splash" and key_mask is None:
        context = per_shard(dense_attention_splash, q, k, v)
      elif impl in ("chunked", "cudnn", "splash"):  # cuDNN and splash take no padding mask
        context = blocked_attention(q, k, v, key_mask=key_mask)
      else:
        raise ConfigError(f"unknown dense_impl {impl!r}; choose from {DENSE_IMPLS}")
    aux = {"q": q, "k": k, "v": v, "context": context} if return_aux else {}
    return context, aux


class LayerKV(NamedTuple):
  """One layer's view of a `KVCache` during a call: k, v (N, Hkv, L, d), key_mask (N, L) with
  the new tokens' bits already written, start () int32, the slot of the first new token, and
  the core's own decode state (None for dense attention)."""
  k: jax.Array
  v: jax.Array
  key_mask: jax.Array
  start: jax.Array
  state: Any = None


@dataclasses.dataclass
class KVCache:
  """A decoder's dense attention state for generation (a pytree; every shape static).

  k, v: one (N, Hkv, L, d) array per layer, L preallocated slots in the compute dtype;
  key_mask (N, L) bool, True at slots that hold a real token (left padding and slots not yet
  written are False); length () int32, the slots written so far (the next T tokens of a call
  go to slots length .. length + T - 1, the same for every row); states: per layer, the
  attention core's decode state (None for dense; SEA and Performer: `sea_jax.sea.decode`),
  which keeps a layer's calls to a multi-token prefill from slot 0, then one token per call.
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  key_mask: jax.Array
  length: jax.Array
  states: tuple[Any, ...] = ()

  @classmethod
  def zeros(cls, config, batch: int, max_len: int) -> "KVCache":
    """An empty cache of `max_len` slots for `config`'s model (any family)."""
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    layers = range(config.num_hidden_layers)
    attention = AttentionShape.of(config)
    return cls(k=tuple(jnp.zeros(shape, config.compute_dtype) for _ in layers),
               v=tuple(jnp.zeros(shape, config.compute_dtype) for _ in layers),
               key_mask=jnp.zeros((batch, max_len), bool), length=jnp.zeros((), jnp.int32),
               states=tuple(_decode_state(config.attention_kind(i), attention, batch)
                            for i in layers))

  def extend_mask(self, attention_mask: jax.Array | None, T: int) -> jax.Array:
    """(N, L) key mask with the T new tokens' attention_mask (N, T) (None = all real) written at
    slots length .. length + T - 1."""
    N = self.key_mask.shape[0]
    new = jnp.ones((N, T), bool) if attention_mask is None else attention_mask.astype(bool)
    return jax.lax.dynamic_update_slice(self.key_mask, new, (0, self.length))

  def positions(self, key_mask: jax.Array, T: int) -> jax.Array:
    """(N, T) int32 positions of the new tokens by Hugging Face's generate rule: a real token's
    position is the count of real tokens before it (cumsum(mask) - 1); padding gets 0."""
    m = key_mask.astype(jnp.int32)
    full = jnp.where(key_mask, jnp.cumsum(m, axis=1) - 1, 0)
    return jax.lax.dynamic_slice_in_dim(full, self.length, T, axis=1)

  def run(self, layers, h: jax.Array, key_mask: jax.Array,
          call: Callable[..., tuple]) -> tuple[jax.Array, "KVCache"]:
    """h (N,T,D) through every layer with its slice of the cache -> (h, the cache after these
    T tokens); call(layer, h, LayerKV) -> (h, aux, updated LayerKV); key_mask from
    `extend_mask`."""
    updated = []
    states = self.states or (None,) * len(self.k)
    for i, layer in enumerate(layers):
      with jax.named_scope(f"layer_{i}"):
        h, _, layer_kv = call(layer, h, LayerKV(self.k[i], self.v[i], key_mask, self.length,
                                                 states[i]))
      updated.append(layer_kv)
    return h, KVCache(k=tuple(c.k for c in updated), v=tuple(c.v for c in updated),
                      key_mask=key_mask, length=self.length + h.shape[1],
                      states=tuple(c.state for c in updated))

  @staticmethod
  def check_call(dropout_rng, output_hidden_states: bool, return_attn_aux: bool) -> None:
    """A model call with a cache is inference only."""
    if dropout_rng is not None or output_hidden_states or return_attn_aux:
      raise ConfigError("a call with a KV cache takes no dropout_rng, output_hidden_states or "
                        "return_attn_aux")


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "key_mask", "length", "states"],
                                 meta_fields=[])


def cached_attention(core: nnx.Module, q: jax.Array, k: jax.Array, v: jax.Array,
                     cache: LayerKV, *, sea_k=None) -> tuple[jax.Array, LayerKV]:
  """Writes the new k, v (N,Hkv,T,d) into the cache at slot cache.start and attends q (N,H,T,d)
  -> (context (N,H,T,d), updated LayerKV).

  Dense: every visible slot (s <= its own, cache.key_mask). SEA and Performer: the core's
  `cached` (a prefill by the full forward, then one token per call from the core's state).
  """
  at = (0, 0, cache.start, 0)
  k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), at)
  v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), at)
  if not isinstance(core, DenseAttention):
    context, state = core.cached(q, k, v, cache._replace(k=k_all, v=v_all), sea_k=sea_k)
    return context, cache._replace(k=k_all, v=v_all, state=state)
  T, L = q.shape[2], k_all.shape[2]
  chunked = (resolve_dense_impl(core.impl, q.dtype) != "reference"
             and (core.impl != "auto" or L > CACHE_CHUNKED_FROM))
  with jax.named_scope("cached_attention"):
    if chunked and T > 1:  # a long prompt's prefill: one query block at a time
      context = dense_attention_chunked(q, k_all, v_all, cache.key_mask, q_offset=cache.start)
    else:
      context = dense_attention(q, k_all, v_all, cache.key_mask, q_offset=cache.start)
  return context, cache._replace(k=k_all, v=v_all)


def _sea_core(shape: AttentionShape, *, rngs: nnx.Rngs) -> nnx.Module:
  from sea_jax.sea import SEAAttention  # imported lazily: SEA is optional at import time
  return SEAAttention.from_shape(shape, rngs=rngs)


def _performer_core(shape: AttentionShape, *, rngs: nnx.Rngs) -> nnx.Module:
  from sea_jax.sea import PerformerAttention
  return PerformerAttention.from_shape(shape, rngs=rngs)


def _decode_state(kind: str, shape: AttentionShape, batch: int):
  """A layer's empty decode state by attention kind (None: dense keeps only k, v)."""
  if kind == "dense":
    return None
  from sea_jax.sea import PerformerAttention, SEAAttention
  return {"sea": SEAAttention, "performer": PerformerAttention}[kind].decode_state(shape, batch)


ATTENTION_CORES: dict[str, Callable[..., nnx.Module]] = {
    "dense": DenseAttention,
    "sea": _sea_core,
    "performer": _performer_core,
}


def make_attention_core(config, layer: int, *, rngs: nnx.Rngs) -> nnx.Module:
  """The attention core of decoder layer `layer`, as the (any family's) config chooses."""
  kind = config.attention_kind(layer)
  if kind not in ATTENTION_CORES:
    raise ConfigError(f"unknown attention {kind!r}; choose from {sorted(ATTENTION_CORES)}")
  return ATTENTION_CORES[kind](AttentionShape.of(config), rngs=rngs)
