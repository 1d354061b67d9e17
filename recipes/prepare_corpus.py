"""Split the Gutenberg corpus into training books and held-out books, and train a tokenizer.

  python recipes/prepare_corpus.py --corpus ../shared/data/gutenberg/gutenberg_40books.txt \
      --out runs/small/data [--vocab-size 8192]

Writes OUT/train.txt (37 books), OUT/heldout.txt (the last three books of the corpus, never
trained on: H. G. Wells' *The Time Machine* and *The War of the Worlds*, Oscar Wilde's *The
Picture of Dorian Gray*), OUT/split.json (character ranges and sha256 of each part) and
OUT/tokenizer/ (a byte-level BPE trained on train.txt only, saved as a Hugging Face tokenizer:
`<s>`=0, `<pad>`=1, `</s>`=2 (BOS and EOS, like OPT), `<unk>`=3); with --split-only no
tokenizer (a pretrained model's recipe). Re-running with the same inputs does nothing; every file is written through a temporary name and a rename.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

HELDOUT_MARKER = "The Time Machine\n\n\nAn Invention"
HELDOUT_BOOKS = ("Wells_The_Time_Machine", "Wells_The_War_of_the_Worlds",
                 "Wilde_The_Picture_of_Dorian_Gray")
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")


def sha256(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_corpus(text: str) -> tuple[str, str]:
  """(training books, held-out books): the cut is at the title of *The Time Machine*."""
  cut = text.find(HELDOUT_MARKER)
  if cut < 0 or text.find(HELDOUT_MARKER, cut + 1) >= 0:
    raise SystemExit(f"error: the corpus does not hold the held-out marker "
                     f"{HELDOUT_MARKER!r} exactly once; is it gutenberg_40books.txt?")
  return text[:cut].rstrip("\n") + "\n", text[cut:]


def _write_text(path: Path, text: str) -> None:
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    f.write(text)
  os.chmod(tmp, 0o644)
  os.replace(tmp, path)


def train_tokenizer(train_file: Path, vocab_size: int, out: Path) -> None:
  """A byte-level BPE over `train_file`, saved as a transformers tokenizer folder `out`."""
  from tokenizers import ByteLevelBPETokenizer
  from transformers import PreTrainedTokenizerFast

  bpe = ByteLevelBPETokenizer(add_prefix_space=False)
  bpe.train([str(train_file)], vocab_size=vocab_size, min_frequency=2,
            special_tokens=list(SPECIAL_TOKENS), show_progress=False)
  tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="</s>",
                                eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
  tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
  os.chmod(tmp, 0o755)
  tok.save_pretrained(str(tmp))
  (tmp / "SOURCE.md").write_text(
      f"Byte-level BPE ({vocab_size} tokens) trained by recipes/prepare_corpus.py on the 37 "
      "training books of the Project Gutenberg corpus (public domain); the held-out books "
      f"{', '.join(HELDOUT_BOOKS)} were not seen.\n", encoding="utf-8")
  os.replace(tmp, out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--corpus", default="../shared/data/gutenberg/gutenberg_40books.txt",
                 help="the Gutenberg corpus (default ../shared/data/gutenberg/...)")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary (default 8192)")
  p.add_argument("--split-only", action="store_true",
                 help="write the split alone, no tokenizer (a pretrained model brings its own)")
  p.add_argument("--max-train-chars", type=int, default=0,
                 help="keep only the first N characters of the training books (0: all; for "
                      "toy runs)")
  args = p.parse_args(argv)
  if args.vocab_size < 260:
    print("error: --vocab-size must be >= 260 (256 bytes + 4 special tokens)", file=sys.stderr)
    return 2
  try:
    text = Path(args.corpus).read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    print(f"error: cannot read --corpus {args.corpus}: {e}", file=sys.stderr)
    return 2
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  train, heldout = split_corpus(text)
  if args.max_train_chars > 0:
    train = train[:args.max_train_chars]
  meta = {"corpus_sha256": sha256(text), "train_chars": len(train), "heldout_chars": len(heldout),
          "train_sha256": sha256(train), "heldout_sha256": sha256(heldout),
          "heldout_books": list(HELDOUT_BOOKS),
          "vocab_size": None if args.split_only else args.vocab_size}
  done = out / "split.json"
  if (done.is_file() and json.loads(done.read_text()) == meta
      and (args.split_only or (out / "tokenizer").is_dir())):
    print(f"{out}: already prepared", file=sys.stderr)
    return 0
  _write_text(out / "train.txt", train)
  _write_text(out / "heldout.txt", heldout)
  if not args.split_only:
    if (out / "tokenizer").exists():
      import shutil
      shutil.rmtree(out / "tokenizer")
    train_tokenizer(out / "train.txt", args.vocab_size, out / "tokenizer")
  _write_text(done, json.dumps(meta, indent=2) + "\n")
  what = "" if args.split_only else f", tokenizer of {args.vocab_size} tokens"
  print(f"{out}: {len(train):,} training characters, {len(heldout):,} held-out "
        f"({', '.join(HELDOUT_BOOKS)}){what}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
