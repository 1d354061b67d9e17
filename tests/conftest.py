"""Test session set-up: 8 virtual CPU devices (for the sharded tests), offline Hugging Face."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import zlib  # noqa: E402

# One JAX compilation cache for the whole session: the in-process tests and every command the
# tests run as a subprocess (eval, train, convert, generate on the same tiny models, again and
# again) compile an identical program once. The controller creates it before xdist starts its
# workers, which inherit the variables. A size limit turns on the cache's file lock, so one
# process never reads an entry that another is still writing.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sea-jax-tests-jit-")
  os.environ["SEA_JAX_TESTS_OWN_JIT_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

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


def pytest_unconfigure(config):
  """The session's compilation cache goes when the session ends (the controller made it)."""
  own = os.environ.get("SEA_JAX_TESTS_OWN_JIT_CACHE")
  if own and not hasattr(config, "workerinput"):
    shutil.rmtree(own, ignore_errors=True)


# The files that take minutes, longest first (per-file totals of a --durations=0 run,
# 2026-12-07). Under `-n 2 --dist loadfile` a worker takes the next file in collection order
# as it frees up; in alphabetical order the recipe files came last and one worker ran them
# alone for the final 6 minutes of a 33-minute run. Longest first keeps the two workers even.
LONG_FILES = ("test_train.py", "test_llama.py", "test_sea_pieces.py", "test_sparse_gqa.py",
              "test_hostile_round2.py", "test_hostile_input.py", "test_smollm2.py",
              "test_recipe.py", "test_generate.py", "test_sea_decode.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONG_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable
