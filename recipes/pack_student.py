"""Packs a SEA student distilled on a frozen base as its SEA parameters alone.

  python recipes/pack_student.py --student runs/smollm2/student/final --base smollm2-135m \
      --out runs/smollm2/shipped [--sea-k 64] [--sea-pooled-keys]
      [--archive sea_jax/assets/models/NAME.tar.xz]

Writes a model folder holding config.json, the SEA modules of every layer (`params/`: the
estimator, gates and position table stored in --param-dtype, the fixed random features in
float32) and base.json naming the base by its sha256 (`checkpoint.read_base_params` checks it
when the folder is loaded; every other weight comes from the base). With --archive the folder
is also packed as the tar.xz that `python eval.py` evaluates by default (`sea_jax.bundle`).
"""
from __future__ import annotations

import argparse
import os
import sys
import tarfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--student", required=True, help="the trained student's model folder (final/)")
  p.add_argument("--base", required=True, help="the frozen base it was distilled on (GGUF "
                                               "short name or file)")
  p.add_argument("--out", required=True, help="the packed folder (new)")
  p.add_argument("--sea-k", type=int, help="the packed student's default k (default: its own)")
  p.add_argument("--param-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                 help="storage of the trained SEA parameters (default bfloat16; computed in "
                      "float32)")
  p.add_argument("--sea-pooled-keys", action="store_true",
                 help="turn on the pooled-key mix (SEAConfig.pooled_keys); a student trained "
                      "without it gets the mix at its initial values (w = 0.5, tau = 1)")
  p.add_argument("--archive", help="also write this tar.xz of the folder")
  args = p.parse_args(argv)
  import dataclasses

  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from sea_jax import checkpoint
  from sea_jax.config import load_config
  from sea_jax.safe_write import atomic_folder, check_destination
  from sea_jax.sea.layer import RandomFeatures

  check_destination(args.out, [args.student], "--out")
  config = load_config(args.student)
  if config.attention != "sea":
    raise SystemExit(f"error: {args.student} is not a SEA student (attention {config.attention})")
  if args.sea_k is not None:
    config = dataclasses.replace(config, sea=dataclasses.replace(config.sea, k=args.sea_k))
  if args.sea_pooled_keys:
    config = dataclasses.replace(config, sea=dataclasses.replace(config.sea, pooled_keys=True))
  graphdef, abstract = checkpoint.abstract_model(config)
  restored, missing = checkpoint.restore_params(args.student, abstract, None)
  fresh = [path for path in missing if "pooled" in path] if args.sea_pooled_keys else []
  if len(fresh) < len(missing):
    raise SystemExit(f"error: {args.student} lacks {len(missing) - len(fresh)} parameters")
  if fresh:  # the mix at its initial values (constants, whatever the seed), as loading does
    model = checkpoint.assemble(config, graphdef, abstract, restored, fresh, None)
    restored = nnx.to_pure_dict(nnx.state(model))
  fixed = {p for p, _ in checkpoint.flatten(nnx.to_pure_dict(
      nnx.state(nnx.merge(graphdef, abstract), RandomFeatures))).items()}
  sea_only = {}
  for path, value in checkpoint.flatten(restored).items():
    if checkpoint.FRESH_OK_MARKERS[0] not in path:
      continue
    store = jnp.float32 if path in fixed else jnp.dtype(args.param_dtype)
    sea_only[path] = np.asarray(jnp.asarray(value, store))
  with atomic_folder(args.out) as tmp:
    checkpoint.save_params(checkpoint.unflatten(sea_only), str(tmp))
    checkpoint.write_config(config, str(tmp))
    checkpoint.write_base_record(str(tmp), args.base)
  nbytes = sum(v.nbytes for v in sea_only.values())
  print(f"wrote {args.out}: {len(sea_only)} SEA arrays, {nbytes / 2**20:.1f} MiB", file=sys.stderr)
  if args.archive:
    os.makedirs(os.path.dirname(os.path.abspath(args.archive)), exist_ok=True)
    name = os.path.basename(args.archive).split(".")[0]
    with tarfile.open(args.archive + ".tmp", "w:xz", preset=9) as tar:
      tar.add(args.out, arcname=name)
    os.replace(args.archive + ".tmp", args.archive)
    print(f"wrote {args.archive}: {os.path.getsize(args.archive) / 2**20:.1f} MiB",
          file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
