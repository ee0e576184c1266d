"""Hooks on the wrapped base layer run as they would without the adapter: the fused path reads the base's weight
without calling the base, so a base with hooks (its own or global ones) takes the plain path, which calls it."""

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from alignlab.adapters import LoRAConfig, LoRALinear, inject
from alignlab.adapters import lora as lora_module
from alignlab.quant.linear import NF4Linear


def _layer(base_kind, dora=False):
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    if base_kind == "nf4":
        base = NF4Linear.from_linear(base, compute_dtype=torch.float32)
    layer = LoRALinear(base, r=4, alpha=8, use_dora=dora)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    return layer


def _formula(x, w, bias, a, b, s):
    x, w, a, b = x.double(), w.double(), a.double(), b.double()
    return x @ (w + s * b @ a).T + bias.double()


@pytest.mark.parametrize("base_kind", ["dense", "nf4"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_forward_and_backward_hooks_on_the_base_run(base_kind, dora):
    layer = _layer(base_kind, dora)
    base, seen = layer.base_layer, []
    handles = [base.register_forward_pre_hook(lambda m, args: seen.append("pre")),
               base.register_forward_hook(lambda m, args, out: seen.append("post")),
               base.register_full_backward_hook(lambda m, gin, gout: seen.append("backward"))]
    x = torch.randn(3, 12, requires_grad=True)
    with torch.no_grad():
        want = layer(x)
    layer(x).sum().backward()
    assert seen == ["pre", "post", "pre", "post", "backward"]
    for h in handles:
        h.remove()
    torch.testing.assert_close(layer(x), want)  # the fused path again, the same output


def test_a_pre_hook_that_changes_the_input_is_seen():
    """A pre-hook's returned input feeds the base product (PEFT calls ``base_layer(x)`` too; the adapter term takes
    the layer's own input)."""
    layer = _layer("dense")
    base = layer.base_layer
    x = torch.randn(2, 12)
    base.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    want = (2 * x.double()) @ base.weight.double().T + base.bias.double() + s * (x.double() @ a.double().T) @ b.double().T
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)


def test_pruned_base_weight_is_rebuilt_by_its_pre_hook():
    """``torch.nn.utils.prune`` keeps ``weight = weight_orig * mask`` up to date through a forward pre-hook: the
    layer computes with the pruned weight, also after ``weight_orig`` changed."""
    layer = _layer("dense")
    base = layer.base_layer
    prune.l1_unstructured(base, "weight", 0.5)
    with torch.no_grad():
        base.weight_orig.mul_(3)
    x = torch.randn(4, 12)
    w = base.weight_orig * base.weight_mask
    want = _formula(x, w, base.bias, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                    layer.scaling["default"])
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)


def test_global_module_hooks_run_on_the_base():
    layer = _layer("dense")
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    try:
        layer(torch.randn(2, 12))
    finally:
        handle.remove()
    assert "Linear" in seen


def test_hooks_registered_before_inject_keep_running(monkeypatch):
    """``inject`` moves the original module (hooks included) under ``base_layer``: its hooks still run; without
    hooks the layer takes the fused path."""
    net = nn.Sequential(nn.Linear(4, 4))
    seen = []
    handle = net[0].register_forward_hook(lambda m, args, out: seen.append(1))
    inject(net, LoRAConfig(r=2, target_modules="all-linear"))
    net(torch.randn(2, 4))
    assert seen == [1]
    handle.remove()
    calls = []
    real = lora_module.lora_linear
    monkeypatch.setattr(lora_module, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    net(torch.randn(2, 4))
    assert calls == [1] and seen == [1]
