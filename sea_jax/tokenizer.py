"""Tokenizers read with the `tokenizers` library alone: no transformers, no torch at start-up.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the whole pipeline: normalizer, pre-tokenizer,
model, post-processor, decoder) and its special tokens, and offers the part of transformers'
fast-tokenizer interface that sea-jax calls: `tok(text | texts, add_special_tokens=...)`,
`decode`, `convert_ids_to_tokens`, `bos_token_id` / `eos_token_id`, `len`, `get_vocab`,
`backend_tokenizer`, `save_pretrained`. Importing transformers costs 1.5-3.6 s per process
(its tokenizer classes import torch), which every `eval.py`, `train.py` or `generate.py` paid.

Which folders it reads (`from_folder`): those whose `tokenizer.json` transformers 5 wrote
(`tokenizer_config.json` says `"backend": "tokenizers"`), i.e. the live pipeline of the
tokenizer that saved it, which is what transformers rebuilds on load: every tokenizer sea-jax
saves (the bundled OPT one, a GGUF file's) and a Hugging Face folder saved by transformers 5.
Older or foreign folders (a converted folder keeps its source's files) go to `AutoTokenizer`
(`data.load_tokenizer`).
tests/test_tokenizer.py checks ids, special tokens, length and decoding against transformers
on every kind of folder the project writes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import tokenizers

CONFIG_FILE = "tokenizer_config.json"
PIPELINE_FILE = "tokenizer.json"
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value: Any) -> str | None:
  """A special token as tokenizer_config.json stores it (a string or an AddedToken dict)."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


class Tokenizer:
  """A `tokenizers` pipeline with its special tokens (the transformers-compatible subset).

  backend: the pipeline; config: the tokenizer_config.json entries (special tokens by text,
  `clean_up_tokenization_spaces`, ...), kept so `save_pretrained` writes them back.
  """

  is_fast = True  # as transformers calls a Rust (`tokenizers`) tokenizer

  def __init__(self, backend: tokenizers.Tokenizer, config: dict[str, Any], name_or_path: str = ""):
    self._backend = backend
    self.config = dict(config)
    self.name_or_path = name_or_path
    for name in SPECIAL_NAMES:
      setattr(self, name, _token_text(self.config.get(name)))

  @classmethod
  def from_folder(cls, folder: str | os.PathLike) -> Tokenizer | None:
    """The folder's tokenizer when transformers 5 saved it (see the module docstring), else None.

    Raises what `tokenizers` or `json` raise on a truncated or corrupt file."""
    folder = Path(folder)
    config_path, pipeline_path = folder / CONFIG_FILE, folder / PIPELINE_FILE
    if not (config_path.is_file() and pipeline_path.is_file()):
      return None
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if not isinstance(config, dict) or config.get("backend") != "tokenizers":
      return None
    backend = tokenizers.Tokenizer.from_file(str(pipeline_path))
    return cls(backend, config, name_or_path=str(folder))

  # --- what transformers' fast tokenizers offer ------------------------------------------

  @property
  def backend_tokenizer(self) -> tokenizers.Tokenizer:
    return self._backend

  def __len__(self) -> int:
    """Vocabulary size with the added tokens."""
    return self._backend.get_vocab_size(with_added_tokens=True)

  def get_vocab(self) -> dict[str, int]:
    return self._backend.get_vocab(with_added_tokens=True)

  def _id(self, token: str | None) -> int | None:
    return None if token is None else self._backend.token_to_id(token)

  @property
  def bos_token_id(self) -> int | None:
    return self._id(self.bos_token)

  @property
  def eos_token_id(self) -> int | None:
    return self._id(self.eos_token)

  @property
  def unk_token_id(self) -> int | None:
    return self._id(self.unk_token)

  @property
  def pad_token_id(self) -> int | None:
    return self._id(self.pad_token)

  def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict[str, Any]:
    """{"input_ids": ids} for one text, or a list of id lists for a list of texts."""
    if isinstance(text, str):
      return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}
    encodings = self._backend.encode_batch(list(text), add_special_tokens=add_special_tokens)
    return {"input_ids": [e.ids for e in encodings]}

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    """Text of `ids`; transformers' space clean-up only where it applies it (never for BPE)."""
    ids = [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
    text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
    if self.config.get("clean_up_tokenization_spaces") and not isinstance(
        self._backend.model, tokenizers.models.BPE):
      for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                            (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                            (" 're", "'re")):
        text = text.replace(before, after)
    return text

  def convert_ids_to_tokens(self, ids):
    if isinstance(ids, int):
      return self._backend.id_to_token(ids)
    return [self._backend.id_to_token(int(i)) for i in ids]

  def save_pretrained(self, dst: str | os.PathLike) -> None:
    """Writes tokenizer.json and tokenizer_config.json (loadable here and by transformers)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    self._backend.save(str(dst / PIPELINE_FILE))
    (dst / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
