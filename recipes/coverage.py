"""Per-layer coverage of a SEA student's kept mask (the teacher's attention mass on the kept
keys, mean over rows and heads), the oracle coverage at the same k (the grouped top-k of the
teacher's own mass per bin: the best any estimator can keep) and the gate means, on the first
windows of a text file (or WikiText-2 validation by the sea protocol); one JSON object on
stdout.

  python recipes/coverage.py --teacher T --student S --text-file F [--sea-k 32]
                             [--seq-len 512] [--windows 8]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--teacher", required=True, help="dense teacher (model folder, GGUF file or "
                                                 "short name)")
  p.add_argument("--student", required=True, help="SEA student model folder")
  p.add_argument("--text-file", help="UTF-8 text (e.g. the held-out books; default: "
                                     "WikiText-2 validation, sea protocol)")
  p.add_argument("--sea-k", type=int, help="k to measure at (default: the student's)")
  p.add_argument("--seq-len", type=int, default=512, help="window length (default 512)")
  p.add_argument("--windows", type=int, default=8, help="first N windows (default 8)")
  args = p.parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from sea_jax import checkpoint, data, losses
  from sea_jax.sea.topk import grouped_topk_mask
  teacher = checkpoint.load_pretrained(args.teacher)
  student = checkpoint.load_pretrained(args.student)
  tokenizer = checkpoint.model_tokenizer(args.student)
  tokens = (data.encode(tokenizer, data.read_text_file(args.text_file)) if args.text_file
            else data.protocol_tokens(tokenizer, "sea"))
  windows = data.eval_windows(tokens, args.seq_len + 1)[: args.windows]
  k = args.sea_k or student.config.sea.k

  @jax.jit
  def diagnostics(window):
    inputs, targets = window[None, :-1], window[None, 1:]
    t_out = teacher(inputs, output_hidden_states=True, return_attn_aux=True)
    s_out = student(inputs, sea_k=k, output_hidden_states=True, return_attn_aux=True)
    K = student.config.sea.K
    _, terms = losses.distillation_loss(t_out, s_out, targets, K=K, query_block=128)
    out = {name: v for name, v in terms.items() if name.startswith(("coverage_", "s_"))}
    for i, aux in enumerate(t_out.attn_aux):
      mass = losses.teacher_bin_mass(aux, K=K)
      best = grouped_topk_mask(mass, k)
      out[f"oracle_{i}"] = jnp.sum(jnp.where(best, mass, 0.0)) / (mass.shape[1] * mass.shape[2])
    return out

  per_window = [jax.device_get(diagnostics(jnp.asarray(w))) for w in windows]
  out = {"sea_k": k, "windows": len(per_window), "seq_len": args.seq_len,
         **{name: round(float(np.mean([d[name] for d in per_window])), 4)
            for name in sorted(per_window[0])}}
  layers = sorted(int(n.split("_")[1]) for n in out if n.startswith("coverage_"))
  out["coverage_mean"] = round(float(np.mean([out[f"coverage_{i}"] for i in layers])), 4)
  out["oracle_mean"] = round(float(np.mean([out[f"oracle_{i}"] for i in layers])), 4)
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
