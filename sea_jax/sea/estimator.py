"""SEA's estimator (SEA_SPEC §1.2): Z_in (N,H,T,3d) -> compressed logits Ê (N,H,T,K) and gates.

Parameter init follows PyTorch's defaults in spirit: convolution kernels and biases are
U(±1/sqrt(fan_in)) exactly as `torch.nn.Conv2d`; linear kernels are N(0, 1/(3 fan_in)) (the
variance of PyTorch's uniform init) with zero biases, via `sea_jax.layers.Linear`.
All LayerNorms use eps 1e-5 and fp32 statistics; GELU is the exact erf form.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sea_jax.layers import LayerNorm, Linear, ones_init, param, zeros_init
from sea_jax.ops.pooled_keys import EMPTY


def _wide(dtype):
  """fp32, or fp64 when dtype is fp64: the precision of statistics and softmaxes."""
  return jnp.promote_types(dtype, jnp.float32)


def _uniform(bound: float):
  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _linear(n_in: int, n_out: int, axes, *, dtype, param_dtype, rngs) -> Linear:
  return Linear(n_in, n_out, axes=axes, dtype=dtype, param_dtype=param_dtype,
                init_std=(3 * n_in) ** -0.5, rngs=rngs)


def adaptive_avg_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_in, n_out) fp32: column i averages inputs [floor(i n_in/n_out), ceil((i+1) n_in/n_out))."""
  A = np.zeros((n_in, n_out), np.float32)
  for i in range(n_out):
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)
    A[start:end, i] = 1.0 / (end - start)
  return A


