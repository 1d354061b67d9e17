"""Pure attention functions and SEA's mask geometry: the floor every module stands on.

Nothing here holds parameters or reads a config; `pallas_kernels` imports only this package.
  bins             exact integer bin arithmetic of a row's compressed keys (SEA_SPEC §1.3)
  block_map        which (query block, key block) tiles hold a kept key, in-tile index math
  sparse           SEA's sparse attention (tile list, custom VJP), its one reference, the one
                   expansion of a compressed mask to T x T (tests, pictures)
  blocked_attention  causal attention a query block at a time over the keys it can see
                   (dense attention's CPU path, SEA's every-key path), FlashAttention backward
  dense            the T x T reference, the chunked KV-cache path, cuDNN and splash attention
"""
from sea_jax.ops.bins import bin_bounds, bin_index, bin_start, nonempty_bins, row_bounds
from sea_jax.ops.block_map import BlockMap, build_block_map
from sea_jax.ops.blocked_attention import blocked_attention
from sea_jax.ops.dense import (NEG_INF, causal_key_mask, dense_attention, dense_attention_chunked,
                               dense_attention_cudnn, dense_attention_splash, repeat_kv)
from sea_jax.ops.sparse import (check_shapes, expand_mask, sparse_attention,
                                sparse_attention_reference, tile_ladder)

__all__ = ["BlockMap", "NEG_INF", "bin_bounds", "bin_index", "bin_start", "blocked_attention",
           "build_block_map", "causal_key_mask", "check_shapes", "dense_attention",
           "dense_attention_chunked", "dense_attention_cudnn", "dense_attention_splash",
           "expand_mask", "nonempty_bins", "repeat_kv", "row_bounds", "sparse_attention",
           "sparse_attention_reference", "tile_ladder"]
