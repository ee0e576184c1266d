"""Attributes read through a ``modules_to_save`` wrapper come from the copy that forward runs (as in PEFT).

``fused_linear_dpo(h, model.lm_head.weight, ...)`` with ``modules_to_save=["lm_head"]`` used to get the frozen
original's weight: the loss scored with the untrained head and the trained copy got no gradient.
"""

import torch
from torch import nn

from alignlab.adapters import LoRAConfig, disabled, inject, set_adapter


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 5))


def test_weight_is_the_active_copy_and_the_original_when_disabled():
    net = _net()
    inject(net, LoRAConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    head = net[2]
    copy_ = head.modules_to_save["default"]
    assert head.weight is copy_.weight and head.bias is copy_.bias
    assert head.weight.requires_grad
    with disabled(net):
        assert head.weight is head.original_module.weight
    assert head.weight is copy_.weight


def test_weight_follows_set_adapter():
    net = _net()
    inject(net, LoRAConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    inject(net, LoRAConfig(r=2, target_modules=["0"], modules_to_save=["2"]), adapter_name="other")
    head = net[2]
    assert head.weight is head.modules_to_save["default"].weight
    set_adapter(net, "other")
    assert head.weight is head.modules_to_save["other"].weight


def test_weight_read_gives_the_forward_output_and_trains_the_copy():
    net = _net()
    inject(net, LoRAConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    head = net[2]
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)     # a trained copy, unlike the original
    h = torch.randn(3, 6)
    torch.testing.assert_close(h @ head.weight.T + head.bias, head(h))
    (h @ head.weight.T).sum().backward()
    assert head.modules_to_save["default"].weight.grad is not None
    assert head.original_module.weight.grad is None
