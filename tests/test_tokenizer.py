"""sea_jax.tokenizer (the `tokenizers`-only reader) against transformers on every kind of
tokenizer folder sea-jax writes: the same pipeline, ids, special tokens, length and text."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sea_jax import data, gguf_io
from sea_jax.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# what a model folder's text holds: prose, numbers, unicode, odd whitespace, a special token's
# text inside ordinary text, a byte sequence that is not a whole UTF-8 character when split
TEXTS = [
    " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : Unrecorded Chronicles ( Japanese :"
    " 戦場のヴァルキュリア3 , lit . Valkyria of the Battlefield 3 ) , commonly referred to",
    "The tower is 324 metres (1,063 ft) tall.\n\n\tIt's   spaced  oddly -- isn't it? 😀 ½ é",
    "</s><s> <|endoftext|>text after a special token's text<pad>",
    "",
]


def _assert_same(ours, theirs):
  """`ours` (sea_jax.tokenizer.Tokenizer) behaves as transformers' `theirs` on TEXTS."""
  assert isinstance(ours, Tokenizer)
  assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()
  assert data.tokenizer_fingerprint(ours) == data.tokenizer_fingerprint(theirs)
  assert len(ours) == len(theirs) and ours.get_vocab() == theirs.get_vocab()
  for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
    assert getattr(ours, name) == getattr(theirs, name), name
  for special in (True, False):
    assert ours(TEXTS, add_special_tokens=special)["input_ids"] == \
        theirs(TEXTS, add_special_tokens=special)["input_ids"]
    for text in TEXTS:
      ids = ours(text, add_special_tokens=special)["input_ids"]
      assert ids == theirs(text, add_special_tokens=special)["input_ids"]
      for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == \
            theirs.decode(ids, skip_special_tokens=skip)
      assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
      for i in ids[:8]:  # one id at a time, as the visualiser labels them
        assert ours.decode([i]) == theirs.decode([i])
        assert ours.convert_ids_to_tokens(i) == theirs.convert_ids_to_tokens(i)
  assert data.protocol_bos(ours, "gptq") == data.protocol_bos(theirs, "gptq")


def test_bundled_opt_tokenizer_is_transformers_gpt2_tokenizer():
  from transformers import GPT2TokenizerFast
  theirs = GPT2TokenizerFast(
      vocab=str(data.TOKENIZER_ASSETS / "vocab.json"),
      merges=str(data.TOKENIZER_ASSETS / "merges.txt"),
      bos_token="</s>", eos_token="</s>", unk_token="</s>", pad_token="<pad>",
      add_bos_token=True, add_prefix_space=False, errors="replace")
  ours = data.bundled_tokenizer()
  _assert_same(ours, theirs)
  assert ours("Hello world")["input_ids"] == [2, 31414, 232]
  assert data.tokenizer_name(ours) == "opt"


def _saved_folders(root):
  """(kind, folder) for each kind of tokenizer folder sea-jax writes or reads."""
  import tokenizers
  import transformers
  from tests.gguf_files import tiny_hf_model, write_gguf
  folders = []
  opt = root / "opt"
  data.save_tokenizer(data.bundled_tokenizer(), opt)
  folders.append(("bundled OPT, saved", opt))
  for pre in ("smollm", "llama-bpe", "qwen2"):  # GGUF byte-level BPE, three pre-tokenizers
    path = str(root / f"tiny-{pre}.gguf")
    write_gguf(path, tiny_hf_model("llama", hidden=32, vocab=320, seed=1), "llama", pre=pre)
    folder = root / f"gguf-{pre}"
    gguf_io.open_gguf(path).save_tokenizer(str(folder))
    folders.append((f"GGUF {pre}", folder))
  bpe = tokenizers.ByteLevelBPETokenizer()  # a user's own PreTrainedTokenizerFast
  bpe.train_from_iterator([open(os.path.join(REPO, "README.md")).read()], vocab_size=400,
                          special_tokens=["<s>", "</s>", "<unk>"])
  user = root / "user-bpe"
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
      unk_token="<unk>").save_pretrained(str(user))
  folders.append(("PreTrainedTokenizerFast", user))
  return folders


def test_every_saved_folder_reads_as_transformers_reads_it(tmp_path):
  from transformers import AutoTokenizer
  for kind, folder in _saved_folders(tmp_path):
    ours = data.load_tokenizer(str(folder))
    assert isinstance(ours, Tokenizer), kind
    theirs = AutoTokenizer.from_pretrained(str(folder))
    try:
      _assert_same(ours, theirs)
    except AssertionError as e:
      raise AssertionError(f"{kind}: {e}") from e
    # what we save, transformers (and we) read back the same
    again = tmp_path / f"again-{folder.name}"
    data.save_tokenizer(ours, again)
    _assert_same(data.load_tokenizer(str(again)), AutoTokenizer.from_pretrained(str(again)))


def test_smollm2_gguf_tokenizer_reads_the_same_once_saved(tmp_path):
  """The real model's tokenizer: built from the GGUF by transformers, saved, read back here."""
  try:
    path = gguf_io.resolve_gguf("smollm2-135m")
  except gguf_io.GGUFError as e:
    pytest.skip(f"the base model is not installed ({e})")
  theirs = gguf_io.open_gguf(path).tokenizer()
  gguf_io.open_gguf(path).save_tokenizer(str(tmp_path))
  _assert_same(data.load_tokenizer(str(tmp_path)), theirs)


def test_a_folder_transformers_5_did_not_write_goes_through_auto_tokenizer(tmp_path):
  data.save_tokenizer(data.bundled_tokenizer(), tmp_path)
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  del config["backend"]  # as transformers 4 wrote it
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  assert Tokenizer.from_folder(tmp_path) is None
  tok = data.load_tokenizer(str(tmp_path))
  assert not isinstance(tok, Tokenizer)
  assert tok("Hello world")["input_ids"] == [2, 31414, 232]


def test_a_truncated_tokenizer_json_is_one_tokenizer_error(tmp_path):
  data.save_tokenizer(data.bundled_tokenizer(), tmp_path)
  raw = (tmp_path / "tokenizer.json").read_bytes()
  (tmp_path / "tokenizer.json").write_bytes(raw[:len(raw) // 2])
  with pytest.raises(data.TokenizerError, match="truncated or corrupt"):
    data.load_tokenizer(str(tmp_path))


def test_loading_a_saved_tokenizer_imports_neither_transformers_nor_torch(tmp_path):
  data.save_tokenizer(data.bundled_tokenizer(), tmp_path)
  code = ("import sys; from sea_jax import data; "
          f"t = data.load_tokenizer({str(tmp_path)!r}); b = data.load_tokenizer(None); "
          "assert t('a b')['input_ids'] == b('a b')['input_ids']; "
          "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]"
