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
# the layers as the custom ops (fused.lora_linear_op); as plain ops; LoRA's at decode rows (48 here) as the op again
@pytest.mark.parametrize("min_rows, decode_op", [(1, True), (4096, False), (4096, True)])
def test_compiled_qlora_model_with_triton_kernels_matches_eager(dora, min_rows, decode_op, monkeypatch):
    """torch.compile (inductor, fullgraph) of an NF4 + LoRA/DoRA model on the GPU, where the NF4 and DoRA
    Triton kernels run: same loss and adapter gradients as eager, within bf16 rounding."""
    from conftest import make_tiny_llama

    from alignlab.adapters import LoRAConfig, adapter_layers, fused, inject
    from alignlab.quant import quantize_model

    monkeypatch.setattr(fused, "OP_MIN_ROWS", min_rows)
    monkeypatch.setattr(fused, "DECODE_OP", decode_op)

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
    try:
        loss, grads = loss_and_grads(torch.compile(model, fullgraph=True))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(loss, loss_ref, rtol=2e-2, atol=2e-2)
    assert grads.keys() == grads_ref.keys() and grads
    for k, ref in grads_ref.items():
        rel = ((grads[k].float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
        assert rel < 5e-2, (k, rel)


@pytest.mark.parametrize("rows", [1, 5, 16, 33, 64])
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_qlora_decode_rows_run_the_decode_kernels_with_the_eager_bits(rows, mode):
    """A QLoRA layer compiled by Inductor at decode rows (generation with a static cache: transformers compiles the
    decode step with ``reduce-overhead``) runs the eager decode product inside ``alignlab::lora_forward``: the decode
    down kernel launches, and outputs (no grad; with grad under ``default``, and the gradients) are the eager layer's
    bits. fp32 master factors, bf16 compute."""
    from alignlab.quant import NF4Linear

    torch.manual_seed(rows)
    base = NF4Linear.from_linear(nn.Linear(512, 384, device="cuda", dtype=torch.bfloat16),
                                 compute_dtype=torch.bfloat16)
    layer = LoRALinear(base, r=16, alpha=32)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.05)
    x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = layer(x).clone()
    compiled = torch.compile(layer, fullgraph=True, mode=mode)
    try:
        with torch.no_grad():
            for _ in range(3):  # reduce-overhead records its CUDA graph on a later call than the first
                torch.testing.assert_close(compiled(x), want, rtol=0, atol=0)
            names = _kernels(lambda: compiled(x))
        assert any("lora_down" in n for n in names), names
        if mode == "default":
            params = [p for p in layer.parameters() if p.requires_grad]
            results = []
            for fn in (layer, compiled):
                xg = x.clone().requires_grad_(True)
                y = fn(xg)
                results.append((y.detach(), torch.autograd.grad(y.float().square().sum(), [xg, *params])))
            torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
            for got, ref in zip(results[1][1], results[0][1]):
                torch.testing.assert_close(got, ref, rtol=0, atol=0)
    finally:
        torch._dynamo.reset()


def _kernels(fn) -> list:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA"]


def test_qlora_layer_launch_counts():
    """Kernel launches of one QLoRA layer call at a training size (fp32 masters, bf16 compute): forward = one
    cast of both factors, s·x Aᵀ, the dequantization, the base GEMM, the adapter epilogue (5); backward = s·dy B,
    the dequantization, dy W, its adapter epilogue, ∂L/∂A, ∂L/∂B (6). Host time per launch is what eager
    small-batch steps pay, so a new launch here should be a decision, not an accident."""
    from alignlab.quant.linear import NF4Linear

    torch.manual_seed(0)
    layer = LoRALinear(NF4Linear.from_linear(nn.Linear(256, 192, bias=False, device="cuda", dtype=torch.bfloat16)),
                       r=8, alpha=16)
    # 128 rows: above every device's small-M bound (64 on the H100 since its table), so dequantize + GEMM
    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fwd = _kernels(lambda: layer(x))
    assert len(fwd) == 5, fwd
    y = layer(x)
    gy = torch.randn_like(y)
    leaves = (x, *[p for p in layer.parameters() if p.requires_grad])
    bwd = _kernels(lambda: torch.autograd.grad(y, leaves, gy, retain_graph=True))
    assert len(bwd) == 6, bwd


def test_qdora_layer_launch_counts():
    """The same count for a QDoRA layer: forward = the factor cast, the row norm with the per-row factors (g, s·g,
    s·g ⊙ B) written by the same kernel, x Aᵀ, the scaled dequantization, the base GEMM, the epilogue (6); with
    ``cache_casts`` (norm kept, factors made from it) one more (7); backward = dy (s·g B),
    the scaled dequantization, dy W, its epilogue, ∂L/∂A, ∂L/∂B and its row scaling, ∂L/∂m (8)."""
    from alignlab.quant.linear import NF4Linear

    torch.manual_seed(0)
    layer = LoRALinear(NF4Linear.from_linear(nn.Linear(256, 192, bias=False, device="cuda", dtype=torch.bfloat16)),
                       r=8, alpha=16, use_dora=True)
    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fwd = _kernels(lambda: layer(x))
    assert len(fwd) == 6, fwd
    layer.cache_casts = True
    layer(x)  # fills the caches; A and B unchanged, so the next call reuses the casts and the norm
    assert len(_kernels(lambda: layer(x))) == 5  # no cast, no norm; the factors kernel, x Aᵀ, dequant, GEMM, epilogue
    layer.cache_casts = False
    y = layer(x)
    gy = torch.randn_like(y)
    leaves = (x, *[p for p in layer.parameters() if p.requires_grad])
    bwd = _kernels(lambda: torch.autograd.grad(y, leaves, gy, retain_graph=True))
    assert len(bwd) == 8, bwd
