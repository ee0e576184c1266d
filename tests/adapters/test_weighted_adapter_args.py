"""Arguments of add_weighted_adapter and merge's adapter names: wrong ones raise naming the argument, before any change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alignlab.adapters import (LoRAConfig, adapter_configs, adapter_layers, add_weighted_adapter, inject, merge,
                               merge_and_unload)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    inject(model, LoRAConfig(r=2, target_modules=["0", "2"]))
    inject(model, LoRAConfig(r=2, target_modules=["0", "2"]), adapter_name="b")
    return model


@pytest.mark.parametrize("kwargs, error, match", [
    # a string was read as its letters: "adapters and weights must be ... of equal length, got 7 and 1"
    (dict(adapters="default", weights=[1.0, 2.0]), ValueError, "equal length, got 1 and 2"),
    (dict(weights=1.0), TypeError, "weights must be a sequence"),  # was "'float' object is not iterable"
    (dict(combination="svd", rank=2.5), TypeError, "rank must be a positive integer"),  # slice indices must be ...
    (dict(combination="svd", rank="2"), TypeError, "rank must be a positive integer"),  # '<=' not supported ...
    (dict(combination="svd", rank=0), ValueError, "rank must be a positive integer"),
])
def test_add_weighted_adapter_names_the_bad_argument(kwargs, error, match):
    model = _model()
    args = dict(adapters=["default", "b"], weights=[0.5, 0.5], adapter_name="mix") | kwargs
    with pytest.raises(error, match=match):
        add_weighted_adapter(model, **args)
    assert sorted(adapter_configs(model)) == ["b", "default"]


def test_add_weighted_adapter_takes_one_name_as_a_string():
    model = _model()
    add_weighted_adapter(model, "b", [2.0], "twice_b")
    layer = model[2]
    x = torch.randn(3, 8)
    nn.init.normal_(layer.lora_B["b"].weight)
    add_weighted_adapter(model, "b", [2.0], "twice_b_trained")
    delta = layer.lora_B["twice_b_trained"].weight @ layer.lora_A["twice_b_trained"].weight
    torch.testing.assert_close(x @ delta.T, 2 * layer.scaling["b"] * x @ (layer.lora_B["b"].weight @ layer.lora_A["b"].weight).T)


@pytest.mark.parametrize("fn", [merge, merge_and_unload])
def test_merge_refuses_an_empty_list_of_names(fn):
    """``merge(model, [])`` merged the active adapters (an empty list was read as None)."""
    model = _model()
    with pytest.raises(ValueError, match="adapter_names is empty"):
        fn(model, [])
    assert all(not layer.merged for _, layer in adapter_layers(model)) and len(list(adapter_layers(model))) == 2
