"""(IA)³ layers move and cast like any module: ``model.to(dtype)``, ``.double()``, ``.half()`` and ``.to(device)``
go through ``nn.Module._apply``, which IA3Linear's merge helper used to shadow (a TypeError on every call)."""

import torch

from conftest import make_tiny_llama

from alignlab.adapters import IA3Config, IA3Linear, inject, merge, unmerge

IDS = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))


def test_ia3_model_casts_and_still_merges():
    model = inject(make_tiny_llama(), IA3Config(init_ones=False))
    with torch.no_grad():
        want = model(input_ids=IDS).logits.double()
    model.to(torch.float64)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(layer, IA3Linear)
    assert layer.ia3_l["default"].dtype == torch.float64 and layer.base_layer.weight.dtype == torch.float64
    with torch.no_grad():
        out = model(input_ids=IDS).logits
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        merge(model)
        torch.testing.assert_close(model(input_ids=IDS).logits, out, rtol=1e-5, atol=1e-5)
        unmerge(model)
    model.half().float().to("cpu")
    assert layer.ia3_l["default"].dtype == torch.float32
