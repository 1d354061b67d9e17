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
(SEA_SPEC §1.7). Cores are built from the family-neutral `config.AttentionShape` and the SEA
settings, never from a family's config; `ATTENTION_CORES` maps each attention kind to its core
class, the one place that tells the kinds apart. The dense math lives in `sea_jax.ops`.

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

from sea_jax.config import ATTENTION_KINDS, DENSE_IMPLS, AttentionShape, ConfigError
from sea_jax.ops.blocked_attention import blocked_attention
from sea_jax.ops.dense import (dense_attention, dense_attention_chunked, dense_attention_cudnn,
                               dense_attention_splash)
from sea_jax.sea import PerformerAttention, SEAAttention
from sea_jax.sharding import per_shard

CACHE_CHUNKED_FROM = 2048  # a prefill into a cache of more slots runs one query block at a time



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
  T x T reference, the blocked XLA path, cuDNN or splash (see `resolve_dense_impl`)."""

  def __init__(self, shape: AttentionShape, *, rngs: nnx.Rngs):
    del rngs
    self.impl = shape.dense_impl

  @classmethod
  def from_shape(cls, shape: AttentionShape, *, rngs: nnx.Rngs) -> "DenseAttention":
    return cls(shape, rngs=rngs)

  @classmethod
  def decode_state(cls, shape: AttentionShape, batch: int, max_len: int) -> None:
    """Dense attention decodes from the cached k, v alone: no state of its own."""
    return None

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

  def cached(self, q, k, v, cache: "LayerKV", *, sea_k=None):
    """With a KV cache whose k, v already hold the new tokens: q (N,H,T,d) attends every
    visible slot (s <= its own, cache.key_mask) -> (context (N,H,T,d), None)."""
    del k, v, sea_k
    T, L = q.shape[2], cache.k.shape[2]
    chunked = (resolve_dense_impl(self.impl, q.dtype) != "reference"
               and (self.impl != "auto" or L > CACHE_CHUNKED_FROM))
    with jax.named_scope("cached_attention"):
      if chunked and T > 1:  # a long prompt's prefill: one query block at a time
        context = dense_attention_chunked(q, cache.k, cache.v, cache.key_mask,
                                          q_offset=cache.start)
      else:
        context = dense_attention(q, cache.k, cache.v, cache.key_mask, q_offset=cache.start)
    return context, None


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
               states=tuple(_decode_state(config.attention_kind(i), attention, batch, max_len)
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
  with the core's `cached` -> (context (N,H,T,d), updated LayerKV). Dense cores attend every
  visible slot; SEA and Performer cores take a prefill by the full forward, then one token per
  call from their state."""
  at = (0, 0, cache.start, 0)
  k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), at)
  v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), at)
  written = cache._replace(k=k_all, v=v_all)
  context, state = core.cached(q, k, v, written, sea_k=sea_k)
  return context, written._replace(state=state)


ATTENTION_CORES: dict[str, type[nnx.Module]] = {
    "dense": DenseAttention,
    "sea": SEAAttention,
    "performer": PerformerAttention,
}
"""Every attention kind: a core class with `from_shape(shape, rngs=)`, `decode_state(shape,
batch, max_len)` and `cached(q, k, v, layer_kv, sea_k=)`; `config.ATTENTION_KINDS` names the same kinds."""
assert set(ATTENTION_CORES) == set(ATTENTION_KINDS), "config.ATTENTION_KINDS is the registry's keys"


def _decode_state(kind: str, shape: AttentionShape, batch: int, max_len: int):
  """A layer's empty decode state for a cache of max_len slots, by attention kind (None: dense
  keeps only k, v)."""
  return ATTENTION_CORES[kind].decode_state(shape, batch, max_len)


def make_attention_core(config, layer: int, *, rngs: nnx.Rngs) -> nnx.Module:
  """The attention core of decoder layer `layer`, as the (any family's) config chooses."""
  kind = config.attention_kind(layer)
  if kind not in ATTENTION_CORES:
    raise ConfigError(f"unknown attention {kind!r}; choose from {sorted(ATTENTION_CORES)}")
  return ATTENTION_CORES[kind].from_shape(AttentionShape.of(config), rngs=rngs)
