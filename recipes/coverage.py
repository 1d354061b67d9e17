"""Per-layer coverage of a SEA student's kept mask (the teacher's attention mass on the kept
keys, mean over rows and heads) and its gate means, at a given k, on the first windows of a
text file; one JSON object on stdout.

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
  p.add_argument("--teacher", required=True, help="dense teacher model folder")
  p.add_argument("--student", required=True, help="SEA student model folder")
  p.add_argument("--text-file", required=True, help="UTF-8 text (e.g. the held-out books)")
  p.add_argument("--sea-k", type=int, help="k to measure at (default: the student's)")
  p.add_argument("--seq-len", type=int, default=512, help="window length (default 512)")
  p.add_argument("--windows", type=int, default=8, help="first N windows (default 8)")
  args = p.parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from sea_jax import checkpoint, data, losses
  teacher = checkpoint.load_model(args.teacher)
  student = checkpoint.load_model(args.student)
  tokens = data.encode(checkpoint.model_tokenizer(args.student), data.read_text_file(args.text_file))
  windows = data.eval_windows(tokens, args.seq_len + 1)[: args.windows]
  k = args.sea_k or student.config.sea.k

  @jax.jit
  def diagnostics(window):
    inputs, targets = window[None, :-1], window[None, 1:]
    t_out = teacher(inputs, output_hidden_states=True, return_attn_aux=True)
    s_out = student(inputs, sea_k=k, output_hidden_states=True, return_attn_aux=True)
    _, terms = losses.distillation_loss(t_out, s_out, targets, K=student.config.sea.K,
                                        query_block=128)
    return {name: v for name, v in terms.items() if name.startswith(("coverage_", "s_"))}

  per_window = [jax.device_get(diagnostics(jnp.asarray(w))) for w in windows]
  out = {"sea_k": k, "windows": len(per_window), "seq_len": args.seq_len,
         **{name: round(float(np.mean([d[name] for d in per_window])), 4)
            for name in sorted(per_window[0])}}
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
