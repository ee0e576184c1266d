"""A target that refuses the adapter (a LoRA on a layer holding (IA)^3) fails ``inject`` with the model as it was.

The targets before it in model order used to stay wrapped with an adapter that no config described, so the
corrected call failed with "adapter 'lora' already exists on this layer"."""

import pytest
import torch
from torch import nn

from alignlab.adapters import IA3Config, LoRAConfig, adapter_configs, inject


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))


def test_a_refused_target_leaves_every_other_target_as_it_was():
    net = _net()
    inject(net, IA3Config(target_modules=["1"], feedforward_modules=[]), adapter_name="ia3")
    flags = [p.requires_grad for p in net.parameters()]
    with pytest.raises(ValueError, match="'1' already holds a IA3Linear"):
        inject(net, LoRAConfig(r=2, target_modules="all-linear"), adapter_name="lora")
    assert [type(m).__name__ for m in net] == ["Linear", "IA3Linear", "Linear"]
    assert list(adapter_configs(net)) == ["ia3"] and list(net[1].ia3_l) == ["ia3"]
    assert [p.requires_grad for p in net.parameters()] == flags
    inject(net, LoRAConfig(r=2, target_modules=["0", "2"]), adapter_name="lora")   # the corrected call
    assert [type(m).__name__ for m in net] == ["LoRALinear", "IA3Linear", "LoRALinear"]


def test_a_refusal_after_some_layers_took_the_adapter_takes_it_back():
    net = _net()
    inject(net, LoRAConfig(r=2, target_modules=["0"]), adapter_name="a")
    inject(net, IA3Config(target_modules=["2"], feedforward_modules=[]), adapter_name="ia3")
    with pytest.raises(ValueError, match="'2' already holds a IA3Linear"):
        inject(net, LoRAConfig(r=2, target_modules="all-linear"), adapter_name="b")
    assert list(net[0].lora_A) == ["a"] and type(net[1]) is nn.Linear
    assert sorted(adapter_configs(net)) == ["a", "ia3"]


def test_a_refused_new_layer_unwraps_the_ones_built_before_it():
    net = nn.Sequential(nn.Linear(4, 4), nn.Embedding(10, 4))
    flags = [p.requires_grad for p in net.parameters()]
    with pytest.raises(ValueError, match="DoRA on the embedding '1'"):
        inject(net, LoRAConfig(r=2, target_modules=["0", "1"], use_dora=True))
    assert type(net[0]) is nn.Linear and type(net[1]) is nn.Embedding
    assert [p.requires_grad for p in net.parameters()] == flags and adapter_configs(net) == {}
