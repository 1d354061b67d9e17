"""Data: OPT tokenizer, WikiText-2 rows, perplexity protocols, training tokens and windows.

Everything works offline: the OPT vocabulary and the WikiText-2 validation/test files are
bundled under `sea_jax/assets/` (see the SOURCE.md files there).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import socket
import sys
import warnings
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from sea_jax.errors import UserError
from sea_jax.tokenizer import Tokenizer

ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER_ASSETS = ASSETS / "opt-tokenizer"
WIKITEXT_ASSETS = ASSETS / "wikitext-2-raw"
WIKITEXT_FILES = {"validation": "wiki.valid.raw", "test": "wiki.test.raw"}
SPLITS = ("train", "validation", "test")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_CACHE_FORMAT = "sea-jax-train-tokens-v1"
_HUB_PROBE_TIMEOUT_S = 2.0


class DataUnavailableError(UserError, RuntimeError):
  """Data that is neither bundled nor reachable."""


class TokenizerError(UserError, ValueError):
  """Tokenizer files that exist but cannot be loaded (truncated, corrupt)."""


class TextFileError(UserError, ValueError):
  """A text file that cannot be used: missing, unreadable, binary, not UTF-8 or empty."""


def read_text_file(path: str | os.PathLike, what: str = "text file") -> str:
  """The UTF-8 contents of `path`; TextFileError (one line) when missing, binary or empty."""
  path = str(path)
  if not os.path.exists(path):
    raise TextFileError(f"{what} {path}: no such file")
  if not os.path.isfile(path):
    raise TextFileError(f"{what} {path}: not a regular file")
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise TextFileError(f"{what} {path}: cannot read it ({e.strerror})") from None
  if b"\0" in raw:
    raise TextFileError(f"{what} {path}: binary data (NUL bytes), not a text file")
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise TextFileError(f"{what} {path}: not UTF-8 text (invalid byte at offset {e.start})"
                        ) from None
  if not text.strip():
    raise TextFileError(f"{what} {path}: the file is empty")
  return text


# ---------------------------------------------------------------------------- tokenizer


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
  """Whether `folder` holds files `AutoTokenizer` can load."""
  folder = Path(folder)
  return folder.is_dir() and any((folder / name).is_file() for name in _TOKENIZER_FILES)


def bundled_tokenizer() -> Tokenizer:
  """OPT's tokenizer, built from the bundled vocab.json + merges.txt with `tokenizers` alone.

  The pipeline serialises byte for byte like transformers' `GPT2TokenizerFast(vocab, merges,
  bos/eos/unk "</s>", pad "<pad>", add_bos_token=True)` (tests/test_tokenizer.py), so ids,
  decoding and `tokenizer_fingerprint` are the same."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors
  vocab, merges = models.BPE.read_file(str(TOKENIZER_ASSETS / "vocab.json"),
                                       str(TOKENIZER_ASSETS / "merges.txt"))
  backend = tokenizers.Tokenizer(models.BPE(vocab, merges, continuing_subword_prefix="",
                                            end_of_word_suffix="", fuse_unk=False))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                   use_regex=True)
  backend.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
  backend.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False)
                              for token in ("<pad>", "</s>")])
  backend.post_processor = processors.TemplateProcessing(
      single="</s> $A", pair="</s> $A </s>:1 $B:1", special_tokens=[("</s>", 2)])
  config = {"add_prefix_space": False, "backend": "tokenizers", "bos_token": "</s>",
            "eos_token": "</s>", "errors": "replace", "model_max_length": int(1e30),
            "pad_token": "<pad>", "tokenizer_class": "GPT2Tokenizer", "unk_token": "</s>"}
  return Tokenizer(backend, config)


def load_tokenizer(model_dir: str | None = None):
  """Tokenizer of `model_dir` when it has tokenizer files, else the bundled OPT one.

  A folder that transformers 5 saved (every tokenizer sea-jax saves) is read with `tokenizers`
  alone (`sea_jax.tokenizer`); other folders, and a `model_dir` that is not a local folder
  (tried as a hub id in the local HF cache), through transformers' `AutoTokenizer`. On a hub
  failure the bundled OPT tokenizer is used with a warning. Special tokens (OPT's leading
  `</s>`) are added only when asked: `tokenizer(text)` adds it, `add_special_tokens=False`
  does not.
  """
  if model_dir is None:
    return bundled_tokenizer()
  folder = Path(model_dir)
  if folder.is_dir():
    if not has_tokenizer_files(folder):
      return bundled_tokenizer()
    try:
      tokenizer = Tokenizer.from_folder(folder)
      if tokenizer is not None:
        return tokenizer
      from transformers import AutoTokenizer
      return AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # noqa: BLE001 - tokenizers/transformers raise many kinds here
      first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
      raise TokenizerError(f"the tokenizer files in {folder} cannot be loaded ({first}); they "
                           "may be truncated or corrupt") from None
  try:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)
  except Exception as err:  # noqa: BLE001 - any hub/cache failure means "use the bundled one"
    warnings.warn(f"could not load tokenizer {model_dir!r} ({type(err).__name__}); "
                  "using the bundled OPT tokenizer", stacklevel=2)
    return bundled_tokenizer()


def save_tokenizer(tokenizer, dst: str | os.PathLike) -> Path:
  """Save `tokenizer` to folder `dst` (loadable by `load_tokenizer(dst)`)."""
  dst = Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  tokenizer.save_pretrained(str(dst))
  return dst


def tokenizer_fingerprint(tokenizer) -> str:
  """sha256 of what decides token ids (vocabulary, merges, pre-tokenizer, special tokens)."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:  # the Rust serialisation is deterministic (vocab in id order)
    blob = backend.to_str()
  else:
    blob = json.dumps({"class": type(tokenizer).__name__, "vocab": tokenizer.get_vocab()},
                      sort_keys=True, ensure_ascii=False)
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()


_OPT_FINGERPRINT: list[str] = []


def tokenizer_name(tokenizer) -> str:
  """A short name for JSON lines: "opt" for the bundled OPT vocabulary, else the tokenizer's
  folder name, its size and the first 12 hex digits of `tokenizer_fingerprint`."""
  fingerprint = tokenizer_fingerprint(tokenizer)
  if not _OPT_FINGERPRINT:
    _OPT_FINGERPRINT.append(tokenizer_fingerprint(bundled_tokenizer()))
  if fingerprint == _OPT_FINGERPRINT[0]:
    return "opt"
  path = str(getattr(tokenizer, "name_or_path", "") or "")
  source = os.path.basename(os.path.normpath(path)) if path else ""
  return f"{source or type(tokenizer).__name__} ({len(tokenizer)} tokens, {fingerprint[:12]})"


# ---------------------------------------------------------------------------- WikiText-2


def raw_rows(text: str) -> list[str]:
  """Rows of a WikiText raw file as the HF dataset has them.

  One row per line; a blank line (" \\n" in the files) becomes ""; every other row keeps its
  trailing "\\n".
  """
  lines = text.split("\n")
  rows = [line + "\n" for line in lines[:-1]]
  if lines[-1]:
    rows.append(lines[-1])
  return [row if row.strip() else "" for row in rows]


def _hub_reachable() -> bool:
  """Quick TCP probe of the hub (never hangs longer than a couple of seconds)."""
  url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
  port = url.port or (443 if url.scheme == "https" else 80)
  try:
    socket.create_connection((url.hostname, port), timeout=_HUB_PROBE_TIMEOUT_S).close()
    return True
  except OSError:
    return False


def _offline_env() -> bool:
  """Whether HF_DATASETS_OFFLINE / HF_HUB_OFFLINE ask for offline mode."""
  flags = (os.environ.get(name, "") for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
  return any(flag.strip().upper() in ("1", "ON", "YES", "TRUE") for flag in flags)


def _hf_wikitext_rows(split: str) -> list[str] | None:
  """Rows from `datasets.load_dataset` (network or local cache), None when unavailable."""
  if not _offline_env() and not _hub_reachable():
    return None
  try:
    import datasets
    ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    return list(ds["text"])
  except Exception:  # noqa: BLE001 - offline, unreachable, missing cache: all mean "fall back"
    return None


def _bundled_wikitext_rows(split: str) -> list[str]:
  """Rows of the bundled raw file of `split` (validation or test)."""
  if split not in WIKITEXT_FILES:
    raise DataUnavailableError(
        f"the WikiText-2 {split!r} split is not bundled (only validation and test are) and the "
        "Hugging Face hub is unreachable; pass your own training text with --train-text PATH "
        "(e.g. wiki.train.raw of wikitext-2-raw-v1)")
  return raw_rows((WIKITEXT_ASSETS / WIKITEXT_FILES[split]).read_text(encoding="utf-8"))


def wikitext_rows(split: str, source: str = "auto") -> list[str]:
  """Rows of HF `wikitext`/`wikitext-2-raw-v1` `split` ("train", "validation", "test").

  source: "auto" (datasets when reachable or cached, else bundled), "hf", or "bundled".
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  if source not in ("auto", "hf", "bundled"):
    raise ValueError(f"unknown source {source!r}; expected 'auto', 'hf' or 'bundled'")
  if source != "bundled":
    rows = _hf_wikitext_rows(split)
    if rows is not None:
      return rows
    if source == "hf":
      raise DataUnavailableError(f"could not load wikitext-2-raw-v1 {split!r} with datasets")
  return _bundled_wikitext_rows(split)


# ---------------------------------------------------------------------------- perplexity protocols


@dataclasses.dataclass(frozen=True)
class Protocol:
  """A perplexity protocol: which split, and whether one leading BOS (`</s>`) is added."""
  name: str
  split: str
  add_bos: bool


PROTOCOLS = {
    "sea": Protocol("sea", "validation", add_bos=False),  # the SEA paper (spec §4)
    "gptq": Protocol("gptq", "test", add_bos=True),  # GPTQ/SparseGPT: 287,645 tokens for OPT
}


def _as_protocol(protocol: str | Protocol) -> Protocol:
  """Protocol object from a name or a Protocol."""
  if isinstance(protocol, Protocol):
    return protocol
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
  return PROTOCOLS[protocol]


def protocol_bos(tokenizer, protocol: str | Protocol) -> dict | None:
  """{"token", "id"} of the token `protocol` prepends (gptq), None when it adds none."""
  if not _as_protocol(protocol).add_bos:
    return None
  token_id = _bos_id(tokenizer)
  return {"token": tokenizer.convert_ids_to_tokens(token_id), "id": token_id}


def _bos_id(tokenizer) -> int:
  """The id the gptq protocol prepends: the tokenizer's BOS (OPT's is `</s>` = 2), else EOS."""
  token_id = tokenizer.bos_token_id
  if token_id is None:
    token_id = tokenizer.eos_token_id
  if token_id is None:
    raise ValueError("tokenizer has neither a bos nor an eos token")
  return int(token_id)


def encode(tokenizer, text: str) -> np.ndarray:
  """`text` encoded in one call without special tokens, as int32."""
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  return np.asarray(ids, dtype=np.int32)


def protocol_tokens(tokenizer, protocol: str | Protocol, source: str = "auto") -> np.ndarray:
  """Evaluation tokens of `protocol` ("sea" or "gptq") as a 1-D int32 array.

  Rows joined with "\\n\\n", encoded without special tokens, plus one leading BOS for gptq.
  With the OPT tokenizer: 251,048 (sea) and 287,645 (gptq) tokens.
  """
  spec = _as_protocol(protocol)
  tokens = encode(tokenizer, "\n\n".join(wikitext_rows(spec.split, source=source)))
  if spec.add_bos:
    tokens = np.concatenate([np.asarray([_bos_id(tokenizer)], np.int32), tokens])
  return tokens


def eval_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """Non-overlapping windows (num_windows, seq_len) from 0; the last partial one is dropped."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
  if seq_len < 1:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  num_windows = tokens.size // seq_len
  if num_windows == 0:
    raise ValueError(f"text too short: {tokens.size} tokens, one window needs {seq_len}")
  return tokens[:num_windows * seq_len].reshape(num_windows, seq_len)


# ---------------------------------------------------------------------------- training tokens

# A cut between a printable non-space ASCII character and the whitespace that follows it is a
# boundary of the byte-level BPE pre-tokenizer (GPT-2/OPT regex: no pre-token spans it, and the
# one after starts afresh) whatever comes around it, so encoding the chunks separately gives
# exactly the tokens of one call. Cuts are taken at line ends (before "[ \t]*\n"). Tokenizers
# that add a prefix space per call (e.g. SentencePiece) may differ by a token at each cut:
# negligible for training.
_CUT = re.compile(r"[!-~](?=[ \t]*\n)")


def split_text(text: str, chunk_chars: int) -> list[str]:
  """`text` in pieces of about `chunk_chars` characters, cut only at token-safe line ends."""
  pieces, start = [], 0
  while len(text) - start > chunk_chars:
    match = _CUT.search(text, start + chunk_chars)
    if match is None:
      break
    cut = match.end()
    pieces.append(text[start:cut])
    start = cut
  pieces.append(text[start:])
  return pieces


def _encode_chunks(tokenizer, pieces: list[str], progress: bool) -> np.ndarray:
  """Encode `pieces` (in small batches, with a tqdm bar on stderr) and concatenate."""
  from tqdm import tqdm

  group = max(1, os.cpu_count() or 1)
  out = []
  with tqdm(total=sum(map(len, pieces)), unit="char", unit_scale=True, desc="tokenizing",
            file=sys.stderr, disable=not progress) as bar:
    for i in range(0, len(pieces), group):
      batch = pieces[i:i + group]
      for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
        out.append(np.asarray(ids, dtype=np.int32))
      bar.update(sum(map(len, batch)))
  return np.concatenate(out) if out else np.zeros((0,), np.int32)


def _read_texts(paths: list[str], wikitext_raw: bool) -> list[str]:
  """Contents of `paths` (as WikiText rows when `wikitext_raw`); all checked to exist first."""
  for path in paths:
    if not Path(path).is_file():
      raise FileNotFoundError(f"training text not found: {path}")
  texts = [read_text_file(path, "training text") for path in paths]
  if wikitext_raw:
    texts = ["\n\n".join(raw_rows(text)) for text in texts]
  return texts


def training_text(paths: list[str] | None, wikitext_raw: bool = False) -> str:
  """The training text: files (or WikiText-2 train rows when `paths` is None) joined by "\\n\\n"."""
  if paths is None:
    return "\n\n".join(wikitext_rows("train"))
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  return "\n\n".join(_read_texts([str(p) for p in paths], wikitext_raw))


def _cache_path(cache_dir: str | os.PathLike, text: str, tokenizer) -> Path:
  """Cache file keyed by sha256 of (format, text sha256, tokenizer fingerprint)."""
  text_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
  key = f"{_CACHE_FORMAT}|{text_hash}|{tokenizer_fingerprint(tokenizer)}"
  return Path(cache_dir) / f"train-tokens-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npy"


def _save_atomic(path: Path, tokens: np.ndarray) -> None:
  """np.save to a temporary name, then rename (safe against concurrent writers)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
  np.save(tmp, tokens)
  os.replace(tmp, path)


def load_training_tokens(paths: list[str] | None, tokenizer, cache_dir: str | None,
                         *, wikitext_raw: bool = False, chunk_chars: int = 1 << 20,
                         progress: bool | None = None) -> np.ndarray:
  """Training tokens (1-D int32): texts joined by "\\n\\n", encoded once, no special tokens.

  paths: text files, or None for WikiText-2 train via `datasets` (DataUnavailableError when
  neither reachable nor cached). wikitext_raw: read each file as WikiText raw rows (reproduces
  the HF split from e.g. wiki.train.raw). The result is cached in `cache_dir` (None: no cache),
  keyed by the text's sha256 and the tokenizer's fingerprint. progress: tqdm bar on stderr
  (None: only for texts longer than 4 chunks).
  """
  text = training_text(paths, wikitext_raw)
  cache = _cache_path(cache_dir, text, tokenizer) if cache_dir is not None else None
  if cache is not None and cache.is_file():
    return np.load(cache)
  pieces = split_text(text, chunk_chars)
  tokens = _encode_chunks(tokenizer, pieces, len(pieces) > 4 if progress is None else progress)
  if cache is not None:
    _save_atomic(cache, tokens)
  return tokens


# ---------------------------------------------------------------------------- training windows


class WindowSampler:
  """Seeded, resumable random windows of seq_len + 1 tokens over every start offset.

  A row w of `batch()` has seq_len + 1 tokens: inputs w[:-1], next-token targets w[1:].
  Each epoch visits every start offset 0 .. len(tokens) - seq_len - 1 once, in the order of a
  permutation drawn from PCG64(SeedSequence([seed, epoch])); batches run across epoch ends.
  The position is (epoch, index): `state()` / `restore()` / `from_state()`.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0):
    self.tokens = np.asarray(tokens)
    if self.tokens.ndim != 1:
      raise ValueError(f"tokens must be 1-D, got shape {self.tokens.shape}")
    if seq_len < 1:
      raise ValueError(f"seq_len must be positive, got {seq_len}")
    self.seq_len = int(seq_len)
    self.seed = int(seed)
    self.num_windows = self.tokens.size - self.seq_len
    if self.num_windows < 1:
      raise ValueError(f"text too short: {self.tokens.size} tokens, one training window "
                       f"needs {self.seq_len + 1}")
    self.epoch, self.index = 0, 0
    self._perm_epoch, self._perm = None, None

  def _permutation(self, epoch: int) -> np.ndarray:
    """Start offsets of `epoch` in visiting order (the current epoch's is kept)."""
    if self._perm_epoch != epoch:
      rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
      dtype = np.int32 if self.num_windows < 2**31 else np.int64
      self._perm = rng.permutation(self.num_windows).astype(dtype)
      self._perm_epoch = epoch
    return self._perm

  def _next_offsets(self, count: int) -> np.ndarray:
    """The next `count` start offsets of the global stream; advances the position."""
    parts = []
    while count > 0:
      take = min(count, self.num_windows - self.index)
      parts.append(self._permutation(self.epoch)[self.index:self.index + take])
      self.index += take
      count -= take
      if self.index == self.num_windows:
        self.epoch, self.index = self.epoch + 1, 0
    return np.concatenate(parts).astype(np.int64)

  def batch(self, batch_size: int, shard_index: int = 0, num_shards: int = 1) -> np.ndarray:
    """This host's rows (batch_size // num_shards, seq_len + 1) of the next global batch.

    Every host draws the same global batch and advances by `batch_size`; host `shard_index`
    gets rows [shard_index * b, (shard_index + 1) * b) with b = batch_size // num_shards.
    """
    if batch_size < 1 or batch_size % num_shards:
      raise ValueError(f"batch_size {batch_size} must be a positive multiple of "
                       f"num_shards {num_shards}")
    if not 0 <= shard_index < num_shards:
      raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
    rows = batch_size // num_shards
    offsets = self._next_offsets(batch_size)[shard_index * rows:(shard_index + 1) * rows]
    return self.tokens[offsets[:, None] + np.arange(self.seq_len + 1)]

  def state(self) -> dict:
    """Position and identity, small and JSON-serialisable."""
    return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
            "seq_len": self.seq_len, "num_tokens": int(self.tokens.size)}

  def restore(self, state: dict) -> "WindowSampler":
    """Resume at `state`'s position (checks seed/seq_len/num_tokens when present)."""
    mine = self.state()
    for key in ("seed", "seq_len", "num_tokens"):
      if key in state and int(state[key]) != mine[key]:
        raise ValueError(f"sampler state has {key}={state[key]}, this sampler {mine[key]}")
    index = int(state["index"])
    if not 0 <= index < self.num_windows:
      raise ValueError(f"sampler state index {index} not in [0, {self.num_windows})")
    self.epoch, self.index = int(state["epoch"]), index
    return self

  @classmethod
  def from_state(cls, tokens: np.ndarray, state: dict) -> "WindowSampler":
    """A sampler over `tokens` at `state` (which must carry seq_len; seed defaults to 0)."""
    return cls(tokens, int(state["seq_len"]), int(state.get("seed", 0))).restore(state)
