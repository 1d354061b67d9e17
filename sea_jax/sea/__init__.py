"""SEA's modules (SEA_SPEC §1): the Performer branch, the estimator, the grouped top-k, the
attention cores and their incremental decoding. The pure attention functions and the mask
geometry they use live one floor down, in `sea_jax.ops`."""
from sea_jax.sea.estimator import Estimator, adaptive_avg_pool_matrix, upsample_pool_matrix
from sea_jax.sea.layer import (PerformerAttention, RandomFeatures, SEAAttention, causal_mean,
                               masked_bin_softmax, sparse_dispatch)
from sea_jax.sea.performer import (causal_linear_attention, num_random_features,
                                   orthogonal_random_features, relu_features)
from sea_jax.sea.topk import check_k, grouped_topk_mask, row_budget

__all__ = ["Estimator", "PerformerAttention", "RandomFeatures", "SEAAttention",
           "adaptive_avg_pool_matrix", "causal_linear_attention", "causal_mean", "check_k",
           "grouped_topk_mask", "masked_bin_softmax", "num_random_features",
           "orthogonal_random_features", "relu_features", "row_budget", "sparse_dispatch",
           "upsample_pool_matrix"]
