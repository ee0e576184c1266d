"""Odd shapes at the kernels' launchers, Triton (interpreter on CPU) against the PyTorch reference: a weight
without input columns, empty output columns or rank, one row, rows that sit inside a wider buffer."""

import pytest
import torch

pytest.importorskip("triton")

from alignlab.kernels.distill import distill_rows  # noqa: E402
from alignlab.kernels.dora import (  # noqa: E402
    column_dot,
    dora_norm_and_scales,
    dora_row_norm,
    dora_scales,
    magnitude_grad,
)
from alignlab.kernels.lora_grads import rank_grads  # noqa: E402
from alignlab.losses.distill import distill_rows_torch  # noqa: E402


def test_row_norm_of_a_weight_without_input_columns(kernel_mode, kernel_device):
    """``nn.Linear(0, out)``: every row norm ``‖W_i + s·B_i A‖`` is 0 and DoRA's gain is 0 there, as the reference
    gives; the kernel path's split of the (empty) input dimension divided by zero (ZeroDivisionError)."""
    w = torch.zeros(5, 0, device=kernel_device)
    a, b = torch.zeros(2, 0, device=kernel_device), torch.randn(5, 2, device=kernel_device)
    m = torch.rand(5, device=kernel_device) + 0.5
    assert torch.equal(dora_row_norm(w, a, b, 0.5), torch.zeros(5, device=kernel_device))
    norm, g, gs, bgs = dora_norm_and_scales(w, a, b, 0.5, m, b, torch.float16)
    zeros = torch.zeros(5, device=kernel_device)
    assert torch.equal(norm, zeros) and torch.equal(g, zeros)
    assert gs.shape == (5, 1) and bgs.shape == (5, 2) and bgs.dtype == torch.float16 and not bgs.any()


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_row_norm_without_output_rows_or_rank(nf4, triton_mode, kernel_device):
    """A weight without output rows: empty norms and factors of the right shapes; rank 0 (``a (0, in)``,
    ``b (out, 0)``): the norms of ``W`` alone, against float64, dense and NF4 (fp16 factors)."""
    from alignlab.quant.nf4 import nf4_dequantize, nf4_quantize

    def weight(n):
        w = torch.randn(n, 64, generator=torch.Generator().manual_seed(n)).to(kernel_device)
        return (nf4_quantize(w, blocksize=64), None) if nf4 else (w.half(), w.half())

    if not nf4:  # an NF4 weight cannot be empty (nf4_quantize refuses it)
        w, _ = weight(0)
        a, b = torch.randn(2, 64, device=kernel_device).half(), torch.zeros(0, 2, device=kernel_device).half()
        assert dora_row_norm(w, a, b, 0.5).shape == (0,)
        norm, g, gs, bgs = dora_norm_and_scales(w, a, b, 0.5, torch.zeros(0, device=kernel_device), b.float(),
                                                torch.float16)
        assert norm.shape == g.shape == (0,) and gs.shape == (0, 1) and bgs.shape == (0, 2)
    w, dense = weight(37)
    w64 = (nf4_dequantize(w, torch.float32) if nf4 else dense).double()
    a, b = torch.zeros(0, 64, device=kernel_device).half(), torch.zeros(37, 0, device=kernel_device).half()
    torch.testing.assert_close(dora_row_norm(w, a, b, 0.5).double(), w64.norm(dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,O,R", [(3, 0, 2), (3, 4, 0), (1, 1, 1)])
def test_rank_grads_without_output_columns_rank_or_with_one_row(T, O, R, triton_mode, kernel_device):
    g = torch.Generator().manual_seed(T + O + R)
    dy, b, xa = (torch.randn(s, generator=g).to(kernel_device) for s in ((T, O), (O, R), (T, R)))
    gb, db = rank_grads(dy, b, xa, 0.5, torch.float32)
    assert gb.shape == (T, R) and db.shape == (O, R)
    torch.testing.assert_close(gb.cpu().double(), 0.5 * dy.cpu().double() @ b.cpu().double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(db.cpu().double(), dy.cpu().double().T @ xa.cpu().double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T,C", [(3, 0), (1, 1), (1, 40)])
def test_column_reductions_without_columns_or_with_one_row(T, C, triton_mode, kernel_device):
    g = torch.Generator().manual_seed(T + C)
    u, v = (torch.randn(T, C, generator=g).to(kernel_device) for _ in range(2))
    bias, m = torch.randn(C, generator=g).to(kernel_device), (torch.rand(C, generator=g) + 0.5).to(kernel_device)
    u64, v64, bias64, m64 = (t.cpu().double() for t in (u, v, bias, m))
    torch.testing.assert_close(column_dot(u, v).cpu().double(), (u64 * v64).sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(magnitude_grad(u, v, bias, m).cpu().double(), (u64 * (v64 - bias64)).sum(0) / m64,
                               rtol=1e-5, atol=1e-6)
    g_, gs, bgs = dora_scales(m + 0.1, m, torch.zeros(C, 0, device=kernel_device), 0.5, torch.float16)  # rank 0
    assert g_.shape == (C,) and gs.shape == (C, 1) and bgs.shape == (C, 0)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_distill_rows_inside_wider_buffers(kind, kernel_device):
    """Student, teacher and gradient rows that are slices of wider buffers (row strides 100, 90, 120, not the
    vocab 70), a dropped row, and an fp16 gradient of fp32 logits: the reference's values, nothing written
    outside the slice."""
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(3, 100, generator=g) * 3).to(kernel_device)[:, 10:80]
    t = (torch.randn(3, 90, generator=g) * 3).to(kernel_device)[:, 5:75]
    w = torch.rand(3, generator=g).to(kernel_device)
    keep = torch.tensor([True, False, True], device=kernel_device)
    buf = torch.full((3, 120), float("nan"), device=kernel_device)
    loss = distill_rows(s, t, kind, beta=0.4, temperature=0.7, grad_scale=w, grad_out=buf[:, 7:77], keep=keep)
    want_loss, want_dz = distill_rows_torch(s.double().cpu(), t.double().cpu(), kind, 0.4, 0.7, w.double().cpu())
    k = keep.double().cpu()
    torch.testing.assert_close(loss.double().cpu(), want_loss * k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(buf[:, 7:77].double().cpu(), want_dz * k[:, None], rtol=1e-4, atol=1e-6)
    assert buf[:, :7].isnan().all() and buf[:, 77:].isnan().all()
    dz16 = torch.empty(3, 70, dtype=torch.float16, device=kernel_device)
    distill_rows(s, t, kind, beta=0.4, temperature=0.7, grad_scale=w, grad_out=dz16)
    torch.testing.assert_close(dz16.double().cpu(), want_dz, rtol=2e-3, atol=1e-4)
