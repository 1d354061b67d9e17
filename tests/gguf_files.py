"""Tiny GGUF files written as llama.cpp writes them (gguf.GGUFWriter), for the GGUF tests.

`write_gguf(path, arch, ...)` takes a seeded tiny transformers model (Llama with grouped-query
attention, or Qwen2 with q/k/v biases), permutes the q/k rows of `llama` files for llama.cpp's
RoPE layout (its convert_hf_to_gguf.py), stores each tensor in the ggml type asked for, and
writes llama.cpp's metadata keys and a byte-level BPE tokenizer trained on a fixed text.
"""
from __future__ import annotations

import numpy as np

TEXT = ("The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey "
        "building, and the tallest structure in Paris. Its base is square, measuring 125 "
        "metres on each side. During its construction, the Eiffel Tower surpassed the "
        "Washington Monument to become the tallest man-made structure in the world. ") * 4
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def byte_level_vocab(vocab_size: int) -> tuple[list[str], list[str]]:
  """(tokens in id order, merges "a b") of a byte-level BPE trained on TEXT, specials first."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator([TEXT], trainer)
  import json
  model = json.loads(tok.to_str())["model"]
  vocab = model["vocab"]
  tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  return tokens, merges


def tiny_hf_model(arch: str, *, hidden: int, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                  ffn: int = 128, vocab: int = 320, seed: int = 0, tied: bool = True):
  """A seeded tiny transformers model of `arch` ("llama" or "qwen2"), float32, eval mode."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
  torch.manual_seed(seed)
  common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, max_position_embeddings=256, rms_norm_eps=1e-5,
                rope_theta=10000.0, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
  if arch == "llama":
    model = LlamaForCausalLM(LlamaConfig(head_dim=hidden // heads, **common))
  else:
    model = Qwen2ForCausalLM(Qwen2Config(**common))
  with torch.no_grad():  # non-trivial norms and biases (init leaves them 1 and 0)
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn(p.shape, generator=g))
  return model.eval()


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's q/k row order (its convert_hf_to_gguf.py `permute`)."""
  return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
  if hf_name in GGUF_NAMES:
    return GGUF_NAMES[hf_name]
  _, _, layer, rest = hf_name.split(".", 3)
  return f"blk.{layer}.{LAYER_NAMES[rest]}"


def _raw_k_quant(shape: tuple[int, int], qtype, rng: np.random.Generator) -> np.ndarray:
  """Random blocks of a K-quant type (which `gguf.quants` cannot quantize) with small, finite
  fp16 scales, as uint8 rows: shape (rows, cols), cols a multiple of 256."""
  import gguf
  block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
  blocks = rng.integers(0, 256, (shape[0], shape[1] // block_elems, block_bytes), dtype=np.uint8)
  scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
  if qtype == gguf.GGMLQuantizationType.Q6_K:  # ql, qh, int8 scales, then d (fp16)
    blocks[..., -2:] = scale
  elif qtype == gguf.GGMLQuantizationType.Q4_K:  # d, dmin (fp16), scales, qs
    blocks[..., 0:2] = scale
    blocks[..., 2:4] = scale
  else:
    raise ValueError(f"no raw writer for {qtype.name}")
  return blocks.reshape(shape[0], -1)


def write_gguf(path: str, model, arch: str, *, types: dict[str, str] | None = None,
               default_type: str = "F32", pre: str = "smollm", seed: int = 0,
               extra_tensors: dict[str, np.ndarray] | None = None,
               truncate_to: int | None = None) -> None:
  """Writes `model` (from `tiny_hf_model`) as a GGUF file of architecture `arch`.

  types: GGUF tensor name suffix (e.g. "attn_q.weight") -> ggml type name; others get
  `default_type`; 1-D tensors stay F32 (as llama.cpp stores norms and biases).
  """
  import gguf
  cfg = model.config
  tokens, merges = byte_level_vocab(cfg.vocab_size)
  tokens = tokens + [f"[PAD{i}]" for i in range(cfg.vocab_size - len(tokens))]
  writer = gguf.GGUFWriter(path, arch)
  writer.add_block_count(cfg.num_hidden_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_attention_heads)
  writer.add_head_count_kv(cfg.num_key_value_heads)
  writer.add_rope_freq_base(float(cfg.rope_theta if hasattr(cfg, "rope_theta")
                                  else cfg.rope_parameters["rope_theta"]))
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
  writer.add_vocab_size(cfg.vocab_size)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
  writer.add_token_merges(merges)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_add_bos_token(False)
  rng = np.random.default_rng(seed)
  heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
  for name, tensor in model.state_dict().items():
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    array = tensor.detach().numpy().astype(np.float32)
    out_name = gguf_name(name)
    if arch == "llama" and out_name.endswith(("attn_q.weight", "attn_q.bias")):
      array = _permute(array, heads)
    elif arch == "llama" and out_name.endswith(("attn_k.weight", "attn_k.bias")):
      array = _permute(array, kv_heads)
    kind = "F32" if array.ndim == 1 else default_type
    for suffix, t in (types or {}).items():
      if out_name.endswith(suffix) and array.ndim == 2:
        kind = t
    qtype = gguf.GGMLQuantizationType[kind]
    if kind in ("Q4_K", "Q6_K"):
      data = _raw_k_quant(array.shape, qtype, rng)
      writer.add_tensor(out_name, data, raw_dtype=qtype)
    elif kind == "F32":
      writer.add_tensor(out_name, array)
    else:
      writer.add_tensor(out_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
  for name, array in (extra_tensors or {}).items():
    writer.add_tensor(name, array)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  if truncate_to is not None:
    with open(path, "r+b") as f:
      f.truncate(truncate_to)
