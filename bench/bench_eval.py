"""Eval throughput (tokens/s) of the Flax OPT vs transformers' PyTorch OPT on the same CPU, and
the converter's peak host memory, for an opt-125m-shaped random model at seq-len 2048.

  python bench/bench_eval.py [--windows 2] [--layers 12] [--out-md FILE]

Prints a Markdown table (device, versions, date).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import report_files  # noqa: E402


def opt125m_config(layers: int):
  import transformers
  return transformers.OPTConfig(vocab_size=50272, hidden_size=768, num_hidden_layers=layers,
                                ffn_dim=3072, num_attention_heads=12, max_position_embeddings=2048,
                                word_embed_proj_dim=768, dropout=0.0)


def torch_tokens_per_s(model, windows) -> float:
  import torch
  with torch.no_grad():
    model(torch.tensor(windows[:1]).long())  # warm-up
    start = time.perf_counter()
    for w in windows:
      model(torch.tensor(w[None]).long())
  return windows.size / (time.perf_counter() - start)


def flax_tokens_per_s(folder: str, windows, dtype: str, repeats: int = 2, **overrides) -> float:
  """Best of `repeats` timed passes over the windows (runs on 2 shared cores vary by 30%)."""
  from sea_jax import checkpoint, evaluate, sharding
  mesh = sharding.make_mesh(None)
  model = checkpoint.load_pretrained(folder, mesh, dtype=dtype, **overrides)
  evaluate.perplexity(model, windows[:1], batch_size=1, mesh=mesh, progress=False)  # compile
  seconds = min(evaluate.perplexity(model, windows, batch_size=1, mesh=mesh,
                                    progress=False).seconds for _ in range(repeats))
  return windows.size / seconds


def converter_peak_rss(src: str, dst: str) -> int:
  """Peak RSS of `python -m sea_jax.convert SRC DST` in a fresh process (bytes)."""
  code = ("import resource, sys; from sea_jax import convert; rc = convert.main(sys.argv[1:]); "
          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
  out = subprocess.run([sys.executable, "-c", code, src, dst], cwd=REPO, check=True,
                       capture_output=True, text=True)
  return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--windows", type=int, default=2, help="timed windows of 2048 tokens")
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--repeats", type=int, default=2, help="timed passes per Flax model; the best")
  p.add_argument("--out-md", help="also write the table here")
  args = p.parse_args()
  report_files.claim(__file__, args.out_md)
  import jax
  import torch
  import transformers
  from sea_jax import data
  torch.manual_seed(0)
  hf = transformers.OPTForCausalLM(opt125m_config(args.layers)).eval()
  params = sum(p.numel() for p in hf.parameters())  # the tied head is counted once
  tokens = data.protocol_tokens(data.load_tokenizer(None), "sea")
  windows = data.eval_windows(tokens, 2048)[: args.windows]
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(os.path.join(tmp, "hf"))
    torch_tps = torch_tokens_per_s(hf, windows)
    peak = converter_peak_rss(os.path.join(tmp, "hf"), os.path.join(tmp, "sj"))
    flax32 = flax_tokens_per_s(os.path.join(tmp, "sj"), windows, "float32", args.repeats)
    flax16 = flax_tokens_per_s(os.path.join(tmp, "sj"), windows, "bfloat16", args.repeats)
    # fresh SEA modules, k = 64: the work, not the accuracy
    sea32 = flax_tokens_per_s(os.path.join(tmp, "sj"), windows, "float32", args.repeats,
                              attention="sea", sea_K=256)
  model_bytes = params * 4
  rows = [
      f"Device: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
      f"backend {jax.default_backend()}; jax {jax.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}; {datetime.date.today()}. "
      f"Model: opt-125m shape ({args.layers} layers, {params / 1e6:.1f} M parameters, random), "
      f"seq-len 2048, batch 1, {args.windows} windows, best of {args.repeats} timed passes "
      "after one warm-up.",
      "",
      "| implementation | tokens/s |",
      "|---|---|",
      f"| transformers OPTForCausalLM (PyTorch, fp32, {torch.get_num_threads()} threads) | {torch_tps:.0f} |",
      f"| sea-jax Flax OPT (jit, fp32) | {flax32:.0f} |",
      f"| sea-jax Flax OPT (jit, bf16 compute) | {flax16:.0f} |",
      f"| sea-jax Flax OPT with SEA attention (K = 256, k = 64, untrained modules; jit, fp32) "
      f"| {sea32:.0f} ({sea32 / flax32:.2f}x dense) |",
      "",
      "| converter (`python -m sea_jax.convert`, safetensors) | bytes |",
      "|---|---|",
      f"| model parameters in fp32 | {model_bytes:,} |",
      f"| converter peak RSS (whole process, incl. JAX runtime) | {peak:,} ({peak / model_bytes:.2f}x model) |",
  ]
  table = "\n".join(rows)
  print(table)
  report_files.write_markdown(__file__, args.out_md, table)


if __name__ == "__main__":
  main()
