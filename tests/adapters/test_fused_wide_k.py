"""The fused QLoRA / QDoRA layers with the adapter term inside the NF4 base's GEMM (``fused.WIDE_K``: the reduction
dimension widened by r, forward where in < out, backward where out < in) give the outputs and gradients of the
default form (base GEMM, then the rank-r ``addmm_``), on the PyTorch path and through the Triton dequantization
kernel's strided store (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import printed_in_fresh_process

from alignlab.adapters import LoRALinear
from alignlab.adapters import fused
from alignlab.quant.linear import NF4Linear


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _layer(n_in, n_out, r, dora, bias, dtype):
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(n_in, n_out, bias=bias), blocksize=32, compute_dtype=dtype)
    layer = LoRALinear(base, r=r, alpha=2 * r, use_dora=dora)  # fp32 masters
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.2)
        if bias:
            base.bias.normal_(0, 0.5)
    return layer


def _run(layer, x, gy):
    x = x.detach().requires_grad_()
    ops = _Ops()
    with ops:
        y = layer(x)
        y.backward(gy)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    for p in layer.parameters():
        p.grad = None
    return y.detach(), x.grad, grads, ops.names


@pytest.mark.parametrize("n_in, n_out", [(64, 96), (96, 64)])  # forward widened / backward widened
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_widened_reduction_gives_the_default_numbers(n_in, n_out, dora, bias, kernel_mode, monkeypatch):
    dtype = torch.float32
    layer = _layer(n_in, n_out, 16, dora, bias, dtype)
    x, gy = torch.randn(2, 19, n_in), torch.randn(2, 19, n_out)
    y_ref, dx_ref, g_ref, ops_ref = _run(layer, x, gy)
    monkeypatch.setattr(fused, "WIDE_K", True)
    monkeypatch.setattr(fused, "WIDE_K_MIN_ROWS", 20)  # 38 rows: over the small-M bound and this
    y, dx, grads, ops = _run(layer, x, gy)
    assert ops_ref.count("cat") == 0 and ops.count("cat") == 1  # one pass widened: forward or backward
    assert ops.count("addmm_") == ops_ref.count("addmm_") - 1
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == g_ref.keys() and len(grads) == (3 if dora else 2)
    for k in grads:
        torch.testing.assert_close(grads[k], g_ref[k], rtol=1e-5, atol=1e-5, msg=k)


def test_widened_forward_in_half_precision_matches_float64(kernel_mode, monkeypatch):
    """fp16 compute (fp32 masters): the widened GEMM rounds once where the default rounds twice; both within fp16
    rounding of the float64 formula over the dequantized weight."""
    layer = _layer(64, 96, 16, False, True, torch.float16)
    x = torch.randn(40, 64).to(torch.float16)
    monkeypatch.setattr(fused, "WIDE_K", True)
    monkeypatch.setattr(fused, "WIDE_K_MIN_ROWS", 20)
    with torch.no_grad():
        y = layer(x)
        w = layer.base_layer.weight.double()  # the dequantized NF4 weight
        a, b = layer.lora_A["default"].weight.half().double(), layer.lora_B["default"].weight.half().double()
        ref = x.double() @ w.T + layer.base_layer.bias.double() + layer.scaling["default"] * (x.double() @ a.T) @ b.T
    torch.testing.assert_close(y.double(), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("r, rows, on", [(8, 40, True), (16, 10, True), (16, 40, False)])
def test_widening_only_where_it_applies(r, rows, on, torch_mode, monkeypatch):
    """Not for a rank that would leave the widened rows' stride unaligned (r % 16), below the row threshold, or off."""
    layer = _layer(64, 96, r, False, False, torch.float32)
    monkeypatch.setattr(fused, "WIDE_K", on)
    monkeypatch.setattr(fused, "WIDE_K_MIN_ROWS", 20)
    assert "cat" not in _run(layer, torch.randn(rows, 64), torch.randn(rows, 96))[3]


@pytest.mark.cuda
@pytest.mark.parametrize("n_in, n_out", [(256, 768), (768, 256)])
@pytest.mark.parametrize("dora", [False, True])
def test_widened_reduction_on_the_gpu_in_bf16(n_in, n_out, dora, monkeypatch):
    """bf16 compute, fp32 masters, the Triton dequantization's strided store on the GPU: outputs and gradients
    within bf16 rounding of the default form (the widened GEMM rounds the adapter term once, not twice)."""
    layer = _layer(n_in, n_out, 16, dora, True, torch.bfloat16).cuda()
    x, gy = torch.randn(3, 100, n_in, device="cuda", dtype=torch.bfloat16), torch.randn(3, 100, n_out, device="cuda",
                                                                                     dtype=torch.bfloat16)
    y_ref, dx_ref, g_ref, _ = _run(layer, x, gy)
    monkeypatch.setattr(fused, "WIDE_K", True)
    monkeypatch.setattr(fused, "WIDE_K_MIN_ROWS", 64)
    y, dx, grads, ops = _run(layer, x, gy)
    assert ops.count("cat") == 1
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx, dx_ref, rtol=2e-2, atol=2e-2)
    for k in grads:
        scale = g_ref[k].abs().max()
        torch.testing.assert_close(grads[k] / scale, g_ref[k] / scale, rtol=2e-2, atol=2e-2, msg=k)


@pytest.mark.parametrize("env, on", [(None, True), ("0", False), ("1", True)])
def test_on_by_default_and_switched_off_by_the_environment(env, on):
    """On by default (it won at batch 4 on the GPU, see benchmarks/RESULTS.md); ``ALIGNLAB_LORA_WIDE_K=0`` turns it off
    for the process, read once at import."""
    out = printed_in_fresh_process("__import__('alignlab.adapters.fused').adapters.fused.WIDE_K",
                                   {"ALIGNLAB_LORA_WIDE_K": env})
    assert out == str(on)


@pytest.mark.parametrize("n_in, n_out", [(64, 96), (96, 64)])
@pytest.mark.parametrize("x_grad", [True, False])
def test_the_default_threshold_with_model_shaped_inputs(n_in, n_out, x_grad, kernel_mode, monkeypatch):
    """At the real row threshold (no patched bound), with a (batch, seq, features) input that is a non-contiguous
    view, and with only the factors needing gradients (the first adapted layer of a frozen model): the same outputs
    and gradients as with the form off."""
    layer = _layer(n_in, n_out, 16, False, True, torch.float32)
    rows = fused.WIDE_K_MIN_ROWS
    x_full = torch.randn(n_in, rows // 2, 2).permute(2, 1, 0)  # (2, rows / 2, n_in), not contiguous
    gy = torch.randn(2, rows // 2, n_out)
    results = []
    for on in (False, True):
        monkeypatch.setattr(fused, "WIDE_K", on)
        x = x_full.detach().requires_grad_(x_grad)
        ops = _Ops()
        with ops:
            y = layer(x)
            y.backward(gy)
        assert ops.names.count("cat") == (1 if on and (n_in < n_out or x_grad) else 0)
        results.append((y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()
                                             if p.grad is not None}))
        layer.zero_grad(set_to_none=True)
    (y0, dx0, g0), (y1, dx1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-4)
    if x_grad:
        torch.testing.assert_close(dx1, dx0, rtol=1e-5, atol=1e-4)
    else:
        assert dx0 is None and dx1 is None
    assert g1.keys() == g0.keys() and len(g1) == 2
    for k in g1:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-4, msg=k)
