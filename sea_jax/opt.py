"""OPT decoder-only language model in Flax NNX, one class for every OPT variant.

Pre-LN (125m, 1.3b, ...) and post-LN 350m (`do_layer_norm_before=False`, `project_in`/`project_out`
between `word_embed_proj_dim` and `hidden_size`, no final LayerNorm) alike; learned positions with
OPT's offset of 2; ReLU FFN; LM head tied to the token embedding. The attention core of each layer
comes from the seam in `sea_jax.attention` (dense, SEA, Performer), chosen by `config.attention`.

Shapes: N batch, T sequence, D hidden_size, E word_embed_proj_dim, V vocab, H heads, d head dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sea_jax.attention import KVCache, cached_attention, make_attention_core
from sea_jax.config import ConfigError, OPTConfig
from sea_jax.decoder import CausalLMOutput, dropout as _dropout, lm_logits, run_layers
from sea_jax.layers import LayerNorm, Linear, normal_init, param

POSITION_OFFSET = 2  # OPT's learned position table has two extra leading rows




class OPTAttention(nnx.Module):
  """OPT's q/k/v/out projections around a pluggable attention core: (N,T,D) -> (N,T,D)."""

  def __init__(self, config: OPTConfig, layer: int, *, rngs: nnx.Rngs):
    D, dt, pdt = config.hidden_size, config.compute_dtype, config.params_dtype
    proj = dict(use_bias=config.enable_bias, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.q_proj = Linear(D, D, axes=("embed", "heads"), **proj)
    self.k_proj = Linear(D, D, axes=("embed", "heads"), **proj)
    self.v_proj = Linear(D, D, axes=("embed", "heads"), **proj)
    self.out_proj = Linear(D, D, axes=("heads", "embed"), **proj)
    self.core = make_attention_core(config, layer, rngs=rngs)
    self.num_heads = config.num_attention_heads
    self.head_dim = config.head_dim

  def __call__(self, x, *, key_mask=None, sea_k=None, deterministic=True, return_aux=False,
               cache=None):
    """-> (out, aux); with a `LayerKV` cache (generation) -> (out, {}, updated LayerKV)."""
    N, T, _ = x.shape
    split = lambda y: y.reshape(N, T, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
    q = split(self.q_proj(x) * self.head_dim**-0.5)
    k = split(self.k_proj(x))
    v = split(self.v_proj(x))
    if cache is not None:
      context, cache = cached_attention(self.core, q, k, v, cache, sea_k=sea_k)
      aux = {}
    else:
      context, aux = self.core(q, k, v, key_mask=key_mask, sea_k=sea_k,
                               deterministic=deterministic, return_aux=return_aux)
    context = context.transpose(0, 2, 1, 3).reshape(N, T, self.num_heads * self.head_dim)
    if cache is not None:
      return self.out_proj(context), aux, cache
    return self.out_proj(context), aux


class OPTDecoderLayer(nnx.Module):
  """One OPT block; pre-LN or post-LN by `config.do_layer_norm_before`."""

  def __init__(self, config: OPTConfig, layer: int, *, rngs: nnx.Rngs):
    D, dt, pdt = config.hidden_size, config.compute_dtype, config.params_dtype
    norm = dict(eps=config.layer_norm_eps, affine=config.layer_norm_elementwise_affine,
                dtype=dt, param_dtype=pdt, rngs=rngs)
    self.self_attn = OPTAttention(config, layer, rngs=rngs)
    self.self_attn_layer_norm = LayerNorm(D, **norm)
    self.fc1 = Linear(D, config.ffn_dim, axes=("embed", "mlp"), use_bias=config.enable_bias,
                      dtype=dt, param_dtype=pdt, rngs=rngs)
    self.fc2 = Linear(config.ffn_dim, D, axes=("mlp", "embed"), use_bias=config.enable_bias,
                      dtype=dt, param_dtype=pdt, rngs=rngs)
    self.final_layer_norm = LayerNorm(D, **norm)
    self.pre_ln = config.do_layer_norm_before
    self.dropout = config.dropout

  def __call__(self, h, *, key_mask=None, sea_k=None, dropout_rng=None, return_aux=False,
               cache=None):
    """-> (h, aux); with a `LayerKV` cache -> (h, aux, updated LayerKV)."""
    k_attn, k_ffn = jax.random.split(dropout_rng) if dropout_rng is not None else (None, None)
    residual = h
    x = self.self_attn_layer_norm(h) if self.pre_ln else h
    x, aux, *cached = self.self_attn(x, key_mask=key_mask, sea_k=sea_k, cache=cache,
                                     deterministic=dropout_rng is None, return_aux=return_aux)
    h = residual + _dropout(x, self.dropout, k_attn)
    if not self.pre_ln:
      h = self.self_attn_layer_norm(h)
    residual = h
    x = self.final_layer_norm(h) if self.pre_ln else h
    x = self.fc2(jax.nn.relu(self.fc1(x)))
    h = residual + _dropout(x, self.dropout, k_ffn)
    if not self.pre_ln:
      h = self.final_layer_norm(h)
    return (h, aux, *cached)


class OPTForCausalLM(nnx.Module):
  """OPT with its tied LM head: input_ids (N,T) -> CausalLMOutput(logits (N,T,V), ...)."""

  def __init__(self, config: OPTConfig, *, rngs: nnx.Rngs):
    config.validate()
    self.config = config
    D, E, pdt = config.hidden_size, config.word_embed_proj_dim, config.params_dtype
    dt = config.compute_dtype
    self.embed_tokens = param(rngs, normal_init(0.02), (config.vocab_size, E), ("vocab", "embed"), pdt)
    self.embed_positions = param(rngs, normal_init(0.02),
                                 (config.max_position_embeddings + POSITION_OFFSET, D),
                                 ("positions", "embed"), pdt)
    if E != D:
      self.project_in = Linear(E, D, axes=(None, "embed"), use_bias=False, dtype=dt, param_dtype=pdt, rngs=rngs)
      self.project_out = Linear(D, E, axes=("embed", None), use_bias=False, dtype=dt, param_dtype=pdt, rngs=rngs)
    else:
      self.project_in = self.project_out = None
    self.layers = nnx.List([OPTDecoderLayer(config, i, rngs=rngs)
                            for i in range(config.num_hidden_layers)])
    self.final_layer_norm = (
        LayerNorm(D, eps=config.layer_norm_eps, affine=config.layer_norm_elementwise_affine,
                  dtype=dt, param_dtype=pdt, rngs=rngs)
        if config.has_final_layer_norm else None)

  def head_table(self) -> jax.Array:
    """(V, D): the output head's weights (tied to the embedding table)."""
    return self.embed_tokens[...]

  def embed(self, input_ids: jax.Array, positions: jax.Array) -> tuple[jax.Array, tuple]:
    """input_ids, positions (N,T) int (HF's rule: -1 at padding) -> (h (N,T,D), what every
    layer takes after h: nothing for OPT); `layer(h, *args, key_mask=...)` runs a layer."""
    dt = self.config.compute_dtype
    with jax.named_scope("embed"):
      x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(dt)
      if self.project_in is not None:
        x = self.project_in(x)
      h = x + jnp.take(self.embed_positions[...], positions + POSITION_OFFSET, axis=0).astype(dt)
    return h, ()

  def final_norm(self, h: jax.Array) -> jax.Array:
    """The last layer's output (N,T,D) -> what the head reads (the last hidden state): the
    final layer norm where the variant has one, then `project_out` where E != D."""
    if self.final_layer_norm is not None:
      h = self.final_layer_norm(h)
    if self.project_out is not None:
      h = self.project_out(h)
    return h

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               sea_k: int | None = None, dropout_rng: jax.Array | None = None,
               output_hidden_states: bool = False, return_attn_aux: bool = False,
               cache: KVCache | None = None) -> CausalLMOutput | tuple[CausalLMOutput, KVCache]:
    """input_ids (N,T) int; attention_mask (N,T), 1 for real tokens (None = all real).

    dropout_rng: a PRNG key turns dropout on (training); None is deterministic.
    sea_k: SEA's keys per query per head for this call (None = the config's k).
    cache: a `KVCache` (generation; any attention): input_ids are the T tokens after its
      written slots, positions follow its key mask (`KVCache.positions`, which agrees with
      OPT's rule on real tokens) and the call returns (output, updated cache).
    """
    cfg = self.config
    N, T = input_ids.shape
    if T > cfg.max_position_embeddings:
      raise ConfigError(f"sequence length {T} exceeds the model's max_position_embeddings "
                        f"{cfg.max_position_embeddings}")
    dt = cfg.compute_dtype
    if cache is not None:
      KVCache.check_call(dropout_rng, output_hidden_states, return_attn_aux)
      key_mask = cache.extend_mask(attention_mask, T)  # (N, L): every slot of the cache
      positions = cache.positions(key_mask, T)
    elif attention_mask is None:
      key_mask = None
      positions = jnp.broadcast_to(jnp.arange(T), (N, T))
    else:
      key_mask = attention_mask.astype(bool)
      m = attention_mask.astype(jnp.int32)
      positions = jnp.cumsum(m, axis=1) * m - 1  # Hugging Face's rule; pads get -1
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
