"""Test session set-up: 8 virtual CPU devices (for the sharded tests), offline Hugging Face."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402
import zlib  # noqa: E402

import sea_jax  # noqa: E402,F401  (its XLA defaults, before any test starts a backend)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("SEA_SHARED_DATA", REPO.parent / "shared" / "data"))


def seed_of(name: str) -> int:
  """A fixed 31-bit seed from a name: every run of a test draws the same numbers.
  SEA_TEST_SEED=N replaces it (to explore other draws by hand)."""
  env = os.environ.get("SEA_TEST_SEED")
  if env:
    return int(env)
  return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def current_seed() -> int:
  """The running test's seed: `seed_of` its node id (pytest's PYTEST_CURRENT_TEST)."""
  current = os.environ.get("PYTEST_CURRENT_TEST", "no-test")
  return seed_of(current.rsplit(" (", 1)[0])


@pytest.fixture
def rng(request):
  """A NumPy generator seeded from the test's node id (`seed_of`), printed on failure."""
  seed = seed_of(request.node.nodeid)
  print(f"\n[{request.node.name}] numpy seed = {seed}")
  return np.random.default_rng(seed)


def relative_error(got, want) -> float:
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
