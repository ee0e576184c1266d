"""adapted_matmul: a GEMM with a LoRA rank-r term (and a per-column scale and bias) in its epilogue, against the
formula in float64."""

import pytest
import torch
from torch import nn

from conftest import printed_in_fresh_process

from alignlab.kernels.lora_gemm import adapted_matmul, adapted_matmul_reference

pytest.importorskip("triton")


def _inputs(M, K, N, R, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5
    c, d = torch.randn(M, R, generator=g), torch.randn(R, N, generator=g) / 4
    scale, bias = torch.rand(N, generator=g) + 0.5, torch.randn(N, generator=g)
    return tuple(t.to(dtype).to(device) for t in (a, w, c, d)) + (scale.to(device), bias.to(device))


def _formula(a, b, c, d, scale=None, bias=None):
    """The product written out in float64: (a b) ⊙ scale + bias + c d."""
    y = a.double() @ b.double()
    if scale is not None:
        y = y * scale.double()
    if bias is not None:
        y = y + bias.double()
    return y + c.double() @ d.double()


# (M, K, N, R): one row, partial tiles on every side, K below one block, R 0 / 1 / one tile / above one tile
SHAPES = [(1, 16, 32, 16), (37, 50, 45, 3), (33, 64, 32, 0), (20, 17, 70, 20), (5, 7, 9, 1)]


@pytest.mark.parametrize("M,K,N,R", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("transposed", [True, False], ids=["weight_T", "contiguous"])
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "scale_bias"])
def test_adapted_matmul_interpreter(M, K, N, R, dtype, transposed, extras, triton_mode, kernel_device):
    a, w, c, d, scale, bias = _inputs(M, K, N, R, dtype, kernel_device, seed=M + K + N)
    b = w.T if transposed else w.T.contiguous()  # forward reads W transposed in place, backward a plain W
    scale, bias = (scale, bias) if extras else (None, None)
    y = adapted_matmul(a, b, c, d, scale, bias)
    assert y.shape == (M, N) and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(y.double().cpu(), _formula(a, b, c, d, scale, bias).cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("M,K,N,R", [(1, 16, 32, 16), (37, 48, 40, 3), (20, 64, 72, 20)])
@pytest.mark.parametrize("transposed", [True, False], ids=["weight_T", "contiguous"])
def test_adapted_matmul_tensor_descriptors(M, K, N, R, transposed, triton_mode, kernel_device):
    """tma=True (tiles read and written by tensor descriptors, rows 16-byte aligned here): the same formula; a row
    stride that is not 16-byte aligned falls back to the pointer kernel."""
    from alignlab.kernels import lora_gemm

    if lora_gemm.TensorDescriptor is None:
        pytest.skip("this Triton has no host-side tensor descriptors (3.4 on)")
    a, w, c, d, scale, bias = _inputs(M, K, N, R, torch.float16, kernel_device, seed=K)
    b = w.T if transposed else w.T.contiguous()
    calls = []
    kernel = lora_gemm._adapted_matmul_tma_kernel
    with pytest.MonkeyPatch.context() as mp:  # the descriptor kernel runs (not the pointer fallback)
        mp.setattr(lora_gemm, "_adapted_matmul_tma_kernel",
                   type("Spy", (), {"__getitem__": lambda self, grid: calls.append(grid) or kernel[grid]})())
        got = adapted_matmul(a, b, c, d, scale, bias, tma=True)
    assert calls
    torch.testing.assert_close(got.double().cpu(), _formula(a, b, c, d, scale, bias).cpu(), rtol=3e-3, atol=3e-3)
    odd = torch.zeros(M, K + 1, dtype=a.dtype, device=kernel_device)[:, :K].copy_(a)  # rows K + 1 elements apart
    torch.testing.assert_close(adapted_matmul(odd, b, c, d, tma=True), adapted_matmul(a, b, c, d, tma=False),
                               rtol=0, atol=0)


def test_adapted_matmul_tiles_and_strides(triton_mode, kernel_device):
    """Several tile configurations (GROUP_M larger than the row blocks, more than one K block with a partial last
    one) give one result; a strided ``a`` (a column slice) and ``c`` are read in place."""
    a, w, c, d, scale, bias = _inputs(70, 100, 90, 8, torch.float32, kernel_device, seed=1)
    want = _formula(a, w.T, c, d, scale, bias)
    for config in [(16, 32, 16, 2, 4, 1), (32, 16, 32, 8, 4, 2), (16, 16, 64, 1, 2, 1)]:
        got = adapted_matmul(a, w.T, c, d, scale, bias, config=config)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    wide = torch.zeros(70, 130, device=kernel_device)
    wide[:, 10:110] = a
    cw = torch.zeros(70, 20, device=kernel_device)
    cw[:, 5:13] = c
    got = adapted_matmul(wide[:, 10:110], w.T, cw[:, 5:13], d)
    torch.testing.assert_close(got.double(), _formula(a, w.T, c, d), rtol=1e-5, atol=1e-5)


def test_adapted_matmul_empty_and_errors(triton_mode, kernel_device):
    a, w, c, d, scale, bias = _inputs(6, 8, 10, 4, torch.float32, kernel_device)
    assert adapted_matmul(a[:0], w.T, c[:0], d).shape == (0, 10)  # an empty batch
    # no reduction dimension: the rank-r term and the bias only
    got = adapted_matmul(a[:, :0], w.T[:0], c, d, None, bias)
    torch.testing.assert_close(got, c @ d + bias, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"b \(K, N\)"):
        adapted_matmul(a, w, c, d)
    with pytest.raises(ValueError, match="^a must be a 2-D tensor, got shape"):
        adapted_matmul(a[0], w.T, c, d)
    with pytest.raises(TypeError, match="^d must be a tensor, got list"):
        adapted_matmul(a, w.T, c, d.tolist())
    with pytest.raises(TypeError, match="share"):
        adapted_matmul(a, w.T, c.half(), d)
    with pytest.raises(TypeError, match="share"):
        adapted_matmul(a.long(), w.T.long(), c.long(), d.long())
    with pytest.raises(ValueError, match="col_scale"):
        adapted_matmul(a, w.T, c, d, scale[:3])
    with pytest.raises(TypeError, match="bias"):
        adapted_matmul(a, w.T, c, d, None, bias.long())
    with pytest.raises(ValueError, match="R <= 128"):
        adapted_matmul(a, w.T, torch.zeros(6, 129, device=kernel_device), torch.zeros(129, 10, device=kernel_device))
    for bad in [(16, 32, 16, 2, 4), (24, 32, 16, 2, 4, 1), (16, 32, 16, 0, 4, 1), (16, 32, 16, 2, 4, True), 16,
                (16, 16, 16, 1, 3, 1), "16"]:
        with pytest.raises(ValueError, match="config"):
            adapted_matmul(a, w.T, c, d, config=bad)
    with pytest.raises(TypeError, match="tma must be a bool"):
        adapted_matmul(a, w.T, c, d, tma="no")
    with pytest.raises(ValueError, match="d is on meta"):
        adapted_matmul(a, w.T, c, d.to("meta"))
    with pytest.raises(ValueError, match="bias is on meta"):
        adapted_matmul(a, w.T, c, d, None, bias.to("meta"))


def test_adapted_matmul_is_differentiable_where_a_gradient_is_wanted(triton_mode, kernel_device):
    """The kernel writes a plain tensor: where autograd wants a gradient of an input the call takes the
    (differentiable) reference, as on CPU, instead of silently dropping the graph."""
    a, w, c, d, scale, bias = _inputs(6, 8, 10, 4, torch.float32, kernel_device)
    for leaf in range(6):
        inputs = [t.clone() for t in (a, w.T, c, d, scale, bias)]
        inputs[leaf].requires_grad_()
        y = adapted_matmul(*inputs)
        assert y.requires_grad
        (got,) = torch.autograd.grad(y.sum(), inputs[leaf])
        x64 = [t.detach().double().requires_grad_(i == leaf) for i, t in enumerate(inputs)]
        (want,) = torch.autograd.grad(_formula(*x64).sum(), x64[leaf])
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not adapted_matmul(a.requires_grad_(), w.T, c, d).requires_grad


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_functional_layers_name_the_argument_whose_shape_does_not_fit(dora, monkeypatch, triton_mode, kernel_device):
    """lora_linear / dora_linear check the factors against the weight: the same ValueError, naming the argument,
    whichever product path would run (a mismatch once surfaced as the path's own RuntimeError or ValueError; fp16
    under the interpreter, so that LORA_GEMM on reaches the kernel)."""
    from alignlab.adapters import fused
    from alignlab.kernels import lora_gemm

    calls = []
    real = lora_gemm.adapted_matmul
    monkeypatch.setattr(lora_gemm, "adapted_matmul", lambda *t, **k: calls.append(1) or real(*t, **k))
    monkeypatch.setattr(fused, "DECODE_KERNELS", False)  # 20 rows: the GEMM path, not the decode kernels (1-64 rows)
    x, w, a, b, bias, m = (t.half().to(kernel_device) for t in (torch.randn(20, 48), torch.randn(40, 48),
                                                                  torch.randn(4, 48), torch.randn(40, 4),
                                                                  torch.randn(40), torch.ones(40)))
    x.requires_grad_()
    call = (lambda *t: fused.dora_linear(*t[:5], 2.0, t[5])) if dora else (lambda *t: fused.lora_linear(*t[:5], 2.0))
    bad = [((x, w, bias, a, torch.randn(41, 4), m), r"b must be \(out, r\) = \(40, 4\)"),
           ((x, w, bias, a, torch.randn(40, 3), m), "b must be"),
           ((x, w, torch.randn(39), a, b, m), r"bias must be \(40,\)"),
           ((x[:, :47], w, bias, a, b, m), "x must be"),
           ((x, w, bias, a[:, :47], b, m), "a must be")]
    if dora:
        bad.append(((x, w, bias, a, b, torch.ones(39)), "magnitude must be"))
    monkeypatch.setattr(fused, "LORA_GEMM_FORCED_MIN_ROWS", 1)
    for gemm in (False, True):
        monkeypatch.setattr(fused, "LORA_GEMM", gemm)
        for args, match in bad:
            with pytest.raises(ValueError, match=match):
                call(*args)
        calls.clear()
        assert call(x, w, bias, a, b, m).shape == (20, 40)
        assert bool(calls) == gemm  # the checked call did take the kernel where it is on


def test_adapted_matmul_reference_matches_formula():
    a, w, c, d, scale, bias = _inputs(9, 12, 7, 3, torch.float64, "cpu")
    torch.testing.assert_close(adapted_matmul_reference(a, w.T, c, d, scale, bias), _formula(a, w.T, c, d, scale, bias))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N,R", [(1, 4096, 1024, 16), (1000, 4096, 1030, 16), (4100, 1040, 4096, 20)])
@pytest.mark.parametrize("transposed", [True, False], ids=["weight_T", "contiguous"])
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_adapted_matmul_cuda(M, K, N, R, dtype, transposed, tma):
    a, w, c, d, scale, bias = _inputs(M, K, N, R, dtype, "cuda", seed=M)
    b = w.T if transposed else w.T.contiguous()
    want = _formula(a, b, c, d, scale, bias)
    got = adapted_matmul(a, b, c, d, scale, bias, tma=tma)
    # one bf16 / fp16 rounding of the fp32 sum: the output's own ulp, no more
    err = (got.double() - want).abs()
    ulp = want.abs().clamp_min(1.0) * (2 ** -8 if dtype == torch.bfloat16 else 2 ** -11)
    assert (err <= 2 * ulp).all(), err.max()
    cublas = torch.addmm(bias.to(dtype), a, b).float().mul(scale) + (c.float() @ d.float())
    assert (got.double() - want).abs().mean() <= (cublas.to(dtype).double() - want).abs().mean() * 1.05


def _fp16_layer(dora: bool, nf4: bool, device: str):
    """A fp16 LoRA / DoRA layer (64 -> 48 with bias, dense or NF4 base, r = 8, ``B`` random), an input of 39 rows
    that needs grad, and the tensors to differentiate."""
    from alignlab.adapters import LoRALinear
    from alignlab.quant.linear import NF4Linear

    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=True)
    base = (NF4Linear.from_linear(base, blocksize=32, compute_dtype=torch.float16) if nf4 else base.half())
    layer = LoRALinear(base.requires_grad_(False).to(device), r=8, alpha=16, use_dora=dora)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)
    x = torch.randn(3, 13, 64, device=device).half().requires_grad_()
    return layer, x, [x, *(p for p in layer.parameters() if p.requires_grad)]


