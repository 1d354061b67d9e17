"""Small building blocks whose parameters carry logical axis names (Linear, LayerNorm, RMSNorm).

Every parameter is declared with the logical axes of its dimensions (`out_sharding` metadata);
`sea_jax.sharding` maps those names onto a device mesh with one table.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


class SeedKeys:
  """The keys `nnx.Rngs(seed).params()` draws (the i-th is fold_in(key(seed), i)), counted in
  Python.

  Building a model under a trace (`nnx.eval_shape`, `jax.jit`) with an `nnx.Rngs` stages one
  counter update per parameter, and flax 0.12.8 asks each update's tracer for its sharding, which
  makes JAX walk the whole trace for an error message: quadratic in the parameter count (2,000
  draws 32 s on 2 cores; the SmolLM2 student's abstract build 13.6 s). These keys are the same
  values at linear cost. Every parameter of the package draws through `params()`.
  """

  def __init__(self, seed: int):
    self._key = jax.random.key(seed)
    self._count = 0

  def params(self) -> jax.Array:
    key = jax.random.fold_in(self._key, self._count)
    self._count += 1
    return key


def param(rngs: nnx.Rngs | SeedKeys, init: Initializer, shape: Sequence[int],
          axes: Sequence[str | None], dtype=jnp.float32) -> nnx.Param:
  """A parameter of `shape` with one logical axis name per dimension (None = replicated)."""
  if len(axes) != len(shape):
    raise ValueError(f"parameter of shape {tuple(shape)} got {len(axes)} axis names {tuple(axes)}")
  value = init(rngs.params(), tuple(shape), dtype)
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def zeros_init(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


def ones_init(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def normal_init(stddev: float) -> Initializer:
  return jax.nn.initializers.normal(stddev)


class Linear(nnx.Module):
  """y = x @ W + b with W (in, out) named by `axes`; computes in `dtype`."""

  def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
               use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
               init_std: float = 0.02, rngs: nnx.Rngs):
    self.kernel = param(rngs, normal_init(init_std), (in_features, out_features), axes, param_dtype)
    self.bias = param(rngs, zeros_init, (out_features,), (axes[1],), param_dtype) if use_bias else None
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    y = jnp.dot(x, self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis with eps 1e-5 (PyTorch's and OPT's), statistics in fp32."""

  def __init__(self, features: int, *, axis_name: str | None = "norm", eps: float = 1e-5,
               affine: bool = True, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.scale = param(rngs, ones_init, (features,), (axis_name,), param_dtype) if affine else None
    self.bias = param(rngs, zeros_init, (features,), (axis_name,), param_dtype) if affine else None
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    if self.scale is not None:
      y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """Llama's RMSNorm: x / sqrt(mean(x^2) + eps) in fp32, cast back, times the scale (as Hugging
  Face orders it: the normalised x is cast to `dtype` before the scale multiplies it)."""

  def __init__(self, features: int, *, eps: float = 1e-6, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.scale = param(rngs, ones_init, (features,), ("norm",), param_dtype)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.dtype) * y.astype(self.dtype)
