"""QLoRA / QDoRA under torch.autocast with an NF4 compute dtype other than the autocast dtype (user trial
2026-12-04): the fused functions' GEMMs were autocast to bf16 next to fp32 operands and raised
"self and mat2 must have the same dtype"; now the layer takes the plain path, as on an nn.Linear base."""

import warnings

import pytest
import torch
from torch import nn

from alignlab.adapters import LoRAConfig, inject
from alignlab.quant import quantize_model


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("rows", [5, 20])
def test_fp32_compute_nf4_under_bf16_autocast(kernel_mode, use_dora, rows):
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(nn.Linear(64, 8)), blocksize=32, compute_dtype=torch.float32)
    model = inject(model, LoRAConfig(r=2, alpha=4, use_dora=use_dora))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x = torch.randn(rows, 64)
    ref = model(x)
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().sum().backward()
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)
    for p, g in zip([p for p in model.parameters() if p.requires_grad], ref_grads):
        assert p.grad is not None and p.grad.dtype == p.dtype
        torch.testing.assert_close(p.grad, g, rtol=5e-2, atol=5e-2)
