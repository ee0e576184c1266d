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


def _families():
    from alignlab.adapters import (AdaLoRALinear, BitFitLayer, IA3Linear, LoKrLinear, LoRAEmbedding, VeRALinear,
                                   VeRAProjections)

    yield "adalora", lambda: AdaLoRALinear(nn.Linear(64, 24).double(), r=3, scaling=0.7), torch.randn(3, 64)
    yield "lokr", lambda: LoKrLinear(nn.Linear(64, 24).double(), r=2), torch.randn(3, 64)
    yield "vera", lambda: VeRALinear(nn.Linear(64, 24).double(), VeRAProjections(4, 64, 24, 0).double(), r=4), \
        torch.randn(3, 64)
    yield "ia3", lambda: IA3Linear(nn.Linear(64, 24).double()), torch.randn(3, 64)
    yield "ia3_ff", lambda: IA3Linear(nn.Linear(64, 24).double(), feedforward=True), torch.randn(3, 64)
    yield "embedding", lambda: LoRAEmbedding(nn.Embedding(40, 16).double(), r=2), torch.randint(0, 40, (3, 5))
    yield "bitfit", lambda: BitFitLayer(nn.Linear(64, 24).double()), torch.randn(3, 64)
    yield "bitfit_no_bias", lambda: BitFitLayer(nn.Linear(64, 24, bias=False).double()), torch.randn(3, 64)


@pytest.mark.parametrize("family", [f[0] for f in _families()])
def test_other_families_merge_float64_exactly(family):
    torch.manual_seed(0)
    build, x = {name: (b, x) for name, b, x in _families()}[family]
    layer = build()
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                assert p.dtype == torch.float64
                p.add_(torch.randn(p.shape, dtype=torch.float64) * 0.3)
    x = x.double() if x.is_floating_point() else x
    w0 = {k: v.detach().clone() for k, v in layer.base_layer.named_parameters()}
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-12)
        layer.unmerge()
    for k, v in layer.base_layer.named_parameters():
        torch.testing.assert_close(v, w0[k], rtol=0, atol=1e-14)


def test_expert_lora_merges_float64_exactly():
    from conftest import make_experts

    from alignlab.adapters import ExpertLoRA

    torch.manual_seed(0)
    layer = ExpertLoRA(make_experts(hidden=16, intermediate=12).double(), {"down_proj": 2}, alpha=4.0)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                assert p.dtype == torch.float64
                p.add_(torch.randn(p.shape, dtype=torch.float64) * 0.3)
    h = torch.randn(6, 16, dtype=torch.float64)
    idx, w = torch.tensor([[0, 1], [1, 2], [2, 0], [1, 0], [1, 2], [0, 1]]), torch.rand(6, 2, dtype=torch.float64)
    w0 = layer.base_layer.down_proj.detach().clone()
    with torch.no_grad():
        before = layer(h, idx, w)
        layer.merge()
        torch.testing.assert_close(layer(h, idx, w), before, rtol=0, atol=1e-12)
        layer.unmerge()
    torch.testing.assert_close(layer.base_layer.down_proj, w0, rtol=0, atol=1e-14)
