"""Fused NF4 matmul (forward y = x W^T + b, backward dx = dy W) vs a float64 reference."""

import pytest
import torch

from alignlab.kernels import nf4_matmul as mm
from alignlab.kernels.nf4_matmul import nf4_matmul, nf4_matmul_t
from alignlab.quant.nf4 import nf4_dequantize, nf4_quantize

pytest.importorskip("triton")


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp(min=1e-30)).item()


def _case(N, K, M, dtype, double_quant=True, blocksize=32, seed=0, device="cpu", icq=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.1
    t = nf4_quantize(w.to(device), blocksize=blocksize, double_quant=double_quant,
                     calibrate="icq" if icq else None, icq_steps=4)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    dy = torch.randn(M, N, generator=g).to(device, dtype)
    b = torch.randn(N, generator=g).to(device, dtype)
    wd = nf4_dequantize(t, torch.float32).double()
    return t, x, dy, b, wd


# (N, K, M): odd N, K not a multiple of the tile, M=1, M between tiles, M past LARGE_M (dequant path)
SHAPES = [(40, 64, 1), (37, 128, 1), (21, 256, 2), (33, 70, 5), (17, 96, 16), (24, 64, 7), (24, 62, 20), (9, 34, 3),
          (8, 64, 130)]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,K,M", SHAPES)
def test_matmul_interpreter(N, K, M, dtype, fused, triton_mode, monkeypatch):
    """Small-M kernels (M <= 16) / dequant + matmul, and the fused tl.dot kernels."""
    if fused:
        monkeypatch.setattr(mm, "LARGE_M", 1 << 30)
        monkeypatch.setattr(mm, "USE_SMALL", False)
    t, x, dy, b, wd = _case(N, K, M, dtype, double_quant=(N % 2 == 0))
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    y = nf4_matmul(x, t, b)
    assert y.shape == (M, N) and y.dtype == dtype
    assert _rel(y, x.double() @ wd.T + b.double()) < tol
    dx = nf4_matmul_t(dy, t)
    assert dx.shape == (M, K) and dx.dtype == dtype
    assert _rel(dx, dy.double() @ wd) < tol


@pytest.mark.parametrize("M", [1, 5, 20])
def test_fused_kernels_with_bf16_rows(M, triton_mode, kernel_device, monkeypatch):
    """ALIGNLAB_NF4_LARGE_M's fused tl.dot kernels in bf16: under the interpreter, whose bf16 tl.dot reads raw bits,
    they gave products off by ~1e10; there bf16 takes the dequantization + matmul, on the GPU the kernels."""
    monkeypatch.setattr(mm, "LARGE_M", 1 << 30)
    monkeypatch.setattr(mm, "USE_SMALL", False)
    t, x, dy, b, wd = _case(24, 64, M, torch.bfloat16, device=kernel_device)
    assert _rel(nf4_matmul(x, t, b).cpu(), x.cpu().double() @ wd.T.cpu() + b.cpu().double()) < 1e-2
    assert _rel(nf4_matmul_t(dy, t).cpu(), dy.cpu().double() @ wd.cpu()) < 1e-2


@pytest.mark.parametrize("fused", [False, True])
def test_matmul_interpreter_odd_k_icq_and_batch_dims(fused, triton_mode, monkeypatch):
    if fused:
        monkeypatch.setattr(mm, "LARGE_M", 1 << 30)
        monkeypatch.setattr(mm, "USE_SMALL", False)
    t, x, dy, b, wd = _case(12, 33, 4, torch.float32, icq=True)
    y = nf4_matmul(x.reshape(2, 2, 33), t)
    assert y.shape == (2, 2, 12)
    assert _rel(y.reshape(4, 12), x.double() @ wd.T) < 1e-5
    t, x, dy, b, wd = _case(16, 64, 3, torch.float32, icq=True)
    assert _rel(nf4_matmul(x, t), x.double() @ wd.T) < 1e-5
    assert _rel(nf4_matmul(x[:1], t), x[:1].double() @ wd.T) < 1e-5  # M = 1 kernel + shift
    assert _rel(nf4_matmul_t(dy, t), dy.double() @ wd) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty_batch(triton_mode, kernel_device, dtype):
    """No rows: the right shapes, through autograd too (x's gradient empty, a bias's zero), 2-D and 3-D."""
    t, x, dy, b, wd = _case(16, 32, 1, dtype, device=kernel_device)
    assert nf4_matmul(x[:0], t).shape == (0, 16)
    assert nf4_matmul_t(dy[:0], t).shape == (0, 32)
    x0 = torch.zeros(2, 0, 32, dtype=dtype, device=kernel_device, requires_grad=True)
    bias = b.clone().requires_grad_()
    y = nf4_matmul(x0, t, bias)
    assert y.shape == (2, 0, 16) and y.dtype == dtype
    y.sum().backward()
    assert x0.grad.shape == (2, 0, 32)
    torch.testing.assert_close(bias.grad, torch.zeros_like(bias), rtol=0, atol=0)


def test_errors():
    t = nf4_quantize(torch.randn(16, 32))
    with pytest.raises(ValueError, match="x.shape"):
        nf4_matmul(torch.randn(2, 16), t)
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        nf4_matmul(torch.randn(2, 32, dtype=torch.float64), t)
    with pytest.raises(TypeError, match="NF4Tensor"):
        nf4_matmul(torch.randn(2, 32), torch.randn(16, 32))
    with pytest.raises(ValueError, match="2-D"):
        nf4_matmul(torch.randn(2, 32), nf4_quantize(torch.randn(2, 16, 32)))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("M", [1, 3, 16, 20])
def test_gradients_reach_x_and_bias_at_every_row_count(M, fused, kernel_mode, monkeypatch):
    """The small-M kernels (M <= 16 on the Triton path) and the fused kernels returned a tensor without a
    grad_fn while the dequantize + matmul path (M > 16, and the torch path) was differentiable: the gradient of
    x and bias was dropped at decode-sized batches, silently when another term also depended on them. Now
    first and second derivatives match the float64 product on every path."""
    if fused:
        monkeypatch.setattr(mm, "LARGE_M", 1 << 30)
    t, x, dy, b, wd = _case(24, 64, M, torch.float32)
    x, b = x.requires_grad_(), b.half().requires_grad_()  # a bias in another dtype gets its own dtype back
    y = nf4_matmul(x, t, b)
    gx, gb = torch.autograd.grad(y, (x, b), dy, create_graph=True)
    assert gb.dtype == torch.float16
    torch.testing.assert_close(gx.double(), dy.double() @ wd, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb.double(), dy.double().sum(0), rtol=1e-3, atol=1e-3)
    # d/dx of sum(gx ** 2) with gx = (x W^T + b) W through a second nf4_matmul: 2 (y W) W^T W ... with y fixed
    # dy = 2 y: the second derivative runs through nf4_matmul_t's backward too
    x2 = x.detach().requires_grad_()
    g1, = torch.autograd.grad((nf4_matmul(x2, t) ** 2).sum(), x2, create_graph=True)
    g2, = torch.autograd.grad(g1.sum(), x2)
    torch.testing.assert_close(g2.double(), (2 * wd.sum(1) @ wd).expand(M, -1), rtol=1e-4, atol=1e-4)
    no_grad_y = nf4_matmul(x.detach(), t)
    assert no_grad_y.grad_fn is None  # nothing to differentiate: the plain kernels, no autograd node


def test_bias_must_be_a_tensor_on_x_device():
    t = nf4_quantize(torch.randn(16, 32))
    with pytest.raises(TypeError, match="bias"):
        nf4_matmul(torch.randn(2, 32), t, [0.0] * 16)
    with pytest.raises(ValueError, match="bias must be on x's device"):
        nf4_matmul(torch.randn(2, 32), t, torch.zeros(16, device="meta"))


@pytest.mark.parametrize("grad", [False, True])
def test_weight_must_be_on_x_device(grad):
    """A weight on another device than the input is an error naming both (a meta weight and a CPU input gave
    uninitialised memory, no error), through NF4Linear without a bias too; both on meta still give shapes."""
    from torch import nn

    from alignlab.kernels.nf4_matmul import nf4_matmul_t
    from alignlab.quant import NF4Linear

    t = nf4_quantize(torch.randn(16, 32)).to("meta")
    x = torch.randn(2, 32, requires_grad=grad)
    with pytest.raises(ValueError, match="weight must be on x's device cpu, got meta"):
        nf4_matmul(x, t)
    with pytest.raises(ValueError, match="weight must be on dy's device cpu, got meta"):
        nf4_matmul_t(torch.randn(2, 16), t)
    layer = NF4Linear.from_linear(nn.Linear(32, 16, bias=False, device="meta"))
    with pytest.raises(ValueError, match="weight must be on x's device cpu, got meta"):
        layer(x)
    assert layer(torch.randn(3, 32, device="meta")).shape == (3, 16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,M", [(4096, 4096, 1), (1000, 334, 1), (1000, 334, 7), (4096, 1024, 16),
                                   (333, 512, 17), (4096, 4096, 100), (1024, 4096, 300), (3000, 1002, 16)])