def _switch_matches_the_default_form(layer, x, params, monkeypatch, kernel: str, switch: str, calls_on: list):
    """The layer's output and gradients with ``fused.<switch>`` off, then on: on, ``lora_gemm.<kernel>`` is called
    with first arguments of the shapes ``calls_on`` (off: never), and the results match to fp16 rounding."""
    from alignlab.adapters import fused
    from alignlab.kernels import lora_gemm

    calls = []
    real = getattr(lora_gemm, kernel)
    monkeypatch.setattr(lora_gemm, kernel, lambda t, *r, **k: calls.append(tuple(t.shape)) or real(t, *r, **k))
    monkeypatch.setattr(fused, "DECODE_KERNELS", False)  # 39 rows: the GEMM path, not the decode kernels (1-64 rows)
    results = []
    for on in (False, True):
        monkeypatch.setattr(fused, switch, on)
        calls.clear()
        y = layer(x)
        results.append((y, *torch.autograd.grad(y.float().square().sum(), params)))
        assert calls == (calls_on if on else []), calls
    for got, want in zip(results[1], results[0]):
        scale = want.abs().max().float().clamp_min(1e-6)
        torch.testing.assert_close(got.float() / scale, want.float() / scale, rtol=0, atol=4e-3)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_fused_layers_with_the_epilogue_gemm_match_the_addmm_form(dora, nf4, triton_mode, kernel_device,
                                                                   monkeypatch):
    """fused.LORA_GEMM on (row bound lowered so that a small layer reaches it): a fp16 LoRA / DoRA layer, dense or
    NF4 base, takes adapted_matmul in forward and for dx, and its output and gradients match the default form
    (cuBLAS-style base product + addmm_) to fp16 rounding."""
    from alignlab.adapters import fused

    monkeypatch.setattr(fused, "LORA_GEMM_FORCED_MIN_ROWS", 1)
    _switch_matches_the_default_form(*_fp16_layer(dora, nf4, kernel_device), monkeypatch, "adapted_matmul",
                                     "LORA_GEMM", [(39, 64), (39, 48)])  # forward (x), then dx (dy)


