"""Packs the recipe's teacher and SEA student as the bundled default of `python eval.py`.

  python recipes/bundle_models.py --teacher runs/small/teacher/final --student runs/small/sea/final

Each model folder is re-saved with bfloat16 parameter storage (compute stays float32) and
compressed into `sea_jax/assets/models/<name>.tar.xz`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flax import nnx  # noqa: E402

from sea_jax import bundle, checkpoint, convert  # noqa: E402


def pack(src: str, name: str, dtype: str) -> str:
  model = checkpoint.load_model(src, param_dtype=dtype)
  with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, name)
    os.makedirs(folder)
    checkpoint.save_params(nnx.state(model), folder)
    checkpoint.write_config(model.config, folder)
    convert.copy_tokenizer(src, folder)
    os.makedirs(bundle.MODELS_DIR, exist_ok=True)
    archive = bundle.MODELS_DIR / f"{name}.tar.xz"
    with tarfile.open(archive, "w:xz", preset=9) as tar:
      tar.add(folder, arcname=name)
  return str(archive)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--teacher", required=True, help="teacher model folder")
  p.add_argument("--student", required=True, help="SEA student model folder")
  p.add_argument("--param-dtype", default="bfloat16", choices=("bfloat16", "float32"))
  args = p.parse_args()
  for name, src in (("teacher", args.teacher), ("student", args.student)):
    archive = pack(src, name, args.param_dtype)
    print(f"{archive}: {os.path.getsize(archive) / 2**20:.1f} MiB", file=sys.stderr)
  shutil.rmtree(bundle.cache_dir() / "bundled", ignore_errors=True)


if __name__ == "__main__":
  main()