def test_matmul_cuda(N, K, M, dtype):
    t, x, dy, b, wd = _case(N, K, M, dtype, blocksize=64, device="cuda")
    y = nf4_matmul(x, t, b)
    assert _rel(y, x.double() @ wd.T + b.double()) < 1e-2
    dx = nf4_matmul_t(dy, t)
    assert _rel(dx, dy.double() @ wd) < 1e-2


@pytest.mark.cuda
def test_fused_kernel_on_large_m_cuda(monkeypatch):
    """The fused kernel itself at training shapes (dispatch normally sends these to cuBLAS)."""
    monkeypatch.setattr(mm, "LARGE_M", 1 << 30)
    t, x, dy, b, wd = _case(2048, 1024, 1000, torch.bfloat16, blocksize=64, device="cuda")
    assert _rel(nf4_matmul(x, t, b), x.double() @ wd.T + b.double()) < 1e-2
    assert _rel(nf4_matmul_t(dy, t), dy.double() @ wd) < 1e-2


def test_dequant_tile_kernel(triton_mode, kernel_device):
    """The slice dequantizer used by the pipelined large-M path."""
    t, x, dy, b, wd = _case(37, 70, 1, torch.float32, blocksize=32, device=kernel_device)
    wd = wd.cpu()
    out = torch.full((10, 20), float("nan"), device=kernel_device)
    mm._dequant_tile(t, 5, 24, out[:9, :16])
    out = out.cpu()
    # on the GPU d[a] * t + mu may be one FMA: allow the last bit of the fp32 scale
    torch.testing.assert_close(out[:9, :16].double(), wd[5:14, 24:40], rtol=3e-7, atol=0)
    assert out[9:].isnan().all() and out[:, 16:].isnan().all()


@pytest.mark.cuda
@pytest.mark.parametrize("chunks", [2, 3])
def test_pipelined_large_m_cuda(chunks, monkeypatch):
    monkeypatch.setattr(mm, "PIPELINE_CHUNKS", chunks)
    t, x, dy, b, wd = _case(1000, 1026, 300, torch.bfloat16, blocksize=64, device="cuda")
    assert _rel(nf4_matmul(x, t, b), x.double() @ wd.T + b.double()) < 1e-2
    assert _rel(nf4_matmul_t(dy, t), dy.double() @ wd) < 1e-2
