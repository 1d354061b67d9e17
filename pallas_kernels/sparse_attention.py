"""Public SEA sparse attention op: shape checks, block sizes, backend dispatch, custom_vjp.

  sparse_attention(q, k, v, compressed_mask, *, backend=None, interpret=False,
                   block_sizes=None) -> (N, H, T, d)

q: (N, H, T, d), k, v: (N, Hkv, T, d), fp32 or bf16, q already scaled by d**-0.5; H % Hkv
== 0 and query head h reads kv head h // (H // Hkv) (grouped-query attention; Hkv == H is
plain multi-head). compressed_mask: bool (N, H, T, K), per query head. Dense mask:
M[n,h,t,s] = compressed_mask[n,h,t,bin_t(s)] for s <= t, else False (bin_t from
sea_jax.ops.bins). Output: softmax over the kept entries of each row
(fp32 accumulation) times v; rows with nothing kept are exactly 0. Output dtype = q.dtype.

The op pads T to a multiple of the block sizes (padded rows keep nothing; real rows never
see padded keys since s <= t), builds the block map once in the forward and keeps it as a
residual for the backward. Backends receive T-padded arrays and the block map:
  gpu: pallas_kernels.gpu (Triton-style Pallas; also runs in interpret mode on CPU).
  tpu: pallas_kernels.tpu (Mosaic), imported lazily.
Both read k and v at their Hkv heads (kv index maps read head h // G, never a repeated copy)
and sum the dk, dv of the G query heads of a group inside the dk/dv kernel.

Note: the package re-exports the function, so `pallas_kernels.sparse_attention` is the op;
reach this module's other names with `from pallas_kernels.sparse_attention import ...`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from sea_jax.ops.block_map import build_block_map
from sea_jax.ops.sparse import check_shapes

_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_BACKENDS = ("gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes: block_q queries x block_k keys per tile (shared by forward, dq and dk/dv,
  which all walk one block map). Powers of two >= 16 (Triton dot / arange limits).
  num_warps (None = 4 for head dim <= 64, else 8) and num_stages are Triton-only hints."""
  block_q: int = 64
  block_k: int = 64
  num_warps: int | None = None
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      b = getattr(self, name)
      if not isinstance(b, int) or b < 16 or b & (b - 1):
        raise ValueError(f"BlockSizes.{name} must be a power of two >= 16, got {b!r}")
    if self.num_warps is not None and (not isinstance(self.num_warps, int)
                                       or self.num_warps <= 0):
      raise ValueError(f"BlockSizes.num_warps must be a positive int or None, "
                       f"got {self.num_warps!r}")
    if not isinstance(self.num_stages, int) or self.num_stages <= 0:
      raise ValueError(f"BlockSizes.num_stages must be a positive int, got {self.num_stages!r}")

  @classmethod
  def get_default(cls, backend: str = "gpu") -> "BlockSizes":
    if backend == "tpu":
      return cls(block_q=128, block_k=128)
    return cls(block_q=64, block_k=64)


def resolve_backend(backend: str | None, interpret: bool) -> str:
  """'gpu' | 'tpu' from the argument or jax.default_backend(); CPU needs interpret=True."""
  if backend is not None:
    if backend not in _BACKENDS:
      raise ValueError(f"backend must be one of {_BACKENDS} or None, got {backend!r}")
    return backend
  platform = jax.default_backend()
  if platform in ("gpu", "cuda", "rocm"):
    return "gpu"
  if platform == "tpu":
    return "tpu"
  if interpret:
    return "gpu"   # GPU-style kernel through the Pallas interpreter
  raise ValueError(f"sparse_attention has no compiled kernel for platform {platform!r}; "
                   "pass interpret=True to run the GPU-style kernel in the Pallas "
                   "interpreter (slow, for testing)")


def _backend_module(backend: str):
  if backend == "gpu":
    from pallas_kernels import gpu
    return gpu
  try:
    from pallas_kernels import tpu
  except ImportError as e:
    raise ImportError("backend='tpu' needs pallas_kernels/tpu.py (the Mosaic TPU kernels), "
                      f"which could not be imported: {e}") from e
  return tpu


def check_inputs(q, k, v, compressed_mask) -> int:
  """G = H // Hkv; raise ValueError naming the offending shapes/dtypes.

  Shapes as `sea_jax.ops.sparse.check_shapes`: q (N, H, T, d), k == v (N, Hkv, T, d) with
  H % Hkv == 0, compressed_mask (N, H, T, K)."""
  G = check_shapes(q, k, v, compressed_mask)
  shapes = (f"q.shape={q.shape}, k.shape={k.shape}, v.shape={v.shape}, "
            f"compressed_mask.shape={compressed_mask.shape}")
  if compressed_mask.dtype != jnp.bool_:
    raise ValueError(f"compressed_mask must be bool, got {compressed_mask.dtype} ({shapes})")
  dts = {jnp.dtype(x.dtype) for x in (q, k, v)}
  if len(dts) != 1 or next(iter(dts)) not in _DTYPES:
    raise ValueError(f"q, k, v must share one dtype in (float32, bfloat16); got "
                     f"q {q.dtype}, k {k.dtype}, v {v.dtype}")
  return G


@functools.partial(jax.jit, static_argnames=("backend", "interpret", "block_sizes"))
def sparse_attention(q, k, v, compressed_mask, *, backend: str | None = None,
                     interpret: bool = False, block_sizes: BlockSizes | None = None):
  """SEA sparse attention: q (N,H,T,d), k, v (N,Hkv,T,d), bool (N,H,T,K) -> (N,H,T,d) in
  q.dtype; query head h reads kv head h // (H // Hkv).

  Differentiable in q, k, v (custom_vjp with Pallas dq and dk/dv kernels; dk, dv (N,Hkv,T,d)).
  """
  check_inputs(q, k, v, compressed_mask)
  backend = resolve_backend(backend, interpret)
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(backend)
  if not isinstance(block_sizes, BlockSizes):
    raise TypeError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
  T = q.shape[2]
  mult = max(block_sizes.block_q, block_sizes.block_k)   # powers of two: lcm == max
  Tp = -(-T // mult) * mult
  if Tp != T:
    pad = ((0, 0), (0, 0), (0, Tp - T), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    compressed_mask = jnp.pad(compressed_mask, pad)    # padded rows keep nothing
  out = _sparse_core(q, k, v, compressed_mask, backend, block_sizes, interpret)
  return out[:, :, :T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _sparse_core(q, k, v, compressed_mask, backend, block_sizes, interpret):
  out, _ = _sparse_core_fwd(q, k, v, compressed_mask, backend, block_sizes, interpret)
  return out


def _sparse_core_fwd(q, k, v, compressed_mask, backend, block_sizes, interpret):
  impl = _backend_module(backend)
  bm = build_block_map(compressed_mask, block_q=block_sizes.block_q,
                       block_k=block_sizes.block_k)
  out, lse = impl.forward(q, k, v, compressed_mask, bm, block_sizes=block_sizes,
                          interpret=interpret)
  return out, (q, k, v, compressed_mask, bm, out, lse)


def _sparse_core_bwd(backend, block_sizes, interpret, res, d_out):
  q, k, v, compressed_mask, bm, out, lse = res
  impl = _backend_module(backend)
  dq, dk, dv = impl.backward(q, k, v, compressed_mask, bm, out, lse, d_out,
                             block_sizes=block_sizes, interpret=interpret)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_sparse_core.defvjp(_sparse_core_fwd, _sparse_core_bwd)
