"""The bundled teacher and SEA student that `python eval.py` evaluates offline.

They ship compressed as `sea_jax/assets/models/<name>.tar.xz` (a model folder each) and unpack
once into a cache folder (`$SEA_JAX_CACHE`, default `~/.cache/sea-jax`), keyed by the archive's
hash so that a new bundle never reuses a stale unpacked copy.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from sea_jax.errors import UserError

MODELS_DIR = Path(__file__).resolve().parent / "assets" / "models"
NAMES = ("teacher", "student")  # evaluated in this order: the student's JSON line is last


class BundleError(UserError, FileNotFoundError):
  """The bundled models are missing or damaged."""


def cache_dir() -> Path:
  return Path(os.environ.get("SEA_JAX_CACHE", Path.home() / ".cache" / "sea-jax"))


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def unpack(archive: Path) -> Path:
  """Unpacks `archive` (once) and returns the model folder inside the cache."""
  target = cache_dir() / "bundled" / f"{archive.name.split('.')[0]}-{_sha256(archive)[:16]}"
  done = target / ".complete"
  if done.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp"))
  try:
    try:
      with tarfile.open(archive, "r:xz") as tar:
        tar.extractall(tmp, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
      raise BundleError(f"bundled model {archive} is damaged ({e}); reinstall sea-jax") from None
    inner = [p for p in tmp.iterdir() if p.is_dir()]
    folder = inner[0] if len(inner) == 1 and not (tmp / "config.json").exists() else tmp
    (folder / ".complete").touch()
    if target.exists():  # a half-unpacked copy of an interrupted run, or a concurrent winner
      if (target / ".complete").exists():
        return target
      shutil.rmtree(target)
    os.replace(folder, target)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target


def bundled_model_paths() -> list[str]:
  """Model folders of the bundled teacher and student, in evaluation order."""
  paths = []
  for name in NAMES:
    archive = MODELS_DIR / f"{name}.tar.xz"
    if not archive.is_file():
      raise BundleError(f"no --model given and the bundled {name} ({archive}) is missing; "
                        "pass --model PATH")
    paths.append(str(unpack(archive)))
  return paths
