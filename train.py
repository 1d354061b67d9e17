"""Distil a SEA student from a dense OPT teacher (or pretrain a dense OPT), on one CPU, one
accelerator host or a multi-host pod, with exact resume after preemption.

  python train.py --teacher PATH --out DIR --steps N --seq-len T --batch-size B
                  [--sea-k 64 --sea-K 256] [--mesh data=2,fsdp=2,tensor=2] [--train-text FILE...]

Re-running the same command resumes from the newest good checkpoint in DIR. See --help.
"""
import sys

from sea_jax.training.cli import main

if __name__ == "__main__":
  sys.exit(main())
