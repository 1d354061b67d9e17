"""train.py with a pause after every step (`python tests/slow_train.py SECONDS ARGS...`): the
signal tests' window to stop a run mid-training. Tests only; the training loop has no sleep."""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sea_jax.training import loop  # noqa: E402
from sea_jax.training.cli import main  # noqa: E402

PAUSE = float(sys.argv[1])
_build = loop.build_train_step


def _slowed(*args, **kwargs):
  step = _build(*args, **kwargs)
  run = step.fn

  def paused(*call_args):
    out = run(*call_args)
    time.sleep(PAUSE)
    return out

  step.fn = paused
  return step


loop.build_train_step = _slowed

if __name__ == "__main__":
  sys.exit(main(sys.argv[2:]))
