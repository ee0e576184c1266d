"""Triton NF4 dequantization vs the PyTorch reference (interpreter on CPU, bf16 on the GPU)."""

import pytest
import torch

from alignlab.kernels.nf4_dequant import nf4_dequant
from alignlab.quant.nf4 import nf4_code, nf4_dequantize, nf4_quantize

pytest.importorskip("triton")


def _formula(t):
    """q[c_i] * s_{i // blocksize}, computed from the packed bytes without alignlab's dequantizer."""
    n = t.numel
    data = t.data.long().cpu()
    codes = torch.stack([data >> 4, data & 15], 1).reshape(-1)[:n]
    if t.double_quant:
        from alignlab.quant.nf4 import dynamic_map

        nested = t.nested_absmax.cpu().repeat_interleave(256)[: t.num_blocks]
        s = dynamic_map()[t.absmax.long().cpu()] * nested + t.nested_offset.cpu()
    else:
        s = t.absmax.cpu()
    out = nf4_code()[codes] * s[torch.arange(n) // t.blocksize]
    if t.shift is not None:
        out = out + t.shift.cpu()[torch.arange(n) // t.blocksize]
    return out.reshape(t.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,blocksize", [((7, 13), 32), ((33, 64), 64), ((1, 1), 32), ((5, 300), 128),
                                             ((3, 2, 100), 256)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequant_interpreter(dtype, shape, blocksize, double_quant, triton_mode):
    g = torch.Generator().manual_seed(0)
    t = nf4_quantize(torch.randn(*shape, generator=g), blocksize=blocksize, double_quant=double_quant)
    out = nf4_dequant(t, dtype)
    assert out.shape == shape and out.dtype == dtype
    assert torch.equal(out, nf4_dequantize(t, dtype))
    assert torch.equal(out, _formula(t).to(dtype))


def test_dequant_interpreter_icq_shift(triton_mode):
    g = torch.Generator().manual_seed(1)
    t = nf4_quantize(torch.randn(6, 64, generator=g) + 0.3, blocksize=32, calibrate="icq", icq_steps=5)
    assert torch.equal(nf4_dequant(t, torch.float32), _formula(t))


def test_bad_dtype():
    t = nf4_quantize(torch.randn(4, 64))
    with pytest.raises(TypeError, match="dtype"):
        nf4_dequant(t, torch.int8)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequant_cuda(dtype, double_quant):
    g = torch.Generator().manual_seed(2)
    for shape, bs in [((4096, 4096), 64), ((1000, 333), 64), ((257, 1024), 4096), ((3, 5), 32)]:
        w = torch.randn(*shape, generator=g).cuda()
        t = nf4_quantize(w, blocksize=bs, double_quant=double_quant)
        out = nf4_dequant(t, dtype)
        torch.cuda.synchronize()
        if not double_quant:
            assert torch.equal(out, nf4_dequantize(t, dtype))
            assert torch.equal(out.cpu(), _formula(t.to("cpu")).to(dtype))
        else:
            # the GPU may fuse d[a] * t + mu into one FMA (one rounding instead of two): allow the
            # last bit of the fp32 scale, i.e. at most one unit in the last place of the output
            ulp = {torch.float32: 3e-7, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
            torch.testing.assert_close(out.float(), nf4_dequantize(t, dtype).float(), rtol=ulp, atol=1e-30)


@pytest.mark.parametrize("shape", [(7, 13), (33, 64), (1, 1), (5, 300)])  # odd columns: a byte spans two rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequant_row_scale_interpreter(shape, dtype, triton_mode, kernel_device):
    """Row ``i`` times ``row_scale[i]`` in fp32, one rounding: equal to the formula scaled and rounded."""
    g = torch.Generator().manual_seed(1)
    t = nf4_quantize(torch.randn(shape, generator=g), blocksize=32).to(kernel_device)
    scale = torch.rand(shape[0], generator=g).add_(0.5).to(kernel_device)
    got = nf4_dequant(t, dtype, scale)
    assert got.dtype == dtype
    # bit-exact against the kernel's own unscaled values times the scale (one fp32 product, one rounding);
    # the formula agrees up to the fused multiply-add of the double-quantized scale on a GPU
    torch.testing.assert_close(got, (nf4_dequant(t, torch.float32) * scale[:, None]).to(dtype), rtol=0, atol=0)
    tol = 1e-6 if dtype == torch.float32 else 1e-3  # an fp16 rounding may flip with the fp32 value's last bit
    torch.testing.assert_close(got.cpu(), (_formula(t) * scale.cpu()[:, None]).to(dtype), rtol=tol, atol=tol)


def test_dequant_row_scale_torch_path_and_errors(torch_mode):
    t = nf4_quantize(torch.randn(6, 40), blocksize=32)
    scale = torch.linspace(0.5, 2, 6)
    torch.testing.assert_close(nf4_dequant(t, torch.float32, scale), _formula(t) * scale[:, None])
    with pytest.raises(ValueError, match="row_scale"):
        nf4_dequant(t, torch.float32, scale[:5])
    with pytest.raises(TypeError, match="row_scale"):
        nf4_dequant(t, torch.float32, scale.double())


@pytest.mark.parametrize("shape,blocksize", [((9, 96), 32), ((5, 100), 64), ((3, 256), 128), ((1, 70), 64)])
@pytest.mark.parametrize("block", [16, 48, 96])  # packed bytes per program: 1..several whole blocks, many programs
def test_dequant_tiles_over_programs(shape, blocksize, block, triton_mode, kernel_device):
    """Several programs, a partial last quantization block, blocks crossing rows (row scale per value) and
    rows holding whole blocks (row scale per block): the same values as the formula, plain and row-scaled
    (on CPU under the interpreter, and on the GPU; single quantization, so no fused multiply-add to allow for)."""
    from alignlab.kernels.nf4_dequant import _launch_dequant

    g = torch.Generator().manual_seed(3)
    t = nf4_quantize(torch.randn(shape, generator=g), blocksize=blocksize, double_quant=False).to(kernel_device)
    assert torch.equal(_launch_dequant(t, torch.float32, None, block=block).cpu(), _formula(t))
    scale = torch.rand(shape[0], generator=g).add_(0.5)
    got = _launch_dequant(t, torch.float16, scale.to(kernel_device), block=block)
    assert torch.equal(got.cpu(), (_formula(t) * scale[:, None]).to(torch.float16))


def test_dequant_runner_matches_nf4_dequant(triton_mode, kernel_device):
    """The decode path's kept dequantization (a bound launch on a GPU, a plain launch under the interpreter)
    gives nf4_dequant's values on every call, a fresh tensor each time."""
    from alignlab.kernels.nf4_dequant import dequant_runner

    t = nf4_quantize(torch.randn(40, 96, generator=torch.Generator().manual_seed(4)), blocksize=32).to(kernel_device)
    dtype = torch.float16
    ref = nf4_dequant(t, dtype)
    make = dequant_runner(t, dtype)
    first, second = make(), make()
    assert first.data_ptr() != second.data_ptr()
    for got in (first, second):
        assert got.shape == t.shape and got.dtype == dtype
        assert torch.equal(got, ref)


def test_row_scale_that_requires_grad_gets_its_gradient(kernel_mode):
    """nf4_dequant(t, dtype, row_scale) was differentiable in row_scale on the PyTorch path and a constant from the
    Triton kernel; a row_scale that requires grad is now applied after the dequantization on every path."""
    t = nf4_quantize(torch.randn(5, 64), blocksize=32)
    rs = (torch.rand(5) + 0.5).requires_grad_()
    out = nf4_dequant(t, torch.float32, rs)
    dense = nf4_dequantize(t, torch.float32)
    torch.testing.assert_close(out, dense * rs.detach()[:, None])
    up = torch.randn(5, 64)
    (grad,) = torch.autograd.grad(out, rs, up)
    torch.testing.assert_close(grad, (up * dense).sum(1))


@pytest.mark.parametrize("shape,blocksize", [((5, 128), 64), ((3, 96), 32), ((4, 100), 64), ((1, 64), 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scaled", [False, True])
def test_dequant_into_a_view_of_a_wider_buffer(shape, blocksize, dtype, scaled, kernel_mode, kernel_device):
    """``out=`` writes the weight into the first columns or rows of a larger buffer (the widened GEMM operands of
    the fused LoRA path) and nothing else: in one strided pass where blocks lie in rows, through a temporary
    where they do not ((4, 100)); values bit for bit those of a plain dequantization."""
    g = torch.Generator().manual_seed(3)
    t = nf4_quantize(torch.randn(*shape, generator=g), blocksize=blocksize, double_quant=True).to(kernel_device)
    rs = (torch.rand(shape[0], generator=g) + 0.5).to(kernel_device) if scaled else None
    ref = nf4_dequant(t, dtype, rs)
    n, k = shape
    wide = torch.full((n, k + 24), 7.0, dtype=dtype, device=kernel_device)
    for view, rest in ((wide[:, :k], wide[:, k:]), (wide[:, 24:], wide[:, :24])):
        wide.fill_(7.0)
        got = nf4_dequant(t, dtype, rs, out=view)
        assert got.data_ptr() == view.data_ptr() and torch.equal(view, ref)
        assert bool((rest == 7).all())
    tall = torch.full((n + 5, k), 7.0, dtype=dtype, device=kernel_device)
    nf4_dequant(t, dtype, rs, out=tall[:n])
    assert torch.equal(tall[:n], ref) and bool((tall[n:] == 7).all())


def test_dequant_out_is_checked():
    t = nf4_quantize(torch.randn(4, 64), blocksize=64)
    with pytest.raises(TypeError, match="out must be a torch.float16 tensor"):
        nf4_dequant(t, torch.float16, out=torch.empty(4, 64))
    with pytest.raises(TypeError, match="out must be"):
        nf4_dequant(t, torch.float32, out=[[0.0] * 64] * 4)
    with pytest.raises(ValueError, match=r"out must have the weight's shape \(4, 64\)"):
        nf4_dequant(t, torch.float32, out=torch.empty(4, 65))
    with pytest.raises(ValueError, match="unit column stride"):
        nf4_dequant(t, torch.float32, out=torch.empty(64, 4).T)
    with pytest.raises(ValueError, match="requires grad"):
        nf4_dequant(t, torch.float32, torch.ones(4, requires_grad=True), out=torch.empty(4, 64))
