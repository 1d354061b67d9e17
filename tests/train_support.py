"""Shared pieces of the training tests: a tiny teacher, text, subprocess runs of train.py."""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("SEA_SHARED_DATA", REPO.parent / "shared" / "data"))
GUTENBERG = SHARED_DATA / "gutenberg" / "gutenberg_40books.txt"
WIKI_VALID = REPO / "sea_jax" / "assets" / "wikitext-2-raw" / "wiki.valid.raw"
METRIC_KEYS = ("step", "loss", "tokens_per_s", "lr", "grad_norm")
DISTILL_TERMS = ("ce", "hidden", "kl", "layer", "approx", "prob", "context")


def write_text(path: pathlib.Path, chars: int = 200_000) -> pathlib.Path:
  """A slice of real prose: Gutenberg when the shared data is there, else WikiText valid."""
  src = GUTENBERG if GUTENBERG.is_file() else WIKI_VALID
  with open(src, encoding="utf-8") as f:
    path.write_text(f.read(chars), encoding="utf-8")
  return path


def make_teacher(folder: pathlib.Path) -> pathlib.Path:
  """A random tiny dense OPT (2 layers, d 32, 4 heads, max pos 128) as a sea-jax model folder."""
  from hf_models import save_tiny_opt
  from sea_jax.convert import hf_to_model_folder
  hf = folder.parent / (folder.name + "-hf")
  save_tiny_opt(str(hf))
  hf_to_model_folder(str(hf), str(folder))
  return folder


def child_env(devices: int, cache_dir: pathlib.Path | None = None) -> dict:
  """Environment of a train.py subprocess with `devices` virtual CPU devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  if cache_dir is not None:
    env.update(compile_cache_env(cache_dir))
  return env


def compile_cache_env(cache_dir: pathlib.Path) -> dict:
  """Variables that give subprocesses one JAX compilation cache: identical programs across
  runs (a resumed run, the same model on a second text) compile once."""
  return dict(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def train_cmd(*args, pause: float = 0.0) -> list[str]:
  """train.py's command line; pause > 0: a pause after every step (tests/slow_train.py)."""
  script = ([str(REPO / "tests" / "slow_train.py"), str(pause)] if pause
            else [str(REPO / "train.py")])
  return [sys.executable, *script, "--no-progress", *map(str, args)]


def run_train(args, *, devices: int = 1, cache_dir=None, timeout: float = 600,
              check: bool = True) -> subprocess.CompletedProcess:
  proc = subprocess.run(train_cmd(*args), cwd=REPO, env=child_env(devices, cache_dir),
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"train.py exited {proc.returncode}:\n{proc.stderr[-4000:]}")
  return proc


def start_train(args, *, devices: int = 1, cache_dir=None, pause: float = 0.0
                ) -> subprocess.Popen:
  return subprocess.Popen(train_cmd(*args, pause=pause), cwd=REPO, env=child_env(devices, cache_dir),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 600,
             poll: float = 0.1) -> None:
  """Polls `predicate` every `poll` seconds until true; fails if `proc` ends first."""
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f"train.py ended (rc {proc.returncode}) before the condition:\n"
                           f"{proc.stderr.read()[-4000:]}")
    time.sleep(poll)
  proc.kill()
  raise AssertionError("timed out waiting for train.py")


def checkpoint_steps(out: pathlib.Path) -> list[int]:
  """Finished checkpoint steps (Orbax renames a step folder into place when it is complete)."""
  folder = out / "checkpoints"
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir()
                if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").is_file())


def read_metrics(out: pathlib.Path) -> list[dict]:
  path = out / "metrics.jsonl"
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_params(out: pathlib.Path) -> dict:
  """{path: numpy array} of OUT/final (read the way eval.py reads it)."""
  from flax import nnx
  from sea_jax import checkpoint
  model = checkpoint.load_model(str(out / "final"))
  flat = checkpoint.flatten(nnx.to_pure_dict(nnx.state(model)))
  return {checkpoint.path_str(p): np.asarray(v) for p, v in flat.items()}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def distill_args(teacher, text, out, *, steps: int = 4, extra=(),
                 mesh: str | None = "data=2,fsdp=2,tensor=2") -> list:
  """The reference distillation run of the resume and multi-host tests (8 devices); mesh=None
  runs it on one device (for tests of the run folder, not of sharding: it compiles faster)."""
  return ["--teacher", teacher, "--train-text", text, "--out", out, "--steps", steps,
          "--seq-len", 32, "--batch-size", 8, "--micro-batch-size", 4, "--sea-K", 16,
          "--sea-k", 4, "--dropout", 0.1, "--lr-sea", 1e-3, "--lr-pretrained", 1e-4,
          "--save-every", 2, "--keep", 3, *(["--mesh", mesh] if mesh else []), *extra]


def reference_run(root: pathlib.Path, teacher, text, cache_dir) -> pathlib.Path:
  """An uninterrupted 8-device run, made once per test session (shared by both modules)."""
  out = root / "reference"
  if not (out / "final" / "config.json").is_file():
    run_train(distill_args(teacher, text, out), devices=8, cache_dir=cache_dir)
  return out


def shared_setup(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path, pathlib.Path]:
  """(root, teacher, text, compile cache) under the session's base temp dir, made once."""
  root = tmp_path_factory.getbasetemp() / "train_shared"
  root.mkdir(exist_ok=True)
  teacher = root / "teacher"
  if not (teacher / "config.json").is_file():
    make_teacher(teacher)
  text = root / "text.txt"
  if not text.is_file():
    write_text(text)
  return root, teacher, text, root / "jax_cache"