@pytest.mark.parametrize("env, on", [(None, "auto"), ("auto", "auto"), ("1", True), ("off", False)])
def test_epilogue_gemm_auto_by_default_and_set_by_the_environment(env, on):
    """``ALIGNLAB_LORA_GEMM``: ``auto`` (the measured rule) unless set; 1 everywhere, 0 nowhere."""
    out = printed_in_fresh_process("__import__('alignlab.adapters.fused').adapters.fused.LORA_GEMM",
                                   {"ALIGNLAB_LORA_GEMM": env})
    assert out == str(on)


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_the_auto_rule_takes_the_kernel_where_it_was_measured_to_win(dora, nf4, triton_mode, kernel_device,
                                                                      monkeypatch):
    """LORA_GEMM = "auto" (the default), bounds lowered and the device taken as the measured kind: backward's dx
    always, the forward only over a dense base with DoRA's column scale; the widened form keeps the backward where it
    applies (an NF4 base whose output is narrower than its input); nothing on a device of another kind or below the
    dimension bound; the results match the default form."""
    from alignlab.adapters import LoRALinear, fused
    from alignlab.kernels import lora_gemm
    from alignlab.quant.linear import NF4Linear

    if lora_gemm.TensorDescriptor is None:
        pytest.skip("the auto rule takes the descriptor kernel only, which this Triton lacks (3.4 on)")
    calls = []
    real = lora_gemm.adapted_matmul
    monkeypatch.setattr(lora_gemm, "adapted_matmul", lambda a, *r, **k: calls.append(tuple(a.shape)) or real(a, *r, **k))
    monkeypatch.setattr(fused, "LORA_GEMM", "auto")
    monkeypatch.setattr(fused, "WIDE_K_MIN_ROWS", 1)
    torch.manual_seed(0)

    def run(n_in, n_out, measured=True, min_dim=1, min_rows=1, r=16):
        base = nn.Linear(n_in, n_out, bias=True)
        base = NF4Linear.from_linear(base, blocksize=32, compute_dtype=torch.float16) if nf4 else base.half()
        layer = LoRALinear(base.requires_grad_(False).to(kernel_device), r=r, alpha=16, use_dora=dora)
        x = torch.randn(20, n_in, device=kernel_device).half().requires_grad_()
        calls.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(lora_gemm, "measured_device", lambda device: measured)
            mp.setattr(fused, "LORA_GEMM_MIN_DIM", min_dim)
            mp.setattr(fused, "LORA_GEMM_MIN_ROWS", min_rows)
            y = layer(x)
            grads = torch.autograd.grad(y.float().square().sum(), [x, layer.lora_A["default"].weight])
        return list(calls), (y, *grads), layer, x

    got, results, layer, x = run(64, 96)
    assert got == ([(20, 64)] if dora and not nf4 else []) + [(20, 96)], got  # forward (dense DoRA), then dx
    monkeypatch.setattr(fused, "LORA_GEMM", False)
    y = layer(x)
    want = (y, *torch.autograd.grad(y.float().square().sum(), [x, layer.lora_A["default"].weight]))
    for g, w in zip(results, want):
        scale = w.abs().max().float().clamp_min(1e-6)
        torch.testing.assert_close(g.float() / scale, w.float() / scale, rtol=0, atol=4e-3)
    monkeypatch.setattr(fused, "LORA_GEMM", "auto")
    got = run(96, 64)[0]  # output narrower than input: over NF4 the widened form keeps dx
    assert got == ([(20, 96)] if dora and not nf4 else []) + ([] if nf4 else [(20, 64)]), got
    assert run(64, 96, measured=False)[0] == []
    assert run(64, 96, min_dim=65)[0] == []
    assert run(64, 96, min_rows=21)[0] == []  # the row bound (8192 by default)
    assert run(64, 96, r=48)[0] == []  # ranks above LORA_GEMM_MAX_RANK (32: measured at 16, tested up to 20)


