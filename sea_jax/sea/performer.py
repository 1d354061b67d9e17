"""The Performer branch of SEA (SEA_SPEC §1.1): ReLU random features and causal linear attention.

Memory stays O(T·m·e): the causal prefix sums run as a `lax.scan` over time chunks that carries
the running (m × e) state, never a T × T array.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

FEATURE_FLOOR = 1e-3  # added to every ReLU feature
DENOM_EPS = 1e-6  # added once to each row's denominator


def num_random_features(d: int, nbf: float = 8.0) -> int:
  """m = int(d ln d / nbf): 33 for d=64, 43 for d=80 (nbf=8)."""
  return int(d * math.log(d) / nbf)


def orthogonal_random_features(key: jax.Array, m: int, d: int) -> jax.Array:
  """(m, d) Gaussian orthogonal random matrix, fp32.

  Rows come in blocks of d mutually orthogonal rows (QR of a d × d Gaussian); the last block is
  truncated to m rows in total. Row i is then rescaled by the norm of an independent
  d-dimensional Gaussian vector, so rows have Gaussian-like lengths.
  """
  n_blocks = -(-m // d)
  block_key, norm_key = jax.random.split(key)
  blocks = []
  for bkey in jax.random.split(block_key, n_blocks):
    q, _ = jnp.linalg.qr(jax.random.normal(bkey, (d, d), jnp.float32))
    blocks.append(q.T)  # rows of q.T are orthonormal
  rows = jnp.concatenate(blocks, axis=0)[:m]
  norms = jnp.linalg.norm(jax.random.normal(norm_key, (m, d), jnp.float32), axis=1)
  return rows * norms[:, None]


def relu_features(x: jax.Array, W: jax.Array) -> jax.Array:
  """φ(x) = ReLU(d^-1/4 · x Wᵀ) + 1e-3: x (..., d), W (m, d) -> (..., m), fp32 (fp64 if x is)."""
  d = x.shape[-1]
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  proj = jnp.einsum("...d,md->...m", x.astype(dtype), W.astype(dtype))
  return jax.nn.relu(proj * d ** -0.25) + FEATURE_FLOOR


def causal_linear_attention(phi_q: jax.Array, phi_k: jax.Array, v: jax.Array,
                            chunk: int = 128) -> jax.Array:
  """Causal linear attention: (..., T, m), (..., T, m), (..., T, e) -> (..., T, e) in fp32.

  C[t] = Σ_{j≤t} (φq_t·φk_j) v[j] / (φq_t·Σ_{j≤t} φk_j + 1e-6).
  Epsilon convention: 1e-6 is added once to the scalar denominator (the formula above), not to
  every feature of the running Σφk as the reference does (that would add 1e-6·Σφq instead).
  Time runs in chunks of `chunk` rows (T is zero-padded to a multiple); each chunk does its own
  causal (chunk × chunk) products plus the carried state S = Σφk vᵀ (m × e) and z = Σφk (m).
  The chunk body is rematerialised, so the backward keeps only the per-chunk carries.
  Accumulates in fp32 (fp64 when an input is fp64).
  """
  *lead, T, m = phi_q.shape
  e = v.shape[-1]
  chunk = max(1, min(chunk, T))
  n_chunks = -(-T // chunk)
  pad = n_chunks * chunk - T
  dtype = jnp.result_type(jnp.float32, phi_q.dtype, phi_k.dtype, v.dtype)

  def to_chunks(x):
    x = x.astype(dtype)
    if pad:
      x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, pad), (0, 0)])
    x = x.reshape(*lead, n_chunks, chunk, x.shape[-1])
    return jnp.moveaxis(x, -3, 0)  # (n_chunks, *lead, chunk, features)

  causal = jnp.tril(jnp.ones((chunk, chunk), jnp.bool_))

  @jax.checkpoint
  def body(carry, xs):
    state, z = carry
    fq, fk, vc = xs
    scores = jnp.einsum("...tm,...sm->...ts", fq, fk)
    scores = jnp.where(causal, scores, 0.0)
    num = jnp.einsum("...ts,...se->...te", scores, vc) + jnp.einsum("...tm,...me->...te", fq, state)
    den = jnp.sum(scores, axis=-1) + jnp.einsum("...tm,...m->...t", fq, z) + DENOM_EPS
    state = state + jnp.einsum("...sm,...se->...me", fk, vc)
    z = z + jnp.sum(fk, axis=-2)
    return (state, z), num / den[..., None]

  init = (jnp.zeros((*lead, m, e), dtype), jnp.zeros((*lead, m), dtype))
  _, out = jax.lax.scan(body, init, (to_chunks(phi_q), to_chunks(phi_k), to_chunks(v)))
  out = jnp.moveaxis(out, 0, -3).reshape(*lead, n_chunks * chunk, e)
  return out[..., :T, :]


def linear_attention_state(phi_k: jax.Array, v: jax.Array, valid: jax.Array):
  """The running sums after a prefix: S = Σ φk_j v_jᵀ (..., m, e) and z = Σ φk_j (..., m) over
  the rows j with valid (..., T) True; phi_k (..., T, m), v (..., T, e); fp32 (fp64)."""
  dtype = jnp.result_type(jnp.float32, phi_k.dtype, v.dtype)
  phi_k = jnp.where(valid[..., None], phi_k.astype(dtype), 0.0)
  return jnp.einsum("...tm,...te->...me", phi_k, v.astype(dtype)), jnp.sum(phi_k, axis=-2)


def linear_attention_step(phi_q: jax.Array, phi_k: jax.Array, v: jax.Array, state):
  """One new row of `causal_linear_attention` from its running sums (decoding, O(m·e) work):
  phi_q, phi_k (..., 1, m), v (..., 1, e), state (S (..., m, e), z (..., m)) -> (C (..., 1, e),
  the state with the new row added)."""
  S, z = state
  dtype = S.dtype
  phi_q, phi_k, v = phi_q.astype(dtype), phi_k.astype(dtype), v.astype(dtype)
  S = S + jnp.einsum("...sm,...se->...me", phi_k, v)
  z = z + jnp.sum(phi_k, axis=-2)
  num = jnp.einsum("...tm,...me->...te", phi_q, S)
  den = jnp.einsum("...tm,...m->...t", phi_q, z) + DENOM_EPS
  return num / den[..., None], (S, z)
