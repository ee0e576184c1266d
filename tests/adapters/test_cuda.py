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


@pytest.mark.parametrize("dora", [False, True])
def test_compiled_qlora_model_with_triton_kernels_matches_eager(dora):
    """torch.compile (inductor, fullgraph) of an NF4 + LoRA/DoRA model on the GPU, where the NF4 and DoRA
    Triton kernels run: same loss and adapter gradients as eager, within bf16 rounding."""
    from conftest import make_tiny_llama

    from alignlab.adapters import LoRAConfig, adapter_layers, inject
    from alignlab.quant import quantize_model

    model = quantize_model(make_tiny_llama(hidden_size=64).cuda(), compute_dtype=torch.bfloat16)
    inject(model, LoRAConfig(r=4, alpha=8, use_dora=dora))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            w = layer.lora_B["default"].weight
            w.copy_(0.1 * torch.randn(w.shape, generator=g))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1)).cuda()

    def loss_and_grads(m):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_ref, grads_ref = loss_and_grads(model)
    loss, grads = loss_and_grads(torch.compile(model, fullgraph=True))
    torch.testing.assert_close(loss, loss_ref, rtol=2e-2, atol=2e-2)
    assert grads.keys() == grads_ref.keys() and grads
    for k, ref in grads_ref.items():
        rel = ((grads[k].float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
        assert rel < 5e-2, (k, rel)


@pytest.mark.parametrize("dora", [False, True])
def test_merged_nf4_weight_is_as_accurate_as_the_unmerged_path_and_peft_style_autocast(dora, monkeypatch):
    """At training shapes the NF4 + LoRA/DoRA layer dequantizes ``g ⊙ W + s·B A`` in one pass and runs one
    GEMM. Against a float64 oracle, its output and gradients (x, A, B, m) are as accurate as the unmerged
    path (base GEMM + adapter GEMM epilogue) and as PEFT's recipe under bf16 autocast, written out here:
    ``bf16(x Wᵀ) + s·bf16(bf16(x Aᵀ) Bᵀ)``."""
    import alignlab.adapters.fused as fused
    from alignlab.quant import NF4Linear
    from alignlab.quant.nf4 import nf4_dequantize

    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(1024, 768, bias=False), compute_dtype=torch.bfloat16).cuda()
    layer = (DoRALinear if dora else LoRALinear)(base, r=16, alpha=32)  # fp32 masters (the default)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.05)
    x0 = torch.randn(2, 300, 1024, device="cuda").bfloat16()
    gy = torch.randn(2, 300, 768, device="cuda").bfloat16()
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    if dora:
        params.append(layer.lora_magnitude_vector["default"])

    def run(merge):
        monkeypatch.setattr(fused, "MERGE_LORA", merge)
        x = x0.clone().requires_grad_()
        y = layer(x)
        grads = torch.autograd.grad(y, [x, *params], gy)
        return [y.detach(), *grads]

    w = nf4_dequantize(base.quant_weight, torch.float32).double()
    leaves = [x0.double().requires_grad_()] + [p.detach().double().requires_grad_() for p in params]
    v = w + layer.scaling["default"] * leaves[2] @ leaves[1]
    if dora:
        v = leaves[3][:, None] * v / v.norm(dim=1, keepdim=True).detach()
    ref_y = leaves[0] @ v.T
    ref = [ref_y.detach(), *torch.autograd.grad(ref_y, leaves, gy.double())]

    def rel(got, want):
        return ((got.double() - want).norm() / want.norm()).item()

    merged, unmerged = run(True), run(False)
    errs_m = [rel(g, r) for g, r in zip(merged, ref)]
    errs_u = [rel(g, r) for g, r in zip(unmerged, ref)]
    if not dora:  # PEFT under autocast, forward
        a16, b16 = params[0].bfloat16(), params[1].bfloat16()
        w16 = nf4_dequantize(base.quant_weight, torch.bfloat16)
        peft_y = x0 @ w16.T + layer.scaling["default"] * ((x0 @ a16.T) @ b16.T)
        assert errs_m[0] <= 1.25 * rel(peft_y, ref[0]) + 1e-4, (errs_m[0], rel(peft_y, ref[0]))
    for name, em, eu in zip(["y", "x", "A", "B", "m"], errs_m, errs_u):
        assert em <= 1.25 * eu + 1e-4, (name, em, eu)
