"""Dense causal attention, pure functions (the seam's `DenseAttention` picks one):

  dense_attention          the T x S reference: fp32 softmax over every visible slot
  dense_attention_chunked  the same over a KV cache, one query block at a time (never T x S)
  dense_attention_cudnn    cuDNN flash attention (GPU, bf16/fp16), no padding mask
  dense_attention_splash   splash attention (Pallas TPU kernel; interpreted off TPU)
  repeat_kv, causal_key_mask  grouped-query and causal helpers

q (N,H,T,d) pre-scaled by d**-0.5; k, v (N,Hkv,S,d) with Hkv dividing H (query head h reads kv
head h // (H // Hkv)). Self-attention without a cache runs `blocked_attention` (a query block
at a time over only the keys it can see).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def repeat_kv(x: jax.Array, num_heads: int) -> jax.Array:
  """(N, Hkv, T, e) -> (N, num_heads, T, e): kv head g serves query heads [g*G, (g+1)*G)
  (Hugging Face's repeat_kv); identity when Hkv == num_heads."""
  groups = num_heads // x.shape[1]
  return x if groups == 1 else jnp.repeat(x, groups, axis=1)


def causal_key_mask(T: int, key_mask: jax.Array | None, q_offset: int = 0,
                    rows: int | None = None) -> jax.Array:
  """(N|1, 1, rows, T) bool: query q_offset+i may see key s (s <= t and key s is real)."""
  rows = T if rows is None else rows
  t = q_offset + jnp.arange(rows)[:, None]
  s = jnp.arange(T)[None, :]
  mask = (s <= t)[None, None]
  if key_mask is not None:
    mask = mask & key_mask[:, None, None, :].astype(bool)
  return mask


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    key_mask: jax.Array | None = None, q_offset=0) -> jax.Array:
  """Causal softmax attention with an fp32 softmax: q (N,H,T,d), k/v (N,Hkv,S,d) -> (N,H,T,d).

  Query i sits at key slot q_offset + i and sees slots s <= q_offset + i (self-attention: S = T,
  offset 0; a KV cache: S slots, the offset the first new slot, maybe traced); key_mask (N, S).
  Grouped-query attention reads each kv head for its G = H / Hkv query heads without copying it.
  """
  N, H, T, d = q.shape
  S = k.shape[2]
  G = H // k.shape[1]
  if G == 1:
    scores = jnp.einsum("nhtd,nhsd->nhts", q, k, preferred_element_type=jnp.float32)
  else:
    scores = jnp.einsum("nhgtd,nhsd->nhgts", q.reshape(N, H // G, G, T, d), k,
                        preferred_element_type=jnp.float32).reshape(N, H, T, S)
  mask = causal_key_mask(S, key_mask, q_offset, rows=T)
  scores = jnp.where(mask, scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = jnp.where(mask, probs, 0.0)  # fully masked rows (padding queries) give zeros
  if G == 1:
    return jnp.einsum("nhts,nhsd->nhtd", probs.astype(v.dtype), v)
  out = jnp.einsum("nhgts,nhsd->nhgtd", probs.astype(v.dtype).reshape(N, H // G, G, T, S), v)
  return out.reshape(N, H, T, v.shape[-1])


def dense_attention_chunked(q: jax.Array, k: jax.Array, v: jax.Array,
                            key_mask: jax.Array | None = None, *, block: int = 256,
                            q_offset=0) -> jax.Array:
  """`dense_attention` over a KV cache one query block at a time (a long prompt's prefill):
  the same fp32 softmax, never T x S.

  q (N,H,T,d), k/v (N,Hkv,S,d) -> (N,H,T,d), query i at slot q_offset + i (maybe traced). Each
  block of `block` query rows scores all S slots (O(block * S) memory per head); the block
  body is rematerialised under `lax.scan`. Self-attention (no cache) takes
  `blocked_attention.blocked_attention`, which visits only the keys each block can see.
  """
  N, H, T, d = q.shape
  S = k.shape[2]
  Hkv = k.shape[1]
  G = H // Hkv
  B = max(1, min(block, T))
  nb = -(-T // B)
  pad = nb * B - T
  qp = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else q
  q_blocks = jnp.moveaxis(qp.reshape(N, Hkv, G, nb, B, d), 3, 0)  # (nb,N,Hkv,G,B,d)

  @jax.checkpoint
  def one_block(q_blk, start):
    scores = jnp.einsum("nhgbd,nhsd->nhgbs", q_blk, k, preferred_element_type=jnp.float32)
    mask = causal_key_mask(S, key_mask, q_offset=q_offset + start, rows=B)
    mask = mask[:, :, None]  # (N|1,1,1,B,S)
    scores = jnp.where(mask, scores, NEG_INF)
    probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)
    return jnp.einsum("nhgbs,nhsd->nhgbd", probs.astype(v.dtype), v)

  def step(carry, xs):
    return carry, one_block(*xs)

  starts = jnp.arange(nb, dtype=jnp.int32) * B
  _, out = jax.lax.scan(step, None, (q_blocks, starts))
  out = jnp.moveaxis(out, 0, 3).reshape(N, H, nb * B, v.shape[-1])
  return out[:, :, :T]


def dense_attention_cudnn(q, k, v):
  """jax.nn.dot_product_attention with cuDNN's flash attention (GPU, bf16/fp16), causal, no
  padding mask (a padded batch takes the chunked path); q pre-scaled; GQA native."""
  out = jax.nn.dot_product_attention(
      q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), scale=1.0,
      is_causal=True, implementation="cudnn")
  return out.transpose(0, 2, 1, 3)


SPLASH_BLOCK = 128  # splash attention's tile (TPU lanes); T is padded up to a multiple of it


def dense_attention_splash(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Causal attention with splash attention (Pallas TPU flash attention, forward and backward):
  q (N,H,T,d) pre-scaled, k, v (N,Hkv,T,d) -> (N,H,T,d) in v.dtype; GQA through the
  multi-query kernel per kv head (k, v never repeated); no padding mask (a padded batch takes
  the chunked path). T is padded at the end to a multiple of SPLASH_BLOCK: causality hides the
  padded keys from every real query. Off TPU the kernel runs interpreted (tests)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  N, H, T, d = q.shape
  Hkv = k.shape[1]
  G = H // Hkv
  Tp = -(-T // SPLASH_BLOCK) * SPLASH_BLOCK
  if Tp > T:
    widths = ((0, 0), (0, 0), (0, Tp - T), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
  mask = sm.MultiHeadMask([sm.CausalMask((Tp, Tp)) for _ in range(G)])
  b = SPLASH_BLOCK
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                        block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  kernel = sk.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=jax.default_backend() != "tpu")
  q_groups = q.reshape(N, Hkv, G, Tp, d)
  out = jax.vmap(jax.vmap(kernel))(q_groups, k.astype(q.dtype), v.astype(q.dtype))
  return out.reshape(N, H, Tp, d)[:, :, :T].astype(v.dtype)
