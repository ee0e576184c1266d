"""alignlab.merging: model merging as tensor functions, LoRA merging and streaming checkpoint merges."""

from alignlab.merging.methods import (
    breadcrumbs,
    chipalign,
    combine_deltas,
    dare,
    della,
    karcher,
    linear,
    magnitude_mask,
    model_stock,
    slerp,
    task_arithmetic,
    ties,
)

__all__ = [
    "breadcrumbs",
    "chipalign",
    "combine_deltas",
    "dare",
    "della",
    "karcher",
    "linear",
    "magnitude_mask",
    "model_stock",
    "slerp",
    "task_arithmetic",
    "ties",
]
