"""Perplexity of a dense model with SEA's sparse attention on an *oracle* mask: in every layer
the grouped top-k of the layer's own attention mass per bin (`losses.teacher_bin_mass`), gates
at 1, no estimator. The ceiling any estimator can reach at that k; one JSON line on stdout.

  python recipes/oracle_perplexity.py --model smollm2-135m --seq-len 1024 --sea-k 64 --windows 4

It replaces `SEAAttention._forward` for this process only (an experiment, not a model): the
mask needs the T×T scores, one query block at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="smollm2-135m", help="dense model (folder, GGUF, short name)")
  p.add_argument("--seq-len", type=int, default=1024)
  p.add_argument("--sea-k", type=int, default=64)
  p.add_argument("--sea-K", type=int, default=256)
  p.add_argument("--windows", type=int, default=4, help="first N windows of validation (sea "
                                                        "protocol)")
  args = p.parse_args(argv)
  from sea_jax import checkpoint, data, evaluate, losses
  from sea_jax import sharding as shd
  from sea_jax.sea import layer as sea_layer
  from sea_jax.sea.topk import grouped_topk_mask

  def oracle_forward(self, q, k, v, sea_k, *, return_aux=False, return_history=False):
    del return_aux, return_history
    mass = losses.teacher_bin_mass({"q": q, "k": k}, K=self.K)
    mask = grouped_topk_mask(mass, self.k if sea_k is None else sea_k)
    context = sea_layer.sparse_dispatch("auto", q, k, v, mask, query_block=128)
    return context.astype(v.dtype), {}, None

  sea_layer.SEAAttention._forward = oracle_forward
  model = checkpoint.load_pretrained(args.model, attention="sea", sea_K=args.sea_K)
  tokens = data.protocol_tokens(checkpoint.model_tokenizer(args.model), "sea")
  windows = data.eval_windows(tokens, args.seq_len)[: args.windows]
  result = evaluate.perplexity(model, windows, batch_size=1, mesh=shd.make_mesh(None),
                               sea_k=args.sea_k, progress=False)
  print(json.dumps({"mask": "oracle", "model": args.model, "seq_len": args.seq_len,
                    "sea_k": args.sea_k, "sea_K": args.sea_K, "windows": int(windows.shape[0]),
                    "perplexity": result.perplexity}))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
