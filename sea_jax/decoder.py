"""What every decoder family shares: the output record, dropout, the layer loop, the LM head.

`opt.py` and `llama.py` build their own blocks and call `run_layers` (remat per layer,
hidden states and attention aux on request, a dropout key per layer) and `lm_logits`.
Shapes: N batch, T sequence, D hidden, V vocab.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass
class CausalLMOutput:
  """logits (N,T,V) fp32; hidden_states: L+1 arrays (N,T,D) when asked, as Hugging Face returns
  them (embeddings, each layer's output, the last after the final norm); attn_aux: one dict
  per layer from the attention cores when asked."""
  logits: jax.Array
  hidden_states: tuple[jax.Array, ...] | None = None
  attn_aux: tuple[dict[str, jax.Array], ...] | None = None


jax.tree_util.register_dataclass(
    CausalLMOutput, data_fields=["logits", "hidden_states", "attn_aux"], meta_fields=[])


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; identity without a key or at rate 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def run_layers(layers: Sequence[nnx.Module], h: jax.Array, *, remat: bool,
               dropout_rng: jax.Array | None, output_hidden_states: bool,
               call: Callable[..., tuple[jax.Array, dict]]
               ) -> tuple[jax.Array, list[jax.Array], list[dict]]:
  """h through every layer -> (h, hidden states before each layer, aux per layer).

  call(layer, h, key) -> (h, aux) runs one layer; it is wrapped in `nnx.remat` when `remat`.
  """
  keys = (jax.random.split(dropout_rng, len(layers)) if dropout_rng is not None
          else [None] * len(layers))
  run = nnx.remat(call) if remat else call
  hidden, auxes = [], []
  for i, layer in enumerate(layers):
    if output_hidden_states:
      hidden.append(h)
    with jax.named_scope(f"layer_{i}"):
      h, aux = run(layer, h, keys[i])
    auxes.append(aux)
  return h, hidden, auxes


def attention_cores(model: nnx.Module) -> list[nnx.Module]:
  """The attention core of every layer (each family's layers hold it at `self_attn.core`)."""
  return [layer.self_attn.core for layer in model.layers]


def lm_logits(h: jax.Array, table: jax.Array, dtype) -> jax.Array:
  """(N,T,E) x (V,E) -> (N,T,V) fp32 logits (tied embedding or an untied head stored (V,E))."""
  return jnp.einsum("nte,ve->ntv", h, table.astype(dtype), preferred_element_type=jnp.float32)
