"""PiSSA / OLoRA on a float64 model: the residual base plus the adapter gives the base's output to float64
precision at initialisation (the factorisation and residual ran in fp32 before: ~1e-7 off)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alignlab.adapters import LoRALinear


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
@pytest.mark.parametrize("adapter_dtype", [None, torch.float32])
def test_float64_base_output_unchanged_at_init(init, adapter_dtype):
    torch.manual_seed(0)
    base = nn.Linear(24, 40, dtype=torch.float64)
    x = torch.randn(5, 24, dtype=torch.float64)
    ref = base(x)
    layer = LoRALinear(base, r=4, alpha=8, init=init, adapter_dtype=adapter_dtype)
    # fp32 factors are rounded, but the residual is formed from the rounded values: exact again
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)


def test_float32_base_keeps_float32_factorisation():
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    x = torch.randn(5, 24)
    ref = base(x)
    layer = LoRALinear(base, r=4, alpha=8, init="pissa")
    assert layer.lora_A["default"].weight.dtype == torch.float32
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