def test_descriptors_apply_to_aligned_half_rows_only():
    """The auto rule's operand check: fp16 / bf16 rows 16-byte aligned (input, weight, output), else cuBLAS keeps the
    pass (the pointer kernel lost to it everywhere it was timed)."""
    from alignlab.kernels import lora_gemm

    if lora_gemm.TensorDescriptor is None:
        pytest.skip("this Triton has no host-side tensor descriptors (3.4 on)")
    x, w = torch.zeros(4, 64, dtype=torch.bfloat16), torch.zeros(32, 64, dtype=torch.bfloat16)
    assert lora_gemm.descriptors_apply(x, w, 32)
    assert not lora_gemm.descriptors_apply(x, w, 36)  # output rows 72 bytes apart
    assert not lora_gemm.descriptors_apply(torch.zeros(4, 65, dtype=torch.bfloat16)[:, :64], w, 32)
    assert not lora_gemm.descriptors_apply(x, w.T, 32)  # a weight whose last stride is not 1
    assert not lora_gemm.descriptors_apply(x.float(), w.float(), 32)


# -- rank_update_: y += c d in place ------------------------------------------------------------------------------

def _rank_inputs(M, N, R, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    y, c, d = torch.randn(M, N, generator=g), torch.randn(M, R, generator=g), torch.randn(R, N, generator=g) / 4
    return tuple(t.to(dtype).to(device) for t in (y, c, d))


# (M, N, R): one row, partial tiles on both sides, R 1 / not a power of two / one tile / above one tile / the largest
RANK_SHAPES = [(1, 32, 16), (37, 45, 3), (20, 70, 20), (5, 9, 1), (65, 130, 64), (3, 17, 128)]


@pytest.mark.parametrize("M,N,R", RANK_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["d", "d_T", "y_view"])
def test_rank_update_interpreter(M, N, R, dtype, layout, triton_mode, kernel_device):
    """The formula in float64, in place: ``d`` as given or read transposed in place (forward's ``Bᵀ``), ``y`` as a
    view into a wider buffer whose other columns stay untouched."""
    from alignlab.kernels.lora_gemm import rank_update_

    y, c, d = _rank_inputs(M, N, R, dtype, kernel_device, seed=M + N + R)
    if layout == "d_T":
        d = d.T.contiguous().T  # (R, N) with unit row stride: B (N, R) read as Bᵀ
    buf = None
    if layout == "y_view":
        buf = torch.randn(M, N + 7, dtype=dtype, device=kernel_device)
        buf[:, :N] = y
        y = buf[:, :N]
    want = y.double() + c.double() @ d.double()
    rest = None if buf is None else buf[:, N:].clone()
    version = y._version
    out = rank_update_(y, c, d)
    assert out is y and y._version > version  # an in-place op, as autograd sees it
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(y.double().cpu(), want.cpu(), rtol=tol, atol=tol)
    if buf is not None:
        assert torch.equal(buf[:, N:], rest)


@pytest.mark.parametrize("config", [(16, 16, 1), (32, 64, 2), (64, 16, 4)])
def test_rank_update_tiles(config, triton_mode, kernel_device):
    """Other tile sizes give the same result (the sweep's forms)."""
    from alignlab.kernels.lora_gemm import rank_update_

    y, c, d = _rank_inputs(33, 47, 5, torch.float32, kernel_device)
    want = y.double() + c.double() @ d.double()
    torch.testing.assert_close(rank_update_(y, c, d, config=config).double().cpu(), want.cpu(), rtol=1e-5,
                               atol=1e-5)


def test_rank_update_empty_and_errors(triton_mode, kernel_device):
    from alignlab.kernels.lora_gemm import rank_update_

    for M, N, R in ((0, 8, 4), (8, 0, 4), (8, 8, 0)):
        y, c, d = _rank_inputs(M, N, R, torch.float32, kernel_device)
        before = y.clone()
        assert torch.equal(rank_update_(y, c, d), before)
    y, c, d = _rank_inputs(4, 8, 2, torch.float32, kernel_device)
    with pytest.raises(ValueError, match=r"^c must be \(M, R\) with M = 4 \(y's rows\), got \(3, 2\)"):
        rank_update_(y, c[:3], d)
    with pytest.raises(ValueError, match=r"^d must be \(R, N\) = \(2, 8\).*got \(2, 5\)"):
        rank_update_(y, c, d[:, :5])
    with pytest.raises(ValueError, match="^y must be a 2-D tensor"):
        rank_update_(y[0], c, d)
    with pytest.raises(TypeError, match="^c must be a tensor, got list"):
        rank_update_(y, [[1.0, 2.0]] * 4, d)
    with pytest.raises(TypeError, match="must share one of"):
        rank_update_(y, c.half(), d)
    with pytest.raises(TypeError, match="must share one of"):
        rank_update_(y.double(), c.double(), d.double())
    with pytest.raises(ValueError, match="^y must have unit column stride"):
        rank_update_(y.T.contiguous().T, c, d)
    one_row = torch.zeros(8, 3, device=kernel_device)[:, 0][None]  # (1, 8), column stride 3
    with pytest.raises(ValueError, match="^y must have unit column stride"):
        rank_update_(one_row, c[:1], d)
    with pytest.raises(ValueError, match="^c must have at most 128 columns"):
        rank_update_(*_rank_inputs(2, 4, 129, torch.float32, kernel_device))
    for bad in ((16, 24, 4), (16, 16), (16, 16, 64), (16, 16, 3)):
        with pytest.raises(ValueError, match="config must be"):
            rank_update_(y, c, d, config=bad)


def test_rank_update_with_shared_memory_takes_addmm(triton_mode, kernel_device):
    """``c`` or ``d`` a view into ``y`` (tiles would read what others wrote: ``y`` spans several tiles of the
    interpreter's 16 x 32 both ways): ``addmm_``'s result; ``c`` with a non-unit column stride (copied for the
    kernel): the formula."""
    from alignlab.kernels.lora_gemm import rank_update_

    torch.manual_seed(0)
    for which in ("c", "d"):
        y = torch.randn(40, 70, device=kernel_device)
        want = y.clone()
        if which == "c":
            c, d = y[:, :4], torch.randn(4, 70, device=kernel_device)
            want.addmm_(want[:, :4].clone(), d)
        else:
            c, d = torch.randn(40, 3, device=kernel_device), y[:3]
            want.addmm_(c, want[:3].clone())
        rank_update_(y, c, d)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5, msg=which)
    y, c, d = _rank_inputs(11, 30, 5, torch.float32, kernel_device)
    c = c.T.contiguous().T  # column stride 11
    want = y.double() + c.double() @ d.double()
    torch.testing.assert_close(rank_update_(y, c, d).double(), want, rtol=1e-5, atol=1e-5)


