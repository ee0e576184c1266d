"""Merging into a float64 base keeps float64: the fold ran through fp32 (``w.float()``), so a merged fp64 model
differed from base + adapter by ~1e-7 and unmerge left the base ~1e-8 off, where fp64 gives ~1e-16."""

import pytest
import torch
from torch import nn

from alignlab.adapters import LoRALinear


@pytest.mark.parametrize("kinds", [("lora",), ("dora",), ("lora", "dora")])
def test_float64_merge_and_unmerge_are_float64_exact(kinds):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 24).double(), r=2, alpha=4, adapter_name="a0", use_dora=kinds[0] == "dora")
    for i, kind in enumerate(kinds[1:], 1):
        layer.add_adapter(f"a{i}", r=2, alpha=4, use_dora=kind == "dora")
    names = [f"a{i}" for i in range(len(kinds))]
    layer.active_adapters = names
    with torch.no_grad():
        for n in names:
            assert layer.lora_A[n].weight.dtype == torch.float64
            layer.lora_B[n].weight.normal_(0, 0.3)
    x = torch.randn(3, 64, dtype=torch.float64)
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-12)
        layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-14)
