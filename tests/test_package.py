"""`pip install` gives a working package: a wheel built from a copy of the tree, installed into a
fresh virtual environment without the checkout on the path, runs the commands.

The venv sees the test environment's site-packages (jax, transformers, ...: installing them
again would download gigabytes) but not the checkout: every sea_jax module it imports must
come from the wheel, which the test asserts.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO
from gguf_files import tiny_hf_model, write_gguf

IGNORE = shutil.ignore_patterns(".git", "runs", "build", "__pycache__", ".pytest_cache",
                                "*.egg-info", ".venv", ".whl", ".cache")


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
  root = tmp_path_factory.mktemp("package")
  src = root / "src"
  shutil.copytree(REPO, src, ignore=IGNORE)
  wheels = root / "wheels"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(wheels), str(src)], check=True, capture_output=True,
                 text=True, cwd=root)
  [wheel] = list(wheels.glob("sea_jax-*.whl"))
  names = zipfile.ZipFile(wheel).namelist()
  env_dir = root / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(env_dir)],
                 check=True, capture_output=True)
  python = env_dir / "bin" / "python"
  subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                  str(wheel)], check=True, capture_output=True, text=True, cwd=root)
  return root, env_dir, names


def _run(venv_dir, root, *cmd):
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  env["PATH"] = f"{venv_dir / 'bin'}{os.pathsep}{env['PATH']}"
  return subprocess.run(list(map(str, cmd)), cwd=root, env=env, capture_output=True, text=True,
                        timeout=600)


def test_wheel_holds_every_package(venv):
  _, _, names = venv
  for package in ("sea_jax/ops/", "sea_jax/sea/", "sea_jax/training/", "pallas_kernels/"):
    assert any(n.startswith(package) for n in names), f"{package} missing from the wheel"
  assert "sea_jax/assets/wikitext-2-raw/wiki.valid.raw" in names


def test_installed_commands_run(venv, tmp_path):
  root, env_dir, _ = venv
  for command in ("sea-jax-convert", "sea-jax-eval", "sea-jax-train", "sea-jax-generate",
                  "sea-jax-visualize"):
    proc = _run(env_dir, root, env_dir / "bin" / command, "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout, (command, proc.stderr[-2000:])
  where = _run(env_dir, root, env_dir / "bin" / "python", "-c",
               "import sea_jax, pallas_kernels; print(sea_jax.__file__, pallas_kernels.__file__)")
  assert where.returncode == 0 and str(REPO) not in where.stdout, where.stdout + where.stderr
  assert str(env_dir) in where.stdout
  gguf_file = tmp_path / "tiny.gguf"
  write_gguf(str(gguf_file), tiny_hf_model("llama", hidden=64), "llama")
  proc = _run(env_dir, root, env_dir / "bin" / "sea-jax-convert", gguf_file, tmp_path / "out")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "params").is_dir()
  text = tmp_path / "t.txt"
  text.write_text("The tower is 324 metres tall. " * 40)
  proc = _run(env_dir, root, env_dir / "bin" / "sea-jax-eval", "--model", tmp_path / "out",
              "--text-file", text, "--seq-len", 32, "--no-progress")
  assert proc.returncode == 0 and '"perplexity"' in proc.stdout, proc.stderr[-2000:]
