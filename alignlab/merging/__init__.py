"""alignlab.merging: model merging as tensor functions, LoRA factor merging, streaming checkpoint merges.

* :mod:`~alignlab.merging.methods` -- linear, task arithmetic, TIES, DARE, breadcrumbs, DELLA,
  SLERP, ChipAlign, Karcher mean, Model Stock, each a function on tensors.
* :mod:`~alignlab.merging.lora` -- fold adapters into a base, combine adapters (cat / linear / SVD).
* :mod:`~alignlab.merging.checkpoint` -- ``merge_checkpoints(recipe, out_dir)``: tensor-by-tensor
  merges of sharded safetensors checkpoints; CLI ``python -m alignlab.merging recipe.yaml OUT``.
"""

from alignlab.merging.checkpoint import SafetensorsCheckpoint, merge_checkpoints, merge_tensor
from alignlab.merging.lora import fold_lora, lora_cat, lora_delta, lora_linear, lora_svd
from alignlab.merging.methods import (
    breadcrumbs,
    chipalign,
    combine_deltas,
    dare,
    dare_mask,
    della,
    della_mask,
    karcher,
    linear,
    magnitude_mask,
    model_stock,
    slerp,
    task_arithmetic,
    ties,
)
from alignlab.merging.recipe import Recipe, load_recipe, recipe_from_dict

__all__ = [
    "Recipe",
    "SafetensorsCheckpoint",
    "breadcrumbs",
    "chipalign",
    "combine_deltas",
    "dare",
    "dare_mask",
    "della",
    "della_mask",
    "fold_lora",
    "karcher",
    "linear",
    "load_recipe",
    "lora_cat",
    "lora_delta",
    "lora_linear",
    "lora_svd",
    "magnitude_mask",
    "merge_checkpoints",
    "merge_tensor",
    "model_stock",
    "recipe_from_dict",
    "slerp",
    "task_arithmetic",
    "ties",
]
