"""Pallas kernels for SEA sparse attention (GPU Triton-style; TPU Mosaic in tpu.py)."""
from sea_jax.sea.block_map import BlockMap, build_block_map
from pallas_kernels.sparse_attention import (BlockSizes, sparse_attention,
                                             sparse_attention_reference)

__all__ = ["BlockMap", "BlockSizes", "build_block_map", "sparse_attention",
           "sparse_attention_reference"]
