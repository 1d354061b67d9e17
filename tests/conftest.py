"""Test session set-up: 8 virtual CPU devices (for the sharded tests), offline Hugging Face."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("SEA_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def rng(request):
  """A fresh NumPy generator per test; its seed is printed when the test fails."""
  seed = int(np.random.SeedSequence().entropy % (2**31))
  print(f"\n[{request.node.name}] numpy seed = {seed}")
  return np.random.default_rng(seed)


def relative_error(got, want) -> float:
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
