"""The model families: for each, its config class, model class and Hugging Face name table.

`model_class(config)` and `name_table(config)` are how `checkpoint`, `convert` and training
reach a family; nothing else branches on it. Adding a family = a config dataclass in
`config.py`, a model module, and one `Family` entry here.
"""
from __future__ import annotations

import dataclasses

from sea_jax.hf_io import NameTable
from sea_jax.llama import LlamaForCausalLM
from sea_jax.opt import OPTForCausalLM

_OPT_LAYER = r"decoder\.layers\.(\d+)\."
OPT_NAMES = NameTable(family="OPT", entries=(
    (r"decoder\.embed_tokens\.weight", ("embed_tokens",), False),
    (r"decoder\.embed_positions\.weight", ("embed_positions",), False),
    (r"decoder\.project_in\.weight", ("project_in", "kernel"), True),
    (r"decoder\.project_out\.weight", ("project_out", "kernel"), True),
    (r"decoder\.final_layer_norm\.weight", ("final_layer_norm", "scale"), False),
    (r"decoder\.final_layer_norm\.bias", ("final_layer_norm", "bias"), False),
    (_OPT_LAYER + r"self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight",
     ("layers", "{0}", "self_attn", "{1}", "kernel"), True),
    (_OPT_LAYER + r"self_attn\.(q_proj|k_proj|v_proj|out_proj)\.bias",
     ("layers", "{0}", "self_attn", "{1}", "bias"), False),
    (_OPT_LAYER + r"(fc1|fc2)\.weight", ("layers", "{0}", "{1}", "kernel"), True),
    (_OPT_LAYER + r"(fc1|fc2)\.bias", ("layers", "{0}", "{1}", "bias"), False),
    (_OPT_LAYER + r"(self_attn_layer_norm|final_layer_norm)\.weight",
     ("layers", "{0}", "{1}", "scale"), False),
    (_OPT_LAYER + r"(self_attn_layer_norm|final_layer_norm)\.bias",
     ("layers", "{0}", "{1}", "bias"), False),
))

_LLAMA_LAYER = r"layers\.(\d+)\."
LLAMA_NAMES = NameTable(family="Llama-family", entries=(
    (r"embed_tokens\.weight", ("embed_tokens",), False),
    (r"norm\.weight", ("norm", "scale"), False),
    (r"lm_head\.weight", ("lm_head",), False),
    (_LLAMA_LAYER + r"self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight",
     ("layers", "{0}", "self_attn", "{1}", "kernel"), True),
    (_LLAMA_LAYER + r"self_attn\.(q_proj|k_proj|v_proj|o_proj)\.bias",
     ("layers", "{0}", "self_attn", "{1}", "bias"), False),
    (_LLAMA_LAYER + r"mlp\.(gate_proj|up_proj|down_proj)\.weight",
     ("layers", "{0}", "mlp", "{1}", "kernel"), True),
    (_LLAMA_LAYER + r"mlp\.(gate_proj|up_proj|down_proj)\.bias",
     ("layers", "{0}", "mlp", "{1}", "bias"), False),
    (_LLAMA_LAYER + r"(input_layernorm|post_attention_layernorm)\.weight",
     ("layers", "{0}", "{1}", "scale"), False),
), ignored=(_LLAMA_LAYER + r"self_attn\.rotary_emb\.inv_freq",))


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  names: NameTable
  model: type


FAMILIES = {
    "opt": Family("opt", OPT_NAMES, OPTForCausalLM),
    "llama": Family("llama", LLAMA_NAMES, LlamaForCausalLM),
}


def family(config) -> Family:
  return FAMILIES[config.family]


def model_class(config):
  """The model class of a family config (OPTConfig -> OPTForCausalLM, LlamaConfig -> Llama...)."""
  return family(config).model


def name_table(config) -> NameTable:
  return family(config).names
