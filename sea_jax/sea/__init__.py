"""SEA attention (SEA_SPEC §1): Performer branch, estimator, grouped top-k, sparse attention.

The names below load their module on first use (PEP 562), so importing a leaf such as
`sea_jax.sea.bins` never pulls in the layer, the attention seam or the Pallas kernels.
"""
import importlib

_EXPORTS = {
    "bins": ("bin_bounds", "bin_index", "bin_start", "nonempty_bins"),
    "estimator": ("Estimator", "adaptive_avg_pool_matrix", "upsample_pool_matrix"),
    "layer": ("PerformerAttention", "RandomFeatures", "SEAAttention", "causal_mean",
              "masked_bin_softmax", "sparse_dispatch"),
    "performer": ("causal_linear_attention", "num_random_features",
                  "orthogonal_random_features", "relu_features"),
    "sparse": ("sparse_attention", "sparse_attention_reference", "tile_ladder"),
    "topk": ("check_k", "expand_mask", "grouped_topk_mask", "row_budget"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
  if name in _MODULE_OF:
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
