"""sea-jax: SEA (Sparse linear attention with an Estimated Attention mask) in JAX/Flax NNX."""

from sea_jax import xla_defaults

xla_defaults.apply_defaults()  # before any JAX backend starts (see sea_jax/xla_defaults.py)

__version__ = "0.1.0"
