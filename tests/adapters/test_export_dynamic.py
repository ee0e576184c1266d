"""``torch.export`` of adapted layers with a dynamic batch and sequence length: one program for every size.

``fused._rows`` flattened with ``torch.Size.numel()``, which export's symbolic shapes made a constant (the export
failed with "Constraints violated"), and ``lora_decode.applies`` put a guard on the row count before its dtype test
(found by a helper, 2026-12-07)."""

import pytest
import torch
from torch import nn
from torch.export import Dim

from alignlab.adapters import LoRAConfig, inject
from alignlab.quant import quantize_model


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("dora", [False, True])
def test_export_with_dynamic_batch_and_sequence(nf4, dora):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16))
    if nf4:
        model = quantize_model(model, compute_dtype=torch.float32)
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=["0", "2"], use_dora=dora))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    model.eval()
    exported = torch.export.export(model, (torch.randn(2, 5, 32),),
                                   dynamic_shapes=({0: Dim("batch", max=64), 1: Dim("seq", max=512)},))
    for shape in ((3, 9), (1, 1), (7, 130)):
        x = torch.randn(*shape, 32)
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)