def test_rank_update_moves_the_version_counter_of_a_saved_tensor(triton_mode, kernel_device):
    """A graph that saved ``y`` refuses it after the update (as after ``addmm_``), instead of using the new values."""
    from alignlab.kernels.lora_gemm import rank_update_

    y, c, d = _rank_inputs(6, 10, 3, torch.float32, kernel_device)
    w = torch.randn(6, 10, device=kernel_device, requires_grad=True)
    loss = (w * y).sum()  # saves y for ∂/∂w
    rank_update_(y, c, d)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_rank_update_where_autograd_records_it(triton_mode, kernel_device):
    """An update autograd records (a factor that requires grad) takes ``addmm_``: its gradients are the formula's."""
    from alignlab.kernels.lora_gemm import rank_update_

    y0, c, d = _rank_inputs(6, 10, 3, torch.float32, kernel_device)
    c.requires_grad_()
    y = y0.clone()
    rank_update_(y, c, d)
    (gc,) = torch.autograd.grad(y.square().sum(), c)
    ref_c = c.detach().double().requires_grad_()
    (want,) = torch.autograd.grad((y0.double() + ref_c @ d.double()).square().sum(), ref_c)
    torch.testing.assert_close(gc.double(), want, rtol=1e-5, atol=1e-5)


def test_rank_update_reference_matches_formula():
    from alignlab.kernels.lora_gemm import rank_update_reference

    y, c, d = _rank_inputs(7, 9, 3, torch.bfloat16, "cpu")
    want = (y.double() + c.double() @ d.double()).to(torch.bfloat16)
    torch.testing.assert_close(rank_update_reference(y, c, d), want, rtol=0, atol=0.02)