def upsample_pool_matrix(K: int) -> np.ndarray:
  """(K/4, K): nearest ×4 upsample, one zero column each side, adaptive pool K+2 -> K, composed."""
  upsample = np.repeat(np.eye(K // 4, dtype=np.float32), 4, axis=1)  # (K/4, K)
  return upsample @ adaptive_avg_pool_matrix(K + 2, K)[1:K + 1]


class Encoder(nnx.Module):
  """Z = GELU(LayerNorm(Linear(Z_in))): (..., 3d) -> (..., 2d), shared across heads."""

  def __init__(self, d: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.linear = _linear(3 * d, 2 * d, ("sea_in", "sea_hidden"), dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.norm = LayerNorm(2 * d, axis_name="sea_hidden", eps=1e-5, dtype=_wide(dtype),
                          param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype

  def __call__(self, z_in: jax.Array) -> jax.Array:
    z = self.norm(self.linear(z_in))
    return jax.nn.gelu(z, approximate=False).astype(self.dtype)


class RowDecoder(nnx.Module):
  """Linear(2d -> 2·K/4) split into two channels per head: (N,H,T,2d) -> (N,2H,T,K/4).

  Channel 2h + half holds outputs [half·K/4, (half+1)·K/4) of head h.
  """

  def __init__(self, d: int, K: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.linear = _linear(2 * d, 2 * (K // 4), ("sea_hidden", "sea_out"), dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.width = K // 4

  def __call__(self, z: jax.Array) -> jax.Array:
    N, H, T, _ = z.shape
    y = self.linear(z).reshape(N, H, T, 2, self.width)
    return y.transpose(0, 1, 3, 2, 4).reshape(N, 2 * H, T, self.width)


CONV_SIZE, CONV_DILATION = 3, 2  # MaskCNN's causal convs (§1.2 step 4b, c)
HISTORY_ROWS = (CONV_SIZE - 1) * CONV_DILATION  # past rows a conv's input keeps for decoding


class CausalConv(nnx.Module):
  """k×k conv with dilation over (time, width): (N,C,T,W) -> (N,O,T,W).

  Time is padded on the left only ((k-1)·dilation), so row t sees rows t, t-dil, ...;
  width is padded (k-1)·dilation/2 on each side ("same").
  """

  def __init__(self, in_ch: int, out_ch: int, *, size: int = CONV_SIZE,
               dilation: int = CONV_DILATION, dtype,
               param_dtype, rngs: nnx.Rngs):
    bound = (in_ch * size * size) ** -0.5
    self.kernel = param(rngs, _uniform(bound), (out_ch, in_ch, size, size),
                        ("sea_channels", None, None, None), param_dtype)
    self.bias = param(rngs, _uniform(bound), (out_ch,), ("sea_channels",), param_dtype)
    self.reach = (size - 1) * dilation
    self.dilation = dilation
    self.dtype = dtype

  def __call__(self, x: jax.Array, *, pad_time: bool = True) -> jax.Array:
    """pad_time=False (decoding): x holds the `reach` rows before the new ones, unpadded, and
    the output has `reach` rows fewer."""
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), window_strides=(1, 1),
        padding=((self.reach if pad_time else 0, 0), (self.reach // 2, self.reach // 2)),
        rhs_dilation=(self.dilation, self.dilation),
        dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y + self.bias[...].astype(self.dtype)[:, None, None]


class UpsampleProject(nnx.Module):
  """Steps 4d–f: upsample ×4, 1×1 conv C->O with width padding 1, pool K+2 -> K.

  (N,C,T,K/4) -> (N,O,T,K). All three are linear, so they run as a channel mix at width K/4,
  one (K/4, K) matmul, then the bias (pool columns sum to 1, so every output column gets
  exactly the bias, border columns included).
  """

  def __init__(self, in_ch: int, out_ch: int, K: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    bound = in_ch ** -0.5
    self.kernel = param(rngs, _uniform(bound), (out_ch, in_ch), ("sea_channels", None),
                        param_dtype)
    self.bias = param(rngs, _uniform(bound), (out_ch,), ("sea_channels",), param_dtype)
    self.K = K
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.einsum("nctw,oc->notw", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    M = jnp.asarray(upsample_pool_matrix(self.K), self.dtype)
    y = jnp.einsum("notw,wk->notk", y, M)
    return y + self.bias[...].astype(self.dtype)[:, None, None]


class MaskCNN(nnx.Module):
  """Causal dilated CNN, heads as channels: (N,2H,T,K/4) -> Ê (N,H,T,K) fp32 (§1.2 step 4).

  a LayerNorm(K/4); b, c 3×3 dilation-2 causal convs 2H->2H with ReLU; d–f `UpsampleProject`;
  g LayerNorm(K).
  """

  def __init__(self, H: int, K: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm_in = LayerNorm(K // 4, axis_name="sea_width", eps=1e-5, **kw)
    self.conv1 = CausalConv(2 * H, 2 * H, **kw)
    self.conv2 = CausalConv(2 * H, 2 * H, **kw)
    self.project = UpsampleProject(2 * H, H, K, **kw)
    self.norm_out = LayerNorm(K, axis_name="sea_width", eps=1e-5, dtype=_wide(dtype),
                              param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, return_history: bool = False):
    """-> Ê; with return_history also (h0, h1), the two convs' inputs (N,2H,T,K/4), from which
    `history_at` takes a decoder's starting history."""
    h0 = self.norm_in(x)
    h1 = jax.nn.relu(self.conv1(h0))
    out = self.norm_out(self.project(jax.nn.relu(self.conv2(h1))))
    return (out, (h0, h1)) if return_history else out

  def step(self, x: jax.Array, history: tuple[jax.Array, jax.Array]):
    """One new row (decoding): x (N,2H,1,K/4) and the last HISTORY_ROWS rows of each conv
    input ((N,2H,R,K/4) each, zeros before the sequence start, as the causal padding) ->
    (Ê (N,H,1,K), the history shifted by the new row)."""
    h0 = jnp.concatenate([history[0], self.norm_in(x).astype(history[0].dtype)], axis=2)
    h1 = jax.nn.relu(self.conv1(h0, pad_time=False)).astype(history[1].dtype)
    h1 = jnp.concatenate([history[1], h1], axis=2)
    out = self.norm_out(self.project(jax.nn.relu(self.conv2(h1, pad_time=False))))
    return out, (h0[:, :, 1:], h1[:, :, 1:])


def history_at(rows: jax.Array, lengths: jax.Array, R: int) -> jax.Array:
  """The R rows before position `lengths` (N,) of rows (N,C,T,W) -> (N,C,R,W), zeros where the
  position is < 0 (a decoder's starting `MaskCNN.step` history after a prefill)."""
  idx = lengths[:, None] - R + jnp.arange(R, dtype=jnp.int32)[None]  # (N, R)
  got = jnp.take_along_axis(rows, jnp.clip(idx, 0, rows.shape[2] - 1)[:, None, :, None], axis=2)
  return jnp.where((idx >= 0)[:, None, :, None], got, jnp.zeros((), rows.dtype))


class Estimator(nnx.Module):
  """Z_in (N,H,T,3d) -> (Ê (N,H,T,K) fp32, s_prob (N,H,T) fp32, s_mix (N,H,T) fp32)."""

  def __init__(self, d: int, H: int, K: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.encoder = Encoder(d, **kw)
    self.decoder = RowDecoder(d, K, **kw)
    self.cnn = MaskCNN(H, K, **kw)
    self.gates = _linear(2 * d, 2, ("sea_hidden", None), **kw)

  def __call__(self, z_in: jax.Array, *, return_history: bool = False):
    """-> (Ê, s_prob, s_mix), and the CNN's (h0, h1) with return_history (`MaskCNN`)."""
    with jax.named_scope("sea_encoder"):
      z = self.encoder(z_in)
    with jax.named_scope("sea_mask_cnn"):
      est = self.cnn(self.decoder(z), return_history=return_history)
    s_prob, s_mix = self._gates(z)
    if return_history:
      return est[0], s_prob, s_mix, est[1]
    return est, s_prob, s_mix

  def step(self, z_in: jax.Array, history):
    """One new row: z_in (N,H,1,3d), the CNN history -> (Ê (N,H,1,K), s_prob, s_mix (N,H,1),
    history)."""
    z = self.encoder(z_in)
    est, history = self.cnn.step(self.decoder(z), history)
    return (est, *self._gates(z), history)

  def _gates(self, z):
    with jax.named_scope("sea_gates"):
      gates = self.gates(z)
      gates = jax.nn.sigmoid(gates.astype(_wide(gates.dtype)))
    return gates[..., 0], gates[..., 1]


class PooledKeyMix(nnx.Module):
  """Mixes the estimator's bin distribution with the pooled-key one (`ops.pooled_keys`), per
  head h: Â = w_h softmax_K(Ê) + (1 - w_h) softmax_K(τ_h P), returned as logits log Â.

  Ê (N,H,T,K) from the CNN, P (N,H,T,K) pooled-key scores (EMPTY in empty bins) -> (N,H,T,K)
  fp32 logits whose softmax over K is the mixture. w_h = σ(mix_h) (init 0.5) and τ_h
  (init 1) are learned; everything downstream (the grouped top-k, L_approx) reads the mixture
  as it read Ê. Not in the paper (SEA_SPEC §1.2): SEAConfig.pooled_keys turns it on.
  """

  def __init__(self, H: int, *, param_dtype, rngs: nnx.Rngs):
    self.mix = param(rngs, zeros_init, (H,), ("sea_channels",), param_dtype)
    self.temperature = param(rngs, ones_init, (H,), ("sea_channels",), param_dtype)

  def __call__(self, est_logits: jax.Array, pooled: jax.Array) -> jax.Array:
    wide = _wide(est_logits.dtype)
    mix = self.mix[...].astype(wide)[:, None, None]
    tau = self.temperature[...].astype(wide)[:, None, None]
    learned = jax.nn.log_softmax(est_logits.astype(wide), axis=-1)
    pooled = pooled.astype(wide)
    scaled = jnp.where(pooled > EMPTY / 2, tau * pooled, EMPTY)  # empty bins stay empty
    keys = jax.nn.log_softmax(scaled, axis=-1)
    return jnp.logaddexp(jax.nn.log_sigmoid(mix) + learned, jax.nn.log_sigmoid(-mix) + keys)
