"""QLoRA / QDoRA on NF4 experts through the Triton kernels (interpreter on CPU): the NF4 matmuls of linear_sorted and
DoRA's per-call dequantization, in ExpertLoRA's forward and backward, against the PyTorch reference path."""

import pytest
import torch

from conftest import make_experts

from alignlab.adapters import ExpertLoRA
from alignlab.quant import NF4Experts


def _run(layer, x, idx, w):
    x = x.clone().requires_grad_()
    layer.zero_grad()
    y = layer(x, idx, w)
    y.square().sum().backward()
    return [y.detach(), x.grad] + [p.grad.clone() for p in layer.parameters() if p.requires_grad]


@pytest.mark.parametrize("dora", [False, True])
def test_expert_lora_on_nf4_experts_triton_equals_torch(triton_mode, dora):
    experts = make_experts()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = NF4Experts.from_experts(experts, compute_dtype=torch.float32).to(device)
    layer = ExpertLoRA(q, {"gate_up_proj": 2, "down_proj": 2}, alpha=4.0, use_dora=dora)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(3, 64, device=device)
    idx = torch.tensor([[0, 2], [2, 0], [0, 2]], device=device)  # expert 1 gets no rows
    w = torch.rand(3, 2, device=device)
    ours = _run(layer, x, idx, w)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("ALIGNLAB_KERNELS", "torch")
        reference = _run(layer, x, idx, w)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