@pytest.mark.cuda
@pytest.mark.parametrize("M,N,R", [(17, 4096, 16), (2048, 1024, 16), (300, 14336, 64), (129, 77, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rank_update_cuda(M, N, R, dtype):
    """On the GPU (the default tiles), bf16 and fp16: the exact sum rounded once, or one unit in the last place off it
    (the fp32 sums run in another order). One unit in the last place is at most ``eps`` of the value (2**-7 for bf16,
    2**-10 for fp16), and near a power of two it is that large."""
    from alignlab.kernels.lora_gemm import rank_update_

    y, c, d = _rank_inputs(M, N, R, dtype, "cuda", seed=N)
    want = (y.double() + c.double() @ d.double()).to(dtype).double()
    rank_update_(y, c, d)
    torch.testing.assert_close(y.double(), want, rtol=torch.finfo(dtype).eps, atol=1e-4)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_fused_layers_with_the_rank_update_kernel_match_the_addmm_form(dora, nf4, triton_mode, kernel_device,
                                                                       monkeypatch):
    """fused.RANK_UPDATE on: a fp16 LoRA / DoRA layer, dense or NF4 base, adds its rank-r term by rank_update_ in
    forward and for dx (two calls), and its output and gradients match the addmm_ form to fp16 rounding."""
    from alignlab.adapters import fused

    monkeypatch.setattr(fused, "LORA_GEMM", False)
    monkeypatch.setattr(fused, "WIDE_K", False)
    _switch_matches_the_default_form(*_fp16_layer(dora, nf4, kernel_device), monkeypatch, "rank_update_",
                                     "RANK_UPDATE", [(39, 48), (39, 64)])  # forward's y, then dx


@pytest.mark.parametrize("env, on", [(None, False), ("1", True), ("0", False)])
def test_rank_update_off_by_default_and_set_by_the_environment(env, on):
    out = printed_in_fresh_process("__import__('alignlab.adapters.fused').adapters.fused.RANK_UPDATE",
                                   {"ALIGNLAB_LORA_RANK_UPDATE": env})
    assert out == str(on)
