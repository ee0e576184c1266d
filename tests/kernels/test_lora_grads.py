"""rank_grads: LoRA's s·dy B and dyᵀ xa from one read of dy, against the two products in float64; and the fused
LoRA / DoRA layers with it switched on (fused.DY_PASS)."""

import pytest
import torch
from torch import nn

from alignlab.kernels.lora_grads import rank_grads, rank_grads_reference

pytest.importorskip("triton")


def _inputs(T, O, R, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(t.to(dtype).to(device) for t in (torch.randn(T, O, generator=g), torch.randn(O, R, generator=g) / 4,
                                                   torch.randn(T, R, generator=g) / 4))


# (T, O, R): partial row and column tiles, one row, r below / at / above one tile of 16, more column blocks than rows
SHAPES = [(37, 70, 3), (1, 16, 1), (64, 48, 16), (20, 130, 20), (5, 33, 64)]


@pytest.mark.parametrize("T,O,R", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_rank_grads_interpreter(T, O, R, dtype, splits, triton_mode, kernel_device):
    g, b, xa = _inputs(T, O, R, dtype, kernel_device, seed=T + O)
    gb, db = rank_grads(g, b, xa, 0.5, torch.float32, splits=splits)
    assert gb.dtype == dtype and gb.shape == (T, R) and db.dtype == torch.float32 and db.shape == (O, R)
    g64, b64, xa64 = (t.double().cpu() for t in (g, b, xa))
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(gb.cpu().double(), 0.5 * g64 @ b64, rtol=tol, atol=tol)
    torch.testing.assert_close(db.cpu().double(), g64.T @ xa64, rtol=1e-5, atol=1e-5 * max(1, T) ** 0.5)
    ref_gb, ref_db = rank_grads_reference(g, b, xa, 0.5, torch.float32)
    torch.testing.assert_close(gb, ref_gb, rtol=tol, atol=tol)
    torch.testing.assert_close(db, ref_db, rtol=1e-5, atol=1e-4)


def test_rank_grads_strided_empty_and_errors(triton_mode, kernel_device):
    g, b, xa = _inputs(30, 40, 4, torch.float32, kernel_device)
    wide = torch.zeros(30, 50, device=kernel_device)
    wide[:, 3:43] = g
    got = rank_grads(wide[:, 3:43], b, xa, 2.0, torch.float32)  # a column slice: rows 50 apart
    want = rank_grads(g, b, xa, 2.0, torch.float32)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    gb, db = rank_grads(g[:0], b, xa[:0], 2.0, torch.float32)  # no rows: dB is zero
    assert gb.shape == (0, 4) and torch.equal(db, torch.zeros(40, 4, device=kernel_device))
    with pytest.raises(ValueError, match="xa"):
        rank_grads(g, b, xa[:, :3], 2.0, torch.float32)
    with pytest.raises(TypeError, match="share"):
        rank_grads(g, b.half(), xa, 2.0, torch.float32)
    for bad in (torch.int64, torch.bool, "float32"):  # an int64 dB came back truncated, silently
        with pytest.raises(TypeError, match="b_dtype must be a floating-point torch.dtype"):
            rank_grads(g, b, xa, 2.0, bad)
    with pytest.raises(ValueError, match="r <= 64"):
        rank_grads(torch.zeros(2, 3), torch.zeros(3, 65), torch.zeros(2, 65), 1.0, torch.float32)
    for bad in ({"block_o": 24}, {"block_t": 0}, {"splits": True}, {"splits": 0}, {"num_warps": 0},
                {"num_stages": 2.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            rank_grads(g, b, xa, 2.0, torch.float32, **bad)


@pytest.mark.parametrize("R", [1, 8, 16, 20])
def test_rank_grads_results_are_contiguous(R, triton_mode, kernel_device):
    """Both results are dense (r, not the kernel's padded width, apart), in fp32 too (no cast copies them there):
    the backward custom ops declare contiguous gradients, and Inductor checks the strides."""
    g, b, xa = _inputs(9, 20, R, torch.float32, kernel_device)
    gb, db = rank_grads(g, b, xa, 1.0, torch.float32)
    assert gb.is_contiguous() and db.is_contiguous()


@pytest.mark.parametrize("dora", [False, True])
def test_an_fp64_layer_with_the_dy_pass_on_keeps_the_gemms(dora, triton_mode, kernel_device, monkeypatch):
    from alignlab.adapters import LoRALinear, fused

    monkeypatch.setattr(fused, "DY_PASS", True)
    monkeypatch.setattr(fused, "DY_PASS_MIN_ROWS", 1)
    monkeypatch.setattr(fused, "DY_PASS_MIN_COLS", 1)
    layer = LoRALinear(nn.Linear(40, 30).double().requires_grad_(False).to(kernel_device), r=4, alpha=8,
                       use_dora=dora)
    x = torch.randn(7, 40, dtype=torch.float64, device=kernel_device, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.lora_B["default"].weight.grad is not None


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("nf4", [False, True])
def test_fused_layers_with_the_dy_pass_match_the_two_gemms(dora, nf4, triton_mode, kernel_device, monkeypatch):
    """fused.DY_PASS on: the LoRA / DoRA layer's gradients equal those of the default two GEMMs to fp32 summation
    order (fp32 compute, so the interpreter's products are exact enough to compare)."""
    from alignlab.adapters import LoRALinear, fused
    from alignlab.quant.linear import NF4Linear

    torch.manual_seed(0)
    base = nn.Linear(64, 40, bias=True)
    if nf4:
        base = NF4Linear.from_linear(base, blocksize=32, compute_dtype=torch.float32)
    layer = LoRALinear(base.to(kernel_device), r=4, alpha=8, use_dora=dora)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)
    x = torch.randn(3, 11, 64, device=kernel_device, requires_grad=True)
    params = [x, *(p for p in layer.parameters() if p.requires_grad)]
    grads = []
    monkeypatch.setattr(fused, "DY_PASS_MIN_ROWS", 1)
    monkeypatch.setattr(fused, "DY_PASS_MIN_COLS", 1)
    for on in (False, True):
        monkeypatch.setattr(fused, "DY_PASS", on)
        y = layer(x)
        grads.append(torch.autograd.grad(y.square().sum(), params))
    for got, want in zip(grads[1], grads[0]):
        scale = want.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(got / scale, want / scale, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dora", [False, True])
def test_the_dy_pass_applies_from_its_row_and_column_bounds(dora, triton_mode, kernel_device, monkeypatch):
    """With DY_PASS on (the default), rank_grads takes a layer's backward only from DY_PASS_MIN_ROWS rows and
    DY_PASS_MIN_COLS output columns (below them the two GEMMs won on the H100); the bounds shrunk here so that small
    layers reach them."""
    from alignlab.adapters import LoRALinear, fused
    from alignlab.kernels import lora_grads

    monkeypatch.setattr(fused, "DY_PASS", True)
    calls = []
    real = lora_grads.rank_grads
    monkeypatch.setattr(lora_grads, "rank_grads", lambda g, *a, **k: calls.append(tuple(g.shape)) or real(g, *a, **k))
    monkeypatch.setattr(fused, "DY_PASS_MIN_ROWS", 12)
    monkeypatch.setattr(fused, "DY_PASS_MIN_COLS", 32)
    for out_features, rows, used in ((40, 12, True), (40, 11, False), (31, 12, False)):
        layer = LoRALinear(nn.Linear(24, out_features).to(kernel_device), r=4, alpha=8, use_dora=dora)
        x = torch.randn(rows, 24, device=kernel_device, requires_grad=True)
        calls.clear()
        layer(x).square().sum().backward()
        assert bool(calls) == used, (out_features, rows, calls)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rank_grads_cuda(dtype):
    g, b, xa = _inputs(4100, 1030, 16, dtype, "cuda", seed=3)
    gb, db = rank_grads(g, b, xa, 2.0, torch.float32)
    ref_gb, ref_db = rank_grads_reference(g, b, xa, 2.0, torch.float32)
    torch.testing.assert_close(gb.float(), ref_gb.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(db, ref_db, rtol=1e-3, atol=1e-2)
