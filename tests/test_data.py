"""Tests of sea_jax.data: token counts, rows rule, windows, tokenizer, training cache, sampler."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sea_jax import data  # noqa: E402

SHARED = Path(os.environ.get("SEA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
GUTENBERG = SHARED / "gutenberg" / "gutenberg_40books.txt"


@pytest.fixture(scope="module")
def tok():
  return data.load_tokenizer()


@pytest.fixture(scope="module")
def sea_tokens(tok):
  return data.protocol_tokens(tok, "sea", source="bundled")


@pytest.fixture(scope="module")
def gptq_tokens(tok):
  return data.protocol_tokens(tok, "gptq", source="bundled")


def test_bundled_tokenizer_is_opt(tok):
  assert tok.is_fast
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 2, 1)
  assert tok("Hello world")["input_ids"] == [2, 31414, 232]
  assert tok("Hello world", add_special_tokens=False)["input_ids"] == [31414, 232]


def test_sea_protocol_count(sea_tokens):
  assert sea_tokens.dtype == np.int32
  assert sea_tokens.size == 251_048
  assert sea_tokens[0] != 2
  assert data.eval_windows(sea_tokens, 2048).shape == (122, 2048)


def test_gptq_protocol_count(gptq_tokens):
  assert gptq_tokens.size == 287_645
  assert gptq_tokens[0] == 2
  assert data.eval_windows(gptq_tokens, 2048).shape == (140, 2048)


def test_auto_source_falls_back_offline():
  rows = data.wikitext_rows("validation")  # offline env: datasets fails fast, bundled rows
  assert rows == data.wikitext_rows("validation", source="bundled")
  assert len(rows) == 3760


def test_rows_rule(tmp_path):
  raw = " \n = Title = \n \n Some text .\n \n"
  assert data.raw_rows(raw) == ["", " = Title = \n", "", " Some text .\n", ""]
  path = tmp_path / "tiny.raw"
  path.write_text(raw, encoding="utf-8")
  text = data.training_text([str(path)], wikitext_raw=True)
  assert text == "\n\n = Title = \n\n\n\n\n Some text .\n\n\n"


def test_bundled_rows_shape():
  rows = data.wikitext_rows("test", source="bundled")
  assert len(rows) == 4358
  assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
  assert all(r == "" or r.endswith("\n") for r in rows)


def test_train_split_not_bundled():
  with pytest.raises(data.DataUnavailableError, match="--train-text"):
    data.wikitext_rows("train", source="bundled")


def test_eval_windows_drop_partial_and_short():
  windows = data.eval_windows(np.arange(10, dtype=np.int32), 4)
  np.testing.assert_array_equal(windows, [[0, 1, 2, 3], [4, 5, 6, 7]])
  with pytest.raises(ValueError, match="too short"):
    data.eval_windows(np.arange(3), 4)


def test_tokenizer_roundtrip(tok, tmp_path):
  data.save_tokenizer(tok, tmp_path / "tok")
  loaded = data.load_tokenizer(str(tmp_path / "tok"))
  text = "\n\n".join(data.wikitext_rows("validation", source="bundled")[:400])
  assert loaded(text)["input_ids"] == tok(text)["input_ids"]
  assert loaded.get_vocab() == tok.get_vocab()
  assert data.tokenizer_fingerprint(loaded) == data.tokenizer_fingerprint(tok)
  # a folder without tokenizer files gives the bundled tokenizer
  empty = tmp_path / "empty"
  empty.mkdir()
  assert data.tokenizer_fingerprint(data.load_tokenizer(str(empty))) == data.tokenizer_fingerprint(tok)


def test_chunked_encode_equals_one_call(tok):
  text = "\n\n".join(data.wikitext_rows("test", source="bundled"))[:300_000]
  pieces = data.split_text(text, 20_000)
  assert len(pieces) > 10 and "".join(pieces) == text
  chunked = data._encode_chunks(tok, pieces, progress=False)
  np.testing.assert_array_equal(chunked, data.encode(tok, text))


def test_training_cache_hit(tok, tmp_path, monkeypatch):
  a, b = tmp_path / "a.txt", tmp_path / "b.txt"
  a.write_text("The quick brown fox.\nJumps over the lazy dog.\n" * 200, encoding="utf-8")
  b.write_text("Second file, second paragraph.\n" * 100, encoding="utf-8")
  paths = [str(a), str(b)]
  cache = tmp_path / "cache"
  first = data.load_training_tokens(paths, tok, str(cache), chunk_chars=1000)
  np.testing.assert_array_equal(first, data.encode(tok, data.training_text(paths)))
  assert len(list(cache.glob("*.npy"))) == 1

  def fail(*args, **kwargs):
    raise AssertionError("cache hit must not re-encode")

  monkeypatch.setattr(data, "_encode_chunks", fail)
  second = data.load_training_tokens(paths, tok, str(cache))
  np.testing.assert_array_equal(first, second)
  assert second.dtype == np.int32
  b.write_text("Changed.\n", encoding="utf-8")  # new contents: new key, re-encode
  with pytest.raises(AssertionError, match="re-encode"):
    data.load_training_tokens(paths, tok, str(cache))


@pytest.mark.skipif(not GUTENBERG.is_file(), reason=f"shared Gutenberg corpus not at {GUTENBERG}")
def test_gutenberg_excerpt(tok, tmp_path):
  excerpt = tmp_path / "gutenberg_excerpt.txt"
  with open(GUTENBERG, encoding="utf-8") as f:
    excerpt.write_text(f.read(400_000), encoding="utf-8")
  tokens = data.load_training_tokens([str(excerpt)], tok, str(tmp_path / "cache"),
                                     chunk_chars=50_000, progress=False)
  np.testing.assert_array_equal(tokens, data.encode(tok, excerpt.read_text(encoding="utf-8")))
  sampler = data.WindowSampler(tokens, 2048, seed=0)
  assert sampler.batch(4).shape == (4, 2049)


def test_missing_file_error(tok, tmp_path):
  missing = str(tmp_path / "nope.txt")
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    data.load_training_tokens([missing], tok, str(tmp_path))


def test_sampler_deterministic_and_windows():
  tokens = np.arange(1000, dtype=np.int32)
  a = data.WindowSampler(tokens, 16, seed=3)
  b = data.WindowSampler(tokens, 16, seed=3)
  batch = a.batch(8)
  np.testing.assert_array_equal(batch, b.batch(8))
  assert batch.shape == (8, 17)
  np.testing.assert_array_equal(batch - batch[:, :1], np.broadcast_to(np.arange(17), (8, 17)))
  assert not np.array_equal(data.WindowSampler(tokens, 16, seed=4).batch(8), batch)


def test_sampler_epoch_covers_every_offset():
  tokens = np.arange(50, dtype=np.int32)
  sampler = data.WindowSampler(tokens, 9, seed=0)  # 41 start offsets
  starts = np.concatenate([sampler.batch(4)[:, 0] for _ in range(10)] + [sampler.batch(1)[:, 0]])
  assert sorted(starts.tolist()) == list(range(41))
  assert sampler.state()["epoch"] == 1 and sampler.state()["index"] == 0


def test_sampler_resume_exactly():
  tokens = np.arange(300, dtype=np.int32)
  ref = data.WindowSampler(tokens, 32, seed=7)
  for _ in range(30):  # crosses epoch ends (268 offsets)
    ref.batch(12)
  state = dict(ref.state())
  expected = [ref.batch(12) for _ in range(5)]
  resumed = data.WindowSampler.from_state(tokens, state)
  for want in expected:
    np.testing.assert_array_equal(resumed.batch(12), want)
  with pytest.raises(ValueError, match="seed"):
    data.WindowSampler(tokens, 32, seed=8).restore(state)


def test_sampler_host_shards_partition_global_batch():
  tokens = np.arange(500, dtype=np.int32)
  full = data.WindowSampler(tokens, 8, seed=1)
  hosts = [data.WindowSampler(tokens, 8, seed=1) for _ in range(4)]
  for _ in range(3):
    want = full.batch(16)
    got = np.concatenate([h.batch(16, shard_index=i, num_shards=4) for i, h in enumerate(hosts)])
    np.testing.assert_array_equal(got, want)
  assert all(h.state() == full.state() for h in hosts)
  with pytest.raises(ValueError):
    full.batch(10, 0, 4)


def test_sampler_text_too_short():
  with pytest.raises(ValueError, match="too short"):
    data.WindowSampler(np.arange(2048, dtype=np.int32), 2048)
