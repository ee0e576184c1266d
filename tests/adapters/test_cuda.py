"""GPU checks of the adapter layers: bf16 numerics on CUDA and DoRA's memory promise."""

import pytest
import torch
from torch import nn

from alignlab.adapters import DoRALinear, LoRALinear

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32])
def test_bf16_cuda_matches_fp64_formula(cls, adapter_dtype):
    torch.manual_seed(0)
    base = nn.Linear(300, 200, device="cuda", dtype=torch.bfloat16)
    layer = cls(base, r=8, alpha=16, adapter_dtype=adapter_dtype)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.05)
    x = torch.randn(3, 17, 300, device="cuda", dtype=torch.bfloat16)
    w, bias = base.weight.double(), base.bias.double()
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    s = layer.scaling["default"]
    v = w + s * b @ a
    if cls is DoRALinear:
        m = layer.lora_magnitude_vector["default"].double()
        v = m[:, None] * v / v.norm(dim=1, keepdim=True)
    ref = x.double() @ v.T + bias
    out = layer(x).double()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2


def test_dora_forward_holds_at_most_one_dense_temporary():
    torch.manual_seed(0)
    n = 4096
    base = nn.Linear(n, n, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = DoRALinear(base, r=16, alpha=32, adapter_dtype=torch.bfloat16)
    x = torch.randn(4, n, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    with torch.no_grad():
        layer(x)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start
    dense_fp32 = n * n * 4  # the fp32 view of the bf16 base weight is the one temporary allowed
    assert extra <= dense_fp32 * 1.1, extra
