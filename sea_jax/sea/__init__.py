"""SEA attention (SEA_SPEC §1): Performer branch, estimator, grouped top-k, sparse attention."""
from sea_jax.sea.bins import bin_bounds, bin_index, bin_start, nonempty_bins
from sea_jax.sea.estimator import Estimator, adaptive_avg_pool_matrix, upsample_pool_matrix
from sea_jax.sea.layer import (PerformerAttention, RandomFeatures, SEAAttention, causal_mean,
                               masked_bin_softmax, sparse_dispatch)
from sea_jax.sea.performer import (causal_linear_attention, num_random_features,
                                   orthogonal_random_features, relu_features)
from sea_jax.sea.sparse import sparse_attention, sparse_attention_reference, tile_ladder
from sea_jax.sea.topk import check_k, expand_mask, grouped_topk_mask, row_budget

__all__ = [
    "bin_bounds", "bin_index", "bin_start", "nonempty_bins",
    "Estimator", "adaptive_avg_pool_matrix", "upsample_pool_matrix",
    "PerformerAttention", "RandomFeatures", "SEAAttention", "causal_mean", "masked_bin_softmax",
    "sparse_dispatch",
    "causal_linear_attention", "num_random_features", "orthogonal_random_features",
    "relu_features",
    "sparse_attention", "sparse_attention_reference", "tile_ladder",
    "check_k", "expand_mask", "grouped_topk_mask", "row_budget",
]
