"""An adapter name that is an attribute of the per-adapter dicts (``half``, ``train``, ``keys``) is a ValueError
naming it, raised before the model changes; it used to be torch's ``KeyError: attribute 'half' already exists``
(from the first layer's ``ModuleDict``), also from ``add_weighted_adapter``."""

import pytest
import torch
from torch import nn

from alignlab.adapters import LoRAConfig, LoRALinear, add_weighted_adapter, adapter_configs, inject


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))


@pytest.mark.parametrize("name", ["half", "train", "keys", "update", "forward"])
def test_inject_refuses_a_name_the_dicts_hold_as_attribute(name):
    net = _net()
    with pytest.raises(ValueError, match=f"adapter name {name!r}"):
        inject(net, LoRAConfig(r=2, target_modules="all-linear", modules_to_save=["2"]), adapter_name=name)
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in net)


def test_add_weighted_adapter_refuses_it_and_leaves_the_model():
    net = _net()
    inject(net, LoRAConfig(r=2, target_modules="all-linear"))
    with pytest.raises(ValueError, match="adapter name 'half'"):
        add_weighted_adapter(net, ["default"], [0.5], "half")
    assert list(adapter_configs(net)) == ["default"]
    assert [list(m.lora_A) for m in (net[0], net[2])] == [["default"], ["default"]]


def test_a_layer_built_by_hand_refuses_it():
    with pytest.raises(ValueError, match="adapter name 'cuda'"):
        LoRALinear(nn.Linear(4, 4), r=2, adapter_name="cuda")


def test_names_that_only_look_alike_are_fine():
    net = _net()
    inject(net, LoRAConfig(r=2, target_modules="all-linear"), adapter_name="half_precision")
    assert list(net[0].lora_A) == ["half_precision"]
