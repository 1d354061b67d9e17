"""Llama-architecture decoders in Flax NNX: Llama (1, 2, 3.x), Qwen2, Mistral (no sliding window).

RMSNorm before attention and MLP, RoPE on q and k (half-split layout), grouped-query attention
(num_key_value_heads), SwiGLU MLP, final RMSNorm, LM head tied or untied. Positions are
0..T-1 for every row, as Hugging Face's forward uses without explicit position_ids; pass
`position_ids` for left-padded rows as Hugging Face's generate does (a call with a `KVCache`
follows that rule over the cache's key mask). The attention core of each layer comes from the
seam in `sea_jax.attention` (dense, SEA, Performer) and receives q and k after RoPE: the
estimator learns to predict the teacher's attention, which is a function of the rotated q and k.

Shapes: N batch, T sequence, D hidden_size, V vocab, H query heads, Hkv kv heads, d head dim,
F intermediate_size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sea_jax.attention import KVCache, cached_attention, make_attention_core
from sea_jax.config import LlamaConfig
from sea_jax.decoder import CausalLMOutput, dropout, lm_logits, run_layers
from sea_jax.layers import Linear, RMSNorm, normal_init, param
from sea_jax.rope import apply_rope, inv_frequencies, rope_tables


class LlamaAttention(nnx.Module):
  """q/k/v/o projections, RoPE and GQA around a pluggable core: (N,T,D) -> (N,T,D)."""

  def __init__(self, config: LlamaConfig, layer: int, *, rngs: nnx.Rngs):
    D, H, Hkv, d = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                    config.head_dim)
    common = dict(dtype=config.compute_dtype, param_dtype=config.params_dtype, rngs=rngs)
    self.q_proj = Linear(D, H * d, axes=("embed", "heads"), use_bias=config.qkv_bias, **common)
    self.k_proj = Linear(D, Hkv * d, axes=("embed", "kv_heads"), use_bias=config.qkv_bias, **common)
    self.v_proj = Linear(D, Hkv * d, axes=("embed", "kv_heads"), use_bias=config.qkv_bias, **common)
    self.o_proj = Linear(H * d, D, axes=("heads", "embed"), use_bias=config.o_bias, **common)
    self.core = make_attention_core(config, layer, rngs=rngs)
    self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, d

  def project(self, x, cos, sin):
    """x (N,T,D) -> q (N,H,T,d) after RoPE and scaled by d^-1/2, k (N,Hkv,T,d) after RoPE, v
    (N,Hkv,T,d): what the attention core receives."""
    N, T, _ = x.shape
    split = lambda y, h: y.reshape(N, T, h, self.head_dim).transpose(0, 2, 1, 3)  # noqa: E731
    q = apply_rope(split(self.q_proj(x), self.num_heads), cos, sin) * self.head_dim**-0.5
    k = apply_rope(split(self.k_proj(x), self.num_kv_heads), cos, sin)
    return q, k, split(self.v_proj(x), self.num_kv_heads)

  def __call__(self, x, cos, sin, *, key_mask=None, sea_k=None, deterministic=True,
               return_aux=False, cache=None):
    """-> (out, aux); with a `LayerKV` cache (generation) -> (out, {}, updated LayerKV)."""
    N, T, _ = x.shape
    q, k, v = self.project(x, cos, sin)
    if cache is not None:
      context, cache = cached_attention(self.core, q.astype(x.dtype), k, v, cache,
                                        sea_k=sea_k)
      aux = {}
    else:
      context, aux = self.core(q.astype(x.dtype), k, v, key_mask=key_mask, sea_k=sea_k,
                               deterministic=deterministic, return_aux=return_aux)
    context = context.transpose(0, 2, 1, 3).reshape(N, T, self.num_heads * self.head_dim)
    if cache is not None:
      return self.o_proj(context), aux, cache
    return self.o_proj(context), aux


class LlamaMLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    D, F = config.hidden_size, config.intermediate_size
    common = dict(use_bias=config.mlp_bias, dtype=config.compute_dtype,
                  param_dtype=config.params_dtype, rngs=rngs)
    self.gate_proj = Linear(D, F, axes=("embed", "mlp"), **common)
    self.up_proj = Linear(D, F, axes=("embed", "mlp"), **common)
    self.down_proj = Linear(F, D, axes=("mlp", "embed"), **common)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
  """h + attn(norm(h)), then + mlp(norm(h))."""

  def __init__(self, config: LlamaConfig, layer: int, *, rngs: nnx.Rngs):
    norm = dict(eps=config.rms_norm_eps, dtype=config.compute_dtype,
                param_dtype=config.params_dtype, rngs=rngs)
    self.input_layernorm = RMSNorm(config.hidden_size, **norm)
    self.self_attn = LlamaAttention(config, layer, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
    self.mlp = LlamaMLP(config, rngs=rngs)
    self.dropout = config.dropout

  def __call__(self, h, cos, sin, *, key_mask=None, sea_k=None, dropout_rng=None,
               return_aux=False, cache=None):
    """-> (h, aux); with a `LayerKV` cache -> (h, aux, updated LayerKV)."""
    k_attn, k_mlp = jax.random.split(dropout_rng) if dropout_rng is not None else (None, None)
    x, aux, *cached = self.self_attn(self.input_layernorm(h), cos, sin, key_mask=key_mask,
                                     sea_k=sea_k, deterministic=dropout_rng is None,
                                     return_aux=return_aux, cache=cache)
    h = h + dropout(x, self.dropout, k_attn)
    h = h + dropout(self.mlp(self.post_attention_layernorm(h)), self.dropout, k_mlp)
    return (h, aux, *cached)


class LlamaForCausalLM(nnx.Module):
  """input_ids (N,T) -> CausalLMOutput(logits (N,T,V), ...); the head is tied to the embedding
  when `tie_word_embeddings`, else its own (V, D) table."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    config.validate()
    self.config = config
    D, V, pdt = config.hidden_size, config.vocab_size, config.params_dtype
    self.embed_tokens = param(rngs, normal_init(0.02), (V, D), ("vocab", "embed"), pdt)
    self.layers = nnx.List([LlamaDecoderLayer(config, i, rngs=rngs)
                            for i in range(config.num_hidden_layers)])
    self.norm = RMSNorm(D, eps=config.rms_norm_eps, dtype=config.compute_dtype, param_dtype=pdt,
                        rngs=rngs)
    self.lm_head = (None if config.tie_word_embeddings
                    else param(rngs, normal_init(0.02), (V, D), ("vocab", "embed"), pdt))

  def head_table(self) -> jax.Array:
    """(V, D): the output head's weights (the embedding table when tied)."""
    return (self.embed_tokens if self.lm_head is None else self.lm_head)[...]

  def embed(self, input_ids: jax.Array, positions: jax.Array) -> tuple[jax.Array, tuple]:
    """input_ids, positions (N,T) int -> (h (N,T,D), what every layer takes after h: the RoPE
    tables (cos, sin)); `layer(h, *args, key_mask=..., sea_k=...)` runs a layer on them."""
    cfg = self.config
    inv_freq = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
    cos, sin = rope_tables(positions, inv_freq, cfg.compute_dtype)
    with jax.named_scope("embed"):
      h = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(cfg.compute_dtype)
    return h, (cos, sin)

  def final_norm(self, h: jax.Array) -> jax.Array:
    """The last layer's output (N,T,D) -> what the head reads (the last hidden state)."""
    return self.norm(h)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               sea_k: int | None = None, dropout_rng: jax.Array | None = None,
               output_hidden_states: bool = False, return_attn_aux: bool = False,
               position_ids: jax.Array | None = None, cache: KVCache | None = None
               ) -> CausalLMOutput | tuple[CausalLMOutput, KVCache]:
    """input_ids (N,T) int; attention_mask (N,T), 1 for real tokens (None = all real).

    dropout_rng: a PRNG key turns dropout on (training); None is deterministic.
    sea_k: SEA's keys per query per head for this call (None = the config's k).
    position_ids: (N,T) int RoPE positions (None = 0..T-1 for every row, or with a cache the
      cache's rule); Hugging Face's generate passes cumsum(mask) - 1, 0 at padding.
    cache: a `KVCache` (generation; any attention): input_ids are the T tokens after its
      written slots, positions by default follow its key mask (`KVCache.positions`) and the
      call returns (output, updated cache).
    """
    cfg = self.config
    N, T = input_ids.shape
    dt = cfg.compute_dtype
    if cache is not None:
      KVCache.check_call(dropout_rng, output_hidden_states, return_attn_aux)
      key_mask = cache.extend_mask(attention_mask, T)  # (N, L): every slot of the cache
    else:
      key_mask = None if attention_mask is None else attention_mask.astype(bool)
    if position_ids is not None:
      positions = position_ids.astype(jnp.int32)
    elif cache is not None:
      positions = cache.positions(key_mask, T)
    else:
      positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (N, T))
    h, layer_args = self.embed(input_ids, positions)

    def call(layer, h, key):
      return layer(h, *layer_args, key_mask=key_mask, sea_k=sea_k, dropout_rng=key,
                   return_aux=return_attn_aux)

    if cache is not None:
      h, cache = cache.run(self.layers, h, key_mask,
                           lambda layer, h, c: layer(h, *layer_args, sea_k=sea_k, cache=c))
      hidden, auxes = [], []
    else:
      h, hidden, auxes = run_layers(self.layers, h, remat=cfg.remat, dropout_rng=dropout_rng,
                                    output_hidden_states=output_hidden_states, call=call)
    with jax.named_scope("head"):
      h = self.final_norm(h)
      if output_hidden_states:
        hidden.append(h)
      logits = lm_logits(h, self.head_table(), dt)
    out = CausalLMOutput(logits=logits,
                         hidden_states=tuple(hidden) if output_hidden_states else None,
                         attn_aux=tuple(auxes) if return_attn_aux else None)
    return out if cache is None else (out, cache)
