"""DoRA kernels (row norm of W + s·B A over a dense or NF4 weight; column dot) vs their references."""

import pytest
import torch

from alignlab.kernels.dora import column_dot, dora_norm_and_scales, dora_row_norm, dora_scales, magnitude_grad
from alignlab.quant.nf4 import nf4_dequantize, nf4_quantize

pytest.importorskip("triton")


def _norm_formula(w, a, b, s):
    """‖W + s·B A‖ per row, with the merged weight formed in float64 (the thing the kernel avoids)."""
    return (w.double() + s * b.double() @ a.double()).norm(dim=1)


# (out, in, r): partial row and column blocks, r below / at / above one tl.dot tile of 16, in=2
SHAPES = [(37, 70, 3), (16, 32, 16), (1, 2, 1), (50, 130, 20)]


@pytest.mark.parametrize("out_f,in_f,r", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("quant", [False, True])
def test_row_norm_interpreter(out_f, in_f, r, dtype, quant, triton_mode, kernel_device):
    g = torch.Generator().manual_seed(out_f + r)
    w = torch.randn(out_f, in_f, generator=g)
    a, b = torch.randn(r, in_f, generator=g) / 4, torch.randn(out_f, r, generator=g) / 4
    if quant:
        weight = nf4_quantize(w, blocksize=32).to(kernel_device)
        dense = nf4_dequantize(weight, torch.float32).cpu()
    else:
        weight = w.to(dtype).to(kernel_device)
        dense = weight.float().cpu()
    a_c, b_c = a.to(dtype), b.to(dtype)
    got = dora_row_norm(weight, a_c.to(kernel_device), b_c.to(kernel_device), 0.7)
    assert got.dtype == torch.float32 and got.shape == (out_f,)
    ref = _norm_formula(dense, a_c, b_c, 0.7)
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # fp16 operands of the B A tile product
    torch.testing.assert_close(got.cpu().double(), ref, rtol=tol, atol=tol)


def test_row_norm_torch_path_fp64_and_empty(torch_mode):
    g = torch.Generator().manual_seed(0)
    w, a, b = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((9, 11), (2, 11), (9, 2)))
    torch.testing.assert_close(dora_row_norm(w, a, b, 1.5), _norm_formula(w, a, b, 1.5))
    t = nf4_quantize(w.float(), blocksize=32)
    torch.testing.assert_close(dora_row_norm(t, a.float(), b.float(), 1.5).double(),
                               _norm_formula(nf4_dequantize(t, torch.float32), a, b, 1.5), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="a must be"):
        dora_row_norm(w, a[:, :5], b, 1.0)
    with pytest.raises(TypeError, match="share a dtype"):
        dora_row_norm(w, a.float(), b, 1.0)


