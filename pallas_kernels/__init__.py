"""Pallas kernels for SEA sparse attention (GPU Triton-style; TPU Mosaic in tpu.py), beside the
one reference they must equal (`sea_jax.ops.sparse_attention_reference`). They import only
`sea_jax.ops` (the block map, the bin arithmetic, the shape checks)."""
from pallas_kernels.sparse_attention import BlockSizes, sparse_attention
from sea_jax.ops.block_map import BlockMap, build_block_map
from sea_jax.ops.sparse import sparse_attention_reference

__all__ = ["BlockMap", "BlockSizes", "build_block_map", "sparse_attention",
           "sparse_attention_reference"]
