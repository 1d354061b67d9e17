"""Training: SEA distillation and dense pretraining (`train.py`), sharded and resumable."""
from sea_jax.training.checkpointing import StopFlag, TrainCheckpointer
from sea_jax.training.cli import TrainError, build_parser, main
from sea_jax.training.metrics import MetricsLog, NonFiniteLossError, check_finite
from sea_jax.training.models import ModelBridge
from sea_jax.training.optimizer import (decay_mask, make_optimizer, opt_state_shardings,
                                        param_labels)
from sea_jax.training.step import (StepSpec, base_rng, build_train_step, dropout_key,
                                   init_opt_state)

__all__ = [
    "StopFlag", "TrainCheckpointer", "TrainError", "build_parser", "main", "MetricsLog",
    "NonFiniteLossError", "check_finite", "ModelBridge", "decay_mask", "make_optimizer",
    "opt_state_shardings", "param_labels", "StepSpec", "base_rng", "build_train_step", "dropout_key",
    "init_opt_state",
]
