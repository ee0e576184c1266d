"""The bookkeeping ``AdapterLayer`` owns for every family: names, stores, dtypes, the additive forward."""

import pytest
import torch
from torch import nn

from alignlab.adapters import AdaLoRALinear, BitFitLayer, IA3Linear, LoKrConfig, LoKrLinear, VeRALinear, VeRAProjections
from alignlab.quant.linear import NF4Linear

# (layer class, constructor taking (base, adapter_name), add_adapter taking (layer, name))
FAMILIES = {
    "ia3": (lambda base, n: IA3Linear(base, adapter_name=n), lambda layer, n: layer.add_adapter(n)),
    "vera": (lambda base, n: VeRALinear(base, VeRAProjections(4, 16, 12, 0), 4, adapter_name=n),
             lambda layer, n: layer.add_adapter(n, VeRAProjections(4, 16, 12, 0), 4)),
    "lokr": (lambda base, n: LoKrLinear(base, r=2, adapter_name=n), lambda layer, n: layer.add_adapter(n, r=2)),
    "adalora": (lambda base, n: AdaLoRALinear(base, 3, 1.0, adapter_name=n), lambda layer, n: layer.add_adapter(n, 3, 1.0)),
    "bitfit": (lambda base, n: BitFitLayer(base, adapter_name=n), lambda layer, n: layer.add_adapter(n)),
}


def _stores(layer):
    return {attr: set(getattr(layer, attr).keys()) for attr in layer.adapter_stores}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_add_and_delete_keep_every_store_in_step(family):
    make, add = FAMILIES[family]
    layer = make(nn.Linear(16, 12), "a")
    add(layer, "b")
    assert layer.adapter_names() == ["a", "b"] and layer.active_adapters == ["a"]
    for bad in ("", "x.y", 3):
        with pytest.raises(ValueError, match="adapter name"):
            add(layer, bad)
    with pytest.raises(ValueError, match="already exists"):
        add(layer, "b")
    layer.active_adapters = ["a", "b"]
    layer.delete_adapter("b")
    assert all("b" not in keys for keys in _stores(layer).values()), _stores(layer)
    assert layer.adapter_names() == ["a"] and layer.active_adapters == ["a"]
    with pytest.raises(ValueError, match="not found"):
        layer.delete_adapter("b")
    layer.merge()
    with pytest.raises(ValueError, match="merged"):
        layer.delete_adapter("a")
    with pytest.raises(ValueError, match="merged"):
        add(layer, "c")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapter_dtype_follows_the_base(family):
    make, _ = FAMILIES[family]
    for base_dtype, want in ((torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.float32)):
        layer = make(nn.Linear(16, 12, dtype=base_dtype), "a")
        own = [p for n, p in layer.named_parameters() if not n.startswith("base_layer.")]
        assert own and all(p.dtype == want for p in own), (base_dtype, {p.dtype for p in own})


@pytest.mark.parametrize("family", ["ia3", "vera", "lokr", "adalora"])
def test_adding_over_nf4_does_not_dequantize_the_weight(family, monkeypatch):
    """Only the dtype and device of the base are needed to build an adapter: no dense (out, in) copy."""
    make, add = FAMILIES[family]
    base = NF4Linear.from_linear(nn.Linear(16, 12).requires_grad_(False), compute_dtype=torch.float32)

    def refuse(*args, **kwargs):
        raise AssertionError("dequantized while building an adapter")

    monkeypatch.setattr(base, "dequantize", refuse)
    layer = make(base, "a")
    add(layer, "b")
    own = [p for n, p in layer.named_parameters() if not n.startswith("base_layer.")]
    assert all(p.dtype == torch.float32 for p in own)


@pytest.mark.parametrize("family", ["vera", "lokr", "adalora"])
def test_additive_forward_sums_the_unmerged_active_adapters(family):
    make, add = FAMILIES[family]
    layer = make(nn.Linear(16, 12), "a")
    add(layer, "b")
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if not n.startswith("base_layer."):
                p.add_(torch.randn_like(p))
    x = torch.randn(2, 3, 16)
    base = layer.base_layer(x)
    want = base + x @ (layer.delta_weight("a") + layer.delta_weight("b")).T
    layer.active_adapters = ["a", "b"]
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    layer.merge(["a"])  # a merged adapter is in the weight now, not added again
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    layer.disabled = True
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_lokr_config_checks_its_patterns():
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\]"):
        LoKrConfig(rank_pattern={"q_proj": 0})
    with pytest.raises(ValueError, match="alpha_pattern"):
        LoKrConfig(alpha_pattern={"(": 2.0})
