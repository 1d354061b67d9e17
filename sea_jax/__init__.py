"""sea-jax: SEA (Sparse linear attention with an Estimated Attention mask) in JAX/Flax NNX."""

__version__ = "0.1.0"