@pytest.mark.parametrize("T,C,splits", [(0, 5, None), (1, 1, None), (13, 37, None), (40, 70, 3), (64, 33, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_column_dot_interpreter(T, C, splits, dtype, triton_mode, kernel_device):
    g = torch.Generator().manual_seed(T + C)
    u, v = torch.randn(T, C, generator=g).to(dtype), torch.randn(T, C, generator=g).to(dtype)
    got = column_dot(u.to(kernel_device), v.to(kernel_device), splits=splits)
    assert got.dtype == torch.float32 and got.shape == (C,)
    torch.testing.assert_close(got.cpu().double(), (u.double() * v.double()).sum(0), rtol=1e-5, atol=1e-5)


def test_column_dot_strided_and_errors(triton_mode, kernel_device):
    base = torch.randn(20, 30).to(kernel_device)
    u, v = base[:, ::2], base[:, 1::2]  # non-unit column stride
    torch.testing.assert_close(column_dot(u, v, splits=2).cpu().double(), (u.double() * v.double()).sum(0).cpu(),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one shape"):
        column_dot(u, v[:, :3])


def _magnitude_grad_formula(gy, y, bias, m):
    """The paper's magnitude gradient written out in float64: Σ_t gy ⊙ (y - bias) / m, 0 where m == 0."""
    z = y.double() - (0 if bias is None else bias.double())
    dm = (gy.double() * z).sum(0) / m.double()
    return torch.where(m == 0, torch.zeros_like(dm), dm)


@pytest.mark.parametrize("T,C,splits", [(0, 5, None), (1, 1, None), (13, 37, None), (40, 70, 3), (64, 33, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_magnitude_grad_interpreter(T, C, splits, dtype, with_bias, triton_mode, kernel_device):
    g = torch.Generator().manual_seed(T + 3 * C)
    gy, y = torch.randn(T, C, generator=g).to(dtype), torch.randn(T, C, generator=g).to(dtype)
    bias = torch.randn(C, generator=g) if with_bias else None
    m = torch.rand(C, generator=g) + 0.5
    m[0] = 0.0  # a row whose magnitude is exactly zero gets a zero gradient
    dev = kernel_device
    got = magnitude_grad(gy.to(dev), y.to(dev), None if bias is None else bias.to(dev), m.to(dev), splits=splits)
    assert got.dtype == m.dtype and got.shape == (C,)
    torch.testing.assert_close(got.cpu().double(), _magnitude_grad_formula(gy, y, bias, m), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [0, 3000])
def test_magnitude_grad_cuda_bf16(T):
    """bf16 on the GPU (the interpreter cannot load bf16) against the formula in float64: many rows, and none."""
    g = torch.Generator().manual_seed(7)
    gy, y = torch.randn(T, 777, generator=g).bfloat16(), torch.randn(T, 777, generator=g).bfloat16()
    bias = torch.randn(777, generator=g)
    m = torch.rand(777, generator=g) + 0.5
    m[3] = 0.0
    got = magnitude_grad(gy.cuda(), y.cuda(), bias.cuda(), m.cuda())
    assert got.dtype == m.dtype and got.shape == (777,)
    torch.testing.assert_close(got.cpu().double(), _magnitude_grad_formula(gy, y, bias, m), rtol=1e-4, atol=1e-3)


def test_magnitude_grad_reference_path_fp64_and_errors(torch_mode):
    g = torch.Generator().manual_seed(1)
    gy, y, bias = torch.randn(7, 5, generator=g).double(), torch.randn(7, 5, generator=g).double(), torch.randn(5).double()
    m = torch.rand(5, generator=g).double() + 0.1
    torch.testing.assert_close(magnitude_grad(gy, y, bias, m), _magnitude_grad_formula(gy, y, bias, m))
    with pytest.raises(ValueError, match="one shape"):
        magnitude_grad(gy, y[:, :3], bias, m)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        magnitude_grad(gy, y, bias, m[:4])


@pytest.mark.parametrize("out_f,in_f,r", [(37, 200, 3), (16, 160, 16), (5, 130, 20), (1, 128, 1)])
@pytest.mark.parametrize("quant", [False, True])
def test_row_norm_split_over_the_input_dimension(out_f, in_f, r, quant, triton_mode, kernel_device, monkeypatch):
    """NORM_SPLIT: each row block's columns walked by several programs, the last to arrive adding the partials (the
    interpreter counts 8 SMs, so these shapes split 2-3 ways, the last slice partial): the norm within fp32
    summation-order rounding of the unsplit kernel's and the formula's, the factors from it as dora_scales makes
    them, and the arrival counters back at zero (a second call gives the same numbers)."""
    from alignlab.kernels import dora

    g = torch.Generator().manual_seed(out_f + in_f)
    w = torch.randn(out_f, in_f, generator=g)
    dev = kernel_device
    weight = nf4_quantize(w, blocksize=32).to(dev) if quant else w.to(dev)
    dense = nf4_dequantize(weight, torch.float32).cpu() if quant else w
    a, b = (torch.randn(r, in_f, generator=g) / 4).to(dev), (torch.randn(out_f, r, generator=g) / 4).to(dev)
    m = torch.randn(out_f, generator=g).to(dev)
    unsplit = dora_row_norm(weight, a, b, 0.7)
    monkeypatch.setattr(dora, "NORM_SPLIT", True)
    if dev == "cpu":  # the interpreter's tiles: 16 rows x 32 columns
        assert dora._norm_split(-(-out_f // 16), -(-in_f // 32), torch.device(dev)) > 1
    got = dora_norm_and_scales(weight, a, b, 0.7, m, b, torch.float32)
    again = dora_norm_and_scales(weight, a, b, 0.7, m, b, torch.float32)
    for x, y in zip(got, again):
        assert torch.equal(x, y)
    torch.testing.assert_close(got[0], unsplit, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[0].cpu().double(), _norm_formula(dense, a.cpu(), b.cpu(), 0.7), rtol=1e-5,
                               atol=1e-5)
    for x, y in zip(got[1:], dora_scales(got[0], m, b, 0.7, torch.float32)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("out_f,in_f,bs,used", [(37, 96, 32, True), (16, 128, 64, True), (5, 130, 32, False),
                                                  (1, 256, 32, True), (20, 192, 128, False)])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("split", [False, True])
def test_row_norm_with_one_scale_per_block_equals_the_per_byte_tile(out_f, in_f, bs, used, double_quant, split,
                                                                    triton_mode, kernel_device, monkeypatch):
    """NORM_BLOCK_SCALES: where every quantization block fits a tile (blocksize a power of two dividing BLOCK_K and
    in_features), the tile loads each block's scale once; the same fp32 values, so the same norm and factors as the
    per-byte tile, bit for bit under the interpreter (tiles of 64 columns here: 2 blocks of 32 per tile, the last
    tile of 96 columns half outside; 130 columns and blocks of 128 take the per-byte tile)."""
    from alignlab.kernels import dora

    g = torch.Generator().manual_seed(out_f + in_f + bs)
    dev = kernel_device
    weight = nf4_quantize(torch.randn(out_f, in_f, generator=g), blocksize=bs, double_quant=double_quant).to(dev)
    a, b = (torch.randn(4, in_f, generator=g) / 4).to(dev), (torch.randn(out_f, 4, generator=g) / 4).to(dev)
    m = torch.randn(out_f, generator=g).to(dev)
    if dev == "cpu":
        monkeypatch.setattr(dora, "INTERPRET_CONFIG", (16, 64, 4))
    monkeypatch.setattr(dora, "NORM_SPLIT", split)
    seen = []
    real = dora.launch
    monkeypatch.setattr(dora, "launch", lambda k, grid, args, meta: seen.append(meta["BLOCK_SCALES"])
                        or real(k, grid, args, meta))
    results = {}
    for on in (False, True):
        monkeypatch.setattr(dora, "NORM_BLOCK_SCALES", on)
        results[on] = dora_norm_and_scales(weight, a, b, 0.7, m, b, torch.float32)
    block_k = (dora.INTERPRET_CONFIG if dev == "cpu" else dora.ROW_NORM_CONFIG)[1]
    expected = in_f % bs == 0 and block_k % bs == 0
    assert seen == [False, expected] and (dev != "cpu" or expected == used)
    for x, y in zip(results[True], results[False]):
        if dev == "cpu":
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    dense = nf4_dequantize(weight, torch.float32).cpu()
    torch.testing.assert_close(results[True][0].cpu().double(), _norm_formula(dense, a.cpu(), b.cpu(), 0.7),
                               rtol=1e-5, atol=1e-5)


def test_row_norm_block_scales_with_a_shift(triton_mode, kernel_device, monkeypatch):
    """An ICQ-calibrated weight (a per-block shift, HAS_SHIFT): the shift is added per block, as per byte."""
    from alignlab.kernels import dora

    g = torch.Generator().manual_seed(5)
    weight = nf4_quantize(torch.randn(24, 128, generator=g), blocksize=32, calibrate="icq", icq_steps=3)
    assert weight.shift is not None
    weight = weight.to(kernel_device)
    a, b = (torch.randn(4, 128, generator=g) / 4).to(kernel_device), (torch.randn(24, 4, generator=g) / 4).to(
        kernel_device)
    if kernel_device == "cpu":
        monkeypatch.setattr(dora, "INTERPRET_CONFIG", (16, 64, 4))
    norms = []
    for on in (False, True):
        monkeypatch.setattr(dora, "NORM_BLOCK_SCALES", on)
        norms.append(dora_row_norm(weight, a, b, 0.7))
    torch.testing.assert_close(norms[1], norms[0], rtol=1e-6, atol=1e-6)
    dense = nf4_dequantize(weight, torch.float32).cpu()
    torch.testing.assert_close(norms[1].cpu().double(), _norm_formula(dense, a.cpu(), b.cpu(), 0.7), rtol=1e-5,
                               atol=1e-5)


def test_norm_split_rule(monkeypatch):
    """About 4 programs per SM, at least 2 column tiles each, at most 16 slices; 1 when off or already full."""
    from alignlab.kernels import dora

    monkeypatch.setattr(dora, "interpreting", lambda: False)
    monkeypatch.setattr(dora, "sm_count", lambda index: 132)
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(dora, "NORM_SPLIT", False)
    assert dora._norm_split(64, 16, dev) == 1
    monkeypatch.setattr(dora, "NORM_SPLIT", True)
    assert dora._norm_split(64, 16, dev) == 8  # 1024 x 4096 in 16 x 256 tiles: wanted 9, 2 tiles each at most 8
    assert dora._norm_split(256, 16, dev) == 3  # 4096 x 4096
    assert dora._norm_split(896, 16, dev) == 1  # 14336 x 4096: the row blocks fill the GPU
    assert dora._norm_split(1, 1000, dev) == 16
    assert dora._norm_split(10, 1, dev) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("quant", [False, True])
def test_row_norm_and_column_dot_cuda_bf16(quant):
    torch.manual_seed(0)
    out_f, in_f, r = 1000, 4100, 16
    w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
    a = (torch.randn(r, in_f, device="cuda") / 30).bfloat16()
    b = (torch.randn(out_f, r, device="cuda") / 30).bfloat16()
    weight = nf4_quantize(w, blocksize=64) if quant else w
    dense = nf4_dequantize(weight, torch.float32) if quant else w.float()
    torch.testing.assert_close(dora_row_norm(weight, a, b, 2.0).double(), _norm_formula(dense, a, b, 2.0),
                               rtol=1e-4, atol=1e-4)
    from alignlab.kernels import dora

    before = dora.NORM_SPLIT, dora.NORM_BLOCK_SCALES
    try:  # the split form (63 row blocks: split several ways on any current GPU), twice: counters back at zero;
        # then with one scale lookup per NF4 block (4100 columns: not a multiple of 64, so over a 4096-column view)
        dora.NORM_SPLIT = True
        for _ in range(2):
            torch.testing.assert_close(dora_row_norm(weight, a, b, 2.0).double(), _norm_formula(dense, a, b, 2.0),
                                       rtol=1e-4, atol=1e-4)
        if quant:
            w2 = nf4_quantize(w[:, :4096].contiguous(), blocksize=64)
            d2, a2 = nf4_dequantize(w2, torch.float32), a[:, :4096].contiguous()
            norms = []
            for on in (False, True):
                dora.NORM_BLOCK_SCALES = on
                norms.append(dora_row_norm(w2, a2, b, 2.0))
                torch.testing.assert_close(norms[-1].double(), _norm_formula(d2, a2, b, 2.0), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(norms[1], norms[0], rtol=1e-6, atol=1e-6)
    finally:
        dora.NORM_SPLIT, dora.NORM_BLOCK_SCALES = before
    u, v = torch.randn(2, 3000, 777, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(column_dot(u, v).double(), (u.double() * v.double()).sum(0), rtol=1e-4, atol=1e-3)


def test_row_norm_of_a_transposed_dense_view(triton_mode, kernel_device):
    """A weight stored (in, out) and handed over as its transpose (GPT-2's Conv1D layout) is read right."""
    g = torch.Generator().manual_seed(5)
    stored = torch.randn(24, 40, generator=g).to(kernel_device)  # (in, out)
    w = stored.T  # (out, in), column-major
    a, b = torch.randn(3, 24, generator=g).to(kernel_device), torch.randn(40, 3, generator=g).to(kernel_device)
    ref = (w.double() + 0.5 * b.double() @ a.double()).norm(dim=1)
    torch.testing.assert_close(dora_row_norm(w, a, b, 0.5).double(), ref, rtol=1e-4, atol=1e-4)


def _scales_formula(norm, m, b, s, dtype):
    """DoRA's forward factors as the torch expression rounds them, op by op."""
    g = m.to(norm.dtype) / norm
    gs = (g * s)[:, None]
    return g, gs, (b.to(g.dtype) * gs).to(dtype)


@pytest.mark.parametrize("out_f,r", [(37, 3), (16, 16), (1, 1), (130, 20), (50, 64)])
@pytest.mark.parametrize("b_dtype,dtype", [(torch.float32, torch.float16), (torch.float16, torch.float16),
                                           (torch.float32, torch.float32)])
def test_dora_scales_interpreter(out_f, r, b_dtype, dtype, triton_mode, kernel_device):
    """One kernel for g = m / n, s·g and s·g ⊙ B, bit for bit the torch expression (partial row blocks, r not a
    power of two, r = 1), with a zero magnitude row."""
    g = torch.Generator().manual_seed(out_f * 7 + r)
    norm = torch.rand(out_f, generator=g) * 3 + 0.1
    m = torch.randn(out_f, generator=g)
    m[0] = 0.0
    b = (torch.randn(out_f, r, generator=g) / 5).to(b_dtype)
    dev = kernel_device
    got = dora_scales(norm.to(dev), m.to(dev), b.to(dev), 1.7, dtype)
    ref = _scales_formula(norm.to(dev), m.to(dev), b.to(dev), 1.7, dtype)
    assert [t.shape for t in got] == [(out_f,), (out_f, 1), (out_f, r)]
    assert [t.dtype for t in got] == [torch.float32, torch.float32, dtype]
    for x, y in zip(got, ref):
        assert torch.equal(x, y), (x - y).abs().max()


def test_dora_scales_strided_b_empty_and_errors(triton_mode, kernel_device):
    dev = kernel_device
    norm, m = torch.rand(6, device=dev) + 1, torch.randn(6, device=dev)
    b = torch.randn(3, 6, device=dev).T  # (6, 3), column-major
    for x, y in zip(dora_scales(norm, m, b, 0.5, torch.float32), _scales_formula(norm, m, b, 0.5, torch.float32)):
        assert torch.equal(x, y)
    empty = dora_scales(norm[:0], m[:0], b[:0], 0.5, torch.float16)
    assert [t.shape for t in empty] == [(0,), (0, 1), (0, 3)]
    with pytest.raises(ValueError, match="magnitude"):
        dora_scales(norm, m[:5], b, 0.5, torch.float32)
    with pytest.raises(ValueError, match="b"):
        dora_scales(norm, m, b[:5], 0.5, torch.float32)


def test_dora_scales_reference_path_fp64(torch_mode):
    norm, m, b = torch.rand(5, dtype=torch.float64) + 1, torch.randn(5, dtype=torch.float64), torch.randn(5, 2)
    got = dora_scales(norm, m, b, 2.0, torch.float64)
    assert got[0].dtype == torch.float64
    for x, y in zip(got, _scales_formula(norm, m, b, 2.0, torch.float64)):
        assert torch.equal(x, y)


@pytest.mark.cuda
def test_dora_scales_cuda_bf16():
    """On the GPU (bf16 output, fp32 and bf16 factors): still bit for bit the torch expression."""
    torch.manual_seed(0)
    norm = torch.rand(4099, device="cuda") + 0.5
    m = torch.randn(4099, device="cuda")
    for b in (torch.randn(4099, 16, device="cuda") / 30, (torch.randn(4099, 16, device="cuda") / 30).bfloat16()):
        for x, y in zip(dora_scales(norm, m, b, 2.0, torch.bfloat16), _scales_formula(norm, m, b, 2.0, torch.bfloat16)):
            assert torch.equal(x, y), (x.float() - y.float()).abs().max()


@pytest.mark.parametrize("out_f,in_f,r", SHAPES)
@pytest.mark.parametrize("quant", [False, True])
def test_norm_and_scales_one_kernel_equals_the_two(out_f, in_f, r, quant, triton_mode, kernel_device):
    """The row-norm kernel writing DoRA's factors gives bit for bit what the norm kernel then dora_scales give."""
    g = torch.Generator().manual_seed(out_f * 3 + r)
    w = torch.randn(out_f, in_f, generator=g)
    dev = kernel_device
    weight = nf4_quantize(w, blocksize=32).to(dev) if quant else w.half().to(dev)
    a, b = (torch.randn(r, in_f, generator=g) / 4).to(dev), (torch.randn(out_f, r, generator=g) / 4).to(dev)
    m = torch.randn(out_f, generator=g).to(dev)
    ac, bc = a.half(), b.half()
    got = dora_norm_and_scales(weight, ac, bc, 0.7, m, b, torch.float16)
    norm = dora_row_norm(weight, ac, bc, 0.7)
    ref = (norm, *dora_scales(norm, m, b, 0.7, torch.float16))
    for x, y in zip(got, ref):
        assert x.dtype == y.dtype and torch.equal(x, y), (x.float() - y.float()).abs().max()


def test_norm_and_scales_errors_and_reference_path(torch_mode):
    g = torch.Generator().manual_seed(0)  # (the global generator made the inputs depend on the tests run before)
    w, a, b, m = (torch.randn(*shape, generator=g) for shape in ((6, 8), (2, 8), (6, 2), (6,)))
    norm, *factors = dora_norm_and_scales(w, a, b, 1.5, m, b, torch.float32)
    # an fp32 norm against the float64 formula: fp32 tolerances (float64's default ones failed by order of tests)
    torch.testing.assert_close(norm.double(), _norm_formula(w, a, b, 1.5), rtol=1e-5, atol=1e-6)
    for x, y in zip(factors, _scales_formula(norm, m, b, 1.5, torch.float32)):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="magnitude"):
        dora_norm_and_scales(w, a, b, 1.5, m[:5], b, torch.float32)
    with pytest.raises(ValueError, match="b_master"):
        dora_norm_and_scales(w, a, b, 1.5, m, b[:5], torch.float32)


@pytest.mark.parametrize("quant", [False, True])
def test_gradients_flow_on_every_path(quant, kernel_mode):
    """The kernels write plain tensors: on the Triton path every DoRA helper returned a constant where the PyTorch
    path (CPU) was differentiable, so gradients through a direct call vanished on the GPU only. A call that needs a
    gradient now takes the reference; its gradients are checked against autograd through the float64 formulas."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(6, 64, generator=g, dtype=torch.float64)
    weight = nf4_quantize(w.float(), blocksize=32) if quant else w.float().requires_grad_()
    dense = nf4_dequantize(weight, torch.float32).double() if quant else w
    a = (torch.randn(3, 64, generator=g) / 4).requires_grad_()
    b = (torch.randn(6, 3, generator=g) / 4).requires_grad_()
    m = (torch.rand(6, generator=g) + 0.5).requires_grad_()
    seed = torch.randn(6, generator=g, dtype=torch.float64)

    def grads(out, ins, want_out):
        got = torch.autograd.grad((out.double() * seed).sum(), ins, allow_unused=True)
        want = torch.autograd.grad((want_out * seed).sum(), ins, allow_unused=True)
        for x, y in zip(got, want):
            torch.testing.assert_close(x.double(), y.double(), rtol=1e-4, atol=1e-5)

    ins = [a, b] if quant else [a, b, weight]
    grads(dora_row_norm(weight, a, b, 0.5), ins, _norm_formula(dense if quant else weight, a, b, 0.5))
    norm, gain, gs, bgs = dora_norm_and_scales(weight, a, b, 0.5, m, b, torch.float32)
    grads(gain, ins, m.detach().double() / _norm_formula(dense if quant else weight, a, b, 0.5))
    n = (torch.rand(6, generator=g) + 0.5).requires_grad_()
    grads(dora_scales(n, m, b, 0.5, torch.float32)[0], [n], m.detach().double() / n)
    u = torch.randn(5, 6, generator=g).requires_grad_()
    v = torch.randn(5, 6, generator=g).requires_grad_()
    grads(column_dot(u, v), [u, v], (u.double() * v.double()).sum(0))
    bias = torch.randn(6, generator=g).requires_grad_()
    grads(magnitude_grad(u, v, bias, m), [u, v, bias, m],
          (u.double() * (v.double() - bias.double())).sum(0) / m.double())
    with torch.no_grad():  # nothing to differentiate: the kernels, as before
        assert not dora_row_norm(weight, a, b, 0.5).requires_grad


@pytest.mark.parametrize("bad", ["int magnitude", "int b", "int norm", "int dtype", "str dtype", "list b"])
def test_dora_scales_checks_types_as_norm_and_scales_does(kernel_mode, bad):
    """dora_scales took an integer m / norm / B and dtype=torch.int32 (a truncated s·g ⊙ B) on both paths, while
    dora_norm_and_scales, which computes the same factors, refused them: TypeError naming the argument."""
    norm, m, b, dtype = torch.rand(6) + 1, torch.rand(6) + 0.5, torch.randn(6, 3), torch.float32
    if bad == "int magnitude":
        m = (m * 10).long()
    elif bad == "int b":
        b = (b * 10).long()
    elif bad == "int norm":
        norm = (norm * 10).long()
    elif bad == "list b":
        b = b.tolist()
    else:
        dtype = torch.int32 if bad == "int dtype" else "float32"
    name = {"int magnitude": "magnitude", "int norm": "norm"}.get(bad, "dtype" if "dtype" in bad else "b")
    with pytest.raises(TypeError, match=name):
        dora_scales(norm, m, b, 0.5, dtype)


@pytest.mark.parametrize("bad", ["list u", "bool v", "int u"])
def test_column_dot_checks_types_as_magnitude_grad_does(kernel_mode, bad):
    """column_dot raised AttributeError for a list and summed bool / integer tensors as floats, where its siblings
    refuse non-float input with a TypeError naming it (a helper's find, 2026-12-07)."""
    u, v = torch.randn(5, 3), torch.randn(5, 3)
    if bad == "list u":
        u = u.tolist()
    elif bad == "bool v":
        v = v > 0
    else:
        u = (u * 10).long()
    with pytest.raises(TypeError, match=f"{bad[-1]} must be a floating-point tensor"):
        column_dot(u, v)


@pytest.mark.parametrize("quant", [False, True])
def test_row_norm_and_scales_with_bf16_factors(quant, triton_mode, kernel_device):
    """The interpreter's bf16 tl.dot reads raw bits: bf16 factors gave norms off by ~1e10 there (and g, s·g, s·g ⊙ B
    with them). They take the reference under the interpreter, the kernel on the GPU; either way the formula's
    norm on the bf16 factors, within float32 accumulation."""
    g = torch.Generator().manual_seed(3)
    out_f, in_f, r = 37, 64, 5
    w = torch.randn(out_f, in_f, generator=g)
    a, b = (torch.randn(r, in_f, generator=g) / 4).bfloat16(), (torch.randn(out_f, r, generator=g) / 4).bfloat16()
    weight = nf4_quantize(w, blocksize=32).to(kernel_device) if quant else w.to(kernel_device)
    dense = nf4_dequantize(weight, torch.float32).cpu() if quant else w
    want = _norm_formula(dense, a, b, 0.7)
    got = dora_row_norm(weight, a.to(kernel_device), b.to(kernel_device), 0.7)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-5)
    m = torch.rand(out_f, generator=g) + 0.5
    norm, gs, sg, sgb = dora_norm_and_scales(weight, a.to(kernel_device), b.to(kernel_device), 0.7,
                                             m.to(kernel_device), b.float().to(kernel_device), torch.bfloat16)
    torch.testing.assert_close(norm.cpu().double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gs.cpu().double(), m.double() / want, rtol=1e-5, atol=1e-5)
