"""Shared edge cases of the linear-wrapping families: odd token counts (M=0, M=1, 3-D) and bf16 bases."""

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama

from alignlab.adapters import (
    AdaLoRALinear,
    BitFitConfig,
    BitFitLayer,
    IA3Config,
    IA3Linear,
    LoKrConfig,
    LoKrLinear,
    SoRAConfig,
    VeRAConfig,
    VeRALinear,
    VeRAProjections,
    adapter_layers,
    inject,
    merge,
    unmerge,
)

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _layers(dtype=torch.float32):
    torch.manual_seed(0)
    mk = lambda: nn.Linear(12, 10).to(dtype)  # noqa: E731
    return {
        "ia3": IA3Linear(mk(), init_ones=False),
        "ia3_ff": IA3Linear(mk(), feedforward=True, init_ones=False),
        "vera": VeRALinear(mk(), VeRAProjections(4, 12, 10, seed=0), r=4),
        "lokr": LoKrLinear(mk(), r=2, init_zero=False),
        "adalora": AdaLoRALinear(mk(), r=3, scaling=1.0),
        "bitfit": BitFitLayer(mk()),
    }


def _perturb(layer):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if not n.startswith("base_layer."):
                p.add_(0.3 * torch.randn(p.shape, generator=g).to(p.dtype))


@pytest.mark.parametrize("kind", ["ia3", "ia3_ff", "vera", "lokr", "adalora", "bitfit"])
@pytest.mark.parametrize("shape", [(0, 12), (1, 12), (2, 3, 12)])
def test_odd_token_counts(kind, shape):
    layer = _layers()[kind]
    _perturb(layer)
    x = torch.randn(*shape)
    y = layer(x)
    assert y.shape == (*shape[:-1], 10)
    # row by row equals the batched call (no cross-token mixing)
    flat = x.reshape(-1, 12)
    rows = [layer(flat[i:i + 1]) for i in range(flat.shape[0])]
    if rows:
        torch.testing.assert_close(torch.cat(rows).reshape(y.shape), y)


@pytest.mark.parametrize("kind", ["ia3", "ia3_ff", "vera", "lokr", "adalora", "bitfit"])
def test_bf16_base_uses_fp32_adapters_and_rounds_once(kind):
    ref, low = _layers(torch.float32)[kind], _layers(torch.bfloat16)[kind]
    _perturb(ref)
    with torch.no_grad():  # same numbers in both (the bf16 base holds the rounded weights)
        ref.base_layer.weight.copy_(low.base_layer.weight.float())
        ref.base_layer.bias.copy_(low.base_layer.bias.float())
        for (n, p), (_, q) in zip(ref.named_parameters(), low.named_parameters()):
            if not n.startswith("base_layer."):
                assert q.dtype == torch.float32, n  # adapters stay fp32 on a 16-bit base
                q.copy_(p)
    x = torch.randn(4, 12)
    y = low(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref(x.bfloat16().float()), rtol=2e-2, atol=2e-2)
    low.merge()
    torch.testing.assert_close(low.base_layer(x.bfloat16()).float(), y.float(), rtol=3e-2, atol=3e-2)
    low.unmerge()


@pytest.mark.parametrize("cfg", [IA3Config(), VeRAConfig(r=8, target_modules=["q_proj", "down_proj"]),
                                 LoKrConfig(r=2, target_modules=["q_proj", "down_proj"]), SoRAConfig(r=2, target_modules=["v_proj"])])
def test_bf16_model_merge_roundtrip(cfg):
    model = inject(make_tiny_llama().to(torch.bfloat16), cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for n, p in layer.named_parameters():
                if not n.startswith("base_layer."):
                    p.add_(0.2 * torch.randn(p.shape, generator=g))
    y = model(IDS).logits.float()
    merge(model)
    torch.testing.assert_close(model(IDS).logits.float(), y, rtol=5e-2, atol=5e-2)
    unmerge(model)
    torch.testing.assert_close(model(IDS).logits.float(), y, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("cfg", [IA3Config(), VeRAConfig(r=8, target_modules=["q_proj", "down_proj"]),
                                 LoKrConfig(r=2, target_modules=["q_proj", "down_proj"]), SoRAConfig(r=2, target_modules=["v_proj"]),
                                 BitFitConfig(target_modules=["o_proj"])])
def test_on_an_nf4_quantized_base(cfg, torch_mode):
    """QLoRA-style: the families wrap NF4Linear leaves; identity at init, gradients reach only the adapters."""
    from alignlab.quant import NF4Linear, quantize_model

    base = quantize_model(make_tiny_llama(), blocksize=32, compute_dtype=torch.float32)
    ref = base(IDS).logits
    model = inject(base, cfg)
    layers = [l for _, l in adapter_layers(model)]
    assert layers and all(isinstance(l.base_layer, NF4Linear) for l in layers)
    torch.testing.assert_close(model(IDS).logits, ref, rtol=0, atol=0)
    model(IDS).logits.square().mean().backward()
    grads = [p.grad for l in layers for n, p in l.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert all(p.dtype == torch.float32 for l in layers for n, p in l.named_parameters() if p.requires_grad)
