"""The decode-size LoRA kernels (``alignlab.kernels.lora_decode``) against their torch reference, and the fused
layer's no-grad decode path against its GEMM path. Triton's interpreter on CPU (tests/conftest.py switches it on
without a GPU; fp16 there: bf16 loads as raw integers), CUDA tests in bf16 and fp16."""

import pytest
import torch
from torch import nn

from conftest import printed_in_fresh_process

from alignlab.kernels.lora_decode import MAX_RANK, MAX_ROWS, lora_decode_add_, lora_decode_reference


def _case(m, k, n, r, dtype, device, factor_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    a = (torch.randn(r, k, generator=g) * k ** -0.5).to(device, factor_dtype)
    b = (torch.randn(n, r, generator=g) * 0.1).to(device, factor_dtype)
    y = torch.randn(m, n, generator=g).to(device, dtype)
    return x, a, b, y


def _reference_by_hand(y, x, a, b, s):
    """The formula in float64 from the factors rounded to y's dtype, xa rounded once."""
    c = y.dtype
    xa = (s * (x.double() @ a.to(c).double().T)).to(c)
    return (y.double() + xa.double() @ b.to(c).double().T).to(c)


@pytest.mark.parametrize("m, k, n, r", [(1, 64, 48, 16), (3, 300, 130, 8), (16, 257, 129, 1), (5, 40, 1, 3),
                                        (2, 1, 7, 16), (16, 40, 50, 64), (37, 300, 70, 16), (64, 100, 20, 64)])
@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.float16])
def test_kernels_match_the_reference_under_the_interpreter(m, k, n, r, factor_dtype, triton_mode, monkeypatch):
    """Odd sizes (not multiples of the blocks), one row, one output column, K = 1, rank 1."""
    from alignlab.kernels import lora_decode

    seen = []
    real = lora_decode.launch
    monkeypatch.setattr(lora_decode, "launch", lambda kernel, *args: seen.append(kernel) or real(kernel, *args))
    x, a, b, y = _case(m, k, n, r, torch.float16, "cpu", factor_dtype)
    want = lora_decode_reference(y, x, a, b, 0.7)
    got = lora_decode_add_(y.clone(), x, a, b, 0.7)
    assert seen == [lora_decode._lora_down_kernel, lora_decode._lora_up_kernel]
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got, _reference_by_hand(y, x, a, b, 0.7), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("m, n, r", [(0, 48, 4), (3, 0, 4), (3, 48, 0)], ids=["no-rows", "no-outputs", "rank-0"])
def test_empty_rows_outputs_or_rank(m, n, r, triton_mode):
    """No rows, no output columns or rank 0: the reference's result exactly (y unchanged at rank 0), in place."""
    x, a, b, y = _case(m, 64, n, r, torch.float16, "cpu")
    want = lora_decode_reference(y, x, a, b, 0.7)
    out = y.clone()
    assert lora_decode_add_(out, x, a, b, 0.7) is out and out.shape == (m, n)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    if r == 0:
        torch.testing.assert_close(out, y, rtol=0, atol=0)


def test_reference_is_the_formula():
    x, a, b, y = _case(4, 70, 33, 5, torch.bfloat16, "cpu")
    torch.testing.assert_close(lora_decode_reference(y, x, a, b, 2.0), _reference_by_hand(y, x, a, b, 2.0),
                               rtol=0, atol=0)


def test_in_place_on_the_given_output_and_strided_inputs(triton_mode):
    x, a, b, y = _case(3, 96, 40, 4, torch.float16, "cpu")
    xs = torch.stack([x, x], -1)[..., 0]  # a non-unit column stride
    assert xs.stride(-1) != 1 and torch.equal(xs, x)
    out = y.clone()
    assert lora_decode_add_(out, xs, a.T.contiguous().T, b, 1.5) is out  # a given with a non-contiguous layout
    torch.testing.assert_close(out, lora_decode_reference(y, x, a, b, 1.5), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("rows, rank", [(MAX_ROWS + 1, 4), (2, MAX_RANK + 1)])
def test_more_rows_or_rank_than_the_kernels_take_use_the_reference(rows, rank, triton_mode):
    x, a, b, y = _case(rows, 32, 24, rank, torch.float16, "cpu")
    got = lora_decode_add_(y.clone(), x, a, b, 1.0)
    torch.testing.assert_close(got, lora_decode_reference(y, x, a, b, 1.0), rtol=0, atol=0)


def _layer(rows_seed, base=None):
    from alignlab.adapters import LoRALinear

    torch.manual_seed(rows_seed)
    layer = LoRALinear(base if base is not None else nn.Linear(64, 48, dtype=torch.float16), r=8, alpha=16)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    return layer


def _step(layer, x, create_graph=False):
    """Output and the gradients of x, A, B for a weighted sum of the output (a second derivative with create_graph:
    the gradients of ``|∂L/∂x|²`` instead)."""
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    w = torch.linspace(-1, 1, y.shape[-1], device=y.device)
    loss = (y.float() * w).sum()
    if create_graph:
        (gx,) = torch.autograd.grad(loss, xg, create_graph=True)
        loss = gx.float().square().sum()
    loss.backward()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    grads = [xg.grad, a.grad, b.grad]
    layer.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize("rows", [1, 4])
def test_fused_layer_decode_path_with_and_without_grad(rows, triton_mode, monkeypatch):
    """A LoRA layer on an fp16 ``nn.Linear`` at decode rows takes the kernels with and without a gradient (no factor
    cast; the same output bits either way); with them off it takes the GEMMs: the same output and gradients to
    rounding, and the gradients the formula's in float64."""
    from alignlab.adapters import fused

    layer = _layer(rows)
    x = torch.randn(2, rows, 64, dtype=torch.float16)
    calls = []
    real = fused.lora_decode_add_xa
    monkeypatch.setattr(fused, "lora_decode_add_xa", lambda *args: calls.append(args[1].requires_grad) or real(*args))
    with torch.no_grad():
        y_nograd = layer(x)
        assert calls == [False] and "default" not in layer._casts
    y, grads = _step(layer, x)
    assert calls == [False, True]
    torch.testing.assert_close(y, y_nograd, rtol=0, atol=0)
    monkeypatch.setattr(fused, "DECODE_KERNELS", False)
    y_gemm, grads_gemm = _step(layer, x)
    assert len(calls) == 2
    torch.testing.assert_close(y, y_gemm, rtol=2e-3, atol=2e-3)
    for got, want in zip(grads, grads_gemm):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    # ∂L/∂x = dy (W + s B A), ∂L/∂A = s (dy B)ᵀ x, ∂L/∂B = s dyᵀ (x Aᵀ), in float64 from the fp16-rounded factors
    s = layer.scaling["default"]
    w64 = layer.base_layer.weight.double()
    a64 = layer.lora_A["default"].weight.half().double()
    b64 = layer.lora_B["default"].weight.half().double()
    dy = torch.linspace(-1, 1, 48, dtype=torch.float64).expand(2 * rows, 48)
    x64 = x.reshape(-1, 64).double()
    want = [(dy @ (w64 + s * b64 @ a64)).view(x.shape), s * (dy @ b64).T @ x64, s * dy.T @ (x64 @ a64.T)]
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got.double(), ref, rtol=1e-2, atol=1e-2)


def test_fused_layer_decode_path_second_derivative(triton_mode, monkeypatch):
    """``create_graph=True`` through the decode path: the same second derivatives as through the GEMM path."""
    from alignlab.adapters import fused

    layer = _layer(3)
    x = torch.randn(3, 64, dtype=torch.float16)
    _, grads = _step(layer, x, create_graph=True)
    monkeypatch.setattr(fused, "DECODE_KERNELS", False)
    _, grads_gemm = _step(layer, x, create_graph=True)
    assert grads[0] is None and grads_gemm[0] is None  # ∂L/∂x = dy (W + s B A) does not depend on x
    for got, want in zip(grads[1:], grads_gemm[1:]):
        assert got is not None and got.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("what", ["frozen factors", "frozen input", "trained base"])
def test_fused_layer_decode_path_gradients_of_what_trains(what, triton_mode, monkeypatch):
    """Only the tensors that train get gradients on the decode path; a dense base weight that trains takes the GEMM
    path (its gradient needs the full products)."""
    from alignlab.adapters import fused

    layer = _layer(5)
    if what == "frozen factors":
        layer.requires_grad_(False)
    elif what == "trained base":
        layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(2, 64, dtype=torch.float16, requires_grad=what != "frozen input")
    calls = []
    real = fused.lora_decode_add_xa
    monkeypatch.setattr(fused, "lora_decode_add_xa", lambda *args: calls.append(1) or real(*args))
    layer(x).float().sum().backward()
    a = layer.lora_A["default"].weight
    assert (x.grad is not None) == (what != "frozen input")
    assert (a.grad is not None) == (what != "frozen factors")
    assert bool(calls) == (what != "trained base")
    assert (layer.base_layer.weight.grad is not None) == (what == "trained base")


@pytest.mark.parametrize("epilogue", [True, False], ids=["rank_epilogue", "up_kernel"])
def test_qlora_layer_decode_path_with_grad_under_the_interpreter(epilogue, triton_mode, monkeypatch):
    """The same over an NF4 base (the packed weight read by the small-M kernels, interpreted on CPU), with the rank
    term in the NF4 kernel's epilogue (opt-in, RANK_EPILOGUE) and by the up kernel: the same output bits with and
    without grad, the GEMM path's output and gradients to rounding."""
    from alignlab.adapters import fused
    from alignlab.quant import NF4Linear

    monkeypatch.setattr(fused, "RANK_EPILOGUE", epilogue)
    calls = []
    real = fused.rank_matmul
    monkeypatch.setattr(fused, "rank_matmul", lambda *args: calls.append(1) or real(*args))
    torch.manual_seed(0)
    layer = _layer(7, NF4Linear.from_linear(nn.Linear(64, 48, dtype=torch.float16), compute_dtype=torch.float16))
    x = torch.randn(2, 64, dtype=torch.float16)
    with torch.no_grad():
        y_nograd = layer(x)
    y, grads = _step(layer, x)
    assert len(calls) == (2 if epilogue else 0)
    torch.testing.assert_close(y, y_nograd, rtol=0, atol=0)
    monkeypatch.setattr(fused, "DECODE_KERNELS", False)
    y_gemm, grads_gemm = _step(layer, x)
    torch.testing.assert_close(y, y_gemm, rtol=2e-3, atol=2e-3)
    for got, want in zip(grads, grads_gemm):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("m,k,r", [(1, 1000, 16), (5, 4160, 7), (16, 777, 64), (2, 40, 1), (3, 20000, 16),
                                   (16, 2000, 64), (33, 3000, 16)])
@pytest.mark.parametrize("programs", [None, 3])
def test_split_down_kernel_is_the_formula(m, k, r, programs, triton_mode, monkeypatch):
    """``down_`` (the down kernel: K sliced over up to 64 programs, the partials added in a fixed order): the float64
    formula ``c(s·x A_cᵀ)`` to rounding, over slices that end in a partial block, one program and many (more than one
    chunk of partials at 16 rows and rank 64), slices of several steps (``programs=3``), the largest rank; the same
    bits on a repeat (deterministic)."""
    from alignlab.kernels import lora_decode
    from alignlab.kernels.lora_decode import _split_layout, down_

    if programs:
        monkeypatch.setattr(lora_decode, "DOWN_PROGRAMS", programs)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g).half()
    a = torch.randn(r, k, generator=g) / k ** 0.5
    xa = down_(x, a, 0.75)
    want = (x.double() @ a.half().double().T) * 0.75
    assert xa.dtype == torch.float16 and xa.shape == (m, r)
    torch.testing.assert_close(xa.double(), want, rtol=2e-3, atol=2e-3)
    assert torch.equal(down_(x, a, 0.75), xa)
    assert (_split_layout(m, k, r)[-1] > 1) == (k > 256)  # several programs wherever K spans several slices


@pytest.mark.parametrize("rows,r,bias", [(1, 16, False), (3, 5, True), (16, 1, True), (9, 64, False)])
def test_qlora_decode_product_with_the_rank_epilogue_is_the_formula(rows, r, bias, triton_mode, monkeypatch):
    """The decode product over an NF4 base with the rank term in the NF4 kernel's epilogue (interpreted on CPU):
    ``x Wᵀ + bias + c(s·x A_cᵀ) c(B)ᵀ``, one rounding, against float64 (fp32 master factors; an odd rank, rank 1 and
    the largest; rows 1 (GEMV) and 3 / 9 / 16 (tl.dot)); the first kernel's ``xa`` bit for bit the down kernel's."""
    from alignlab.adapters import fused
    from alignlab.kernels.lora_decode import down_
    from alignlab.quant import NF4Linear

    monkeypatch.setattr(fused, "RANK_EPILOGUE", True)
    g = torch.Generator().manual_seed(rows + r)
    base = NF4Linear.from_linear(nn.Linear(128, 40, bias=bias, dtype=torch.float16), compute_dtype=torch.float16)
    t = base.quant_weight
    x = torch.randn(rows, 128, generator=g).half()
    a, b = torch.randn(r, 128, generator=g) / 8, torch.randn(40, r, generator=g) / 4
    assert fused._rank_epilogue(x, t, b)
    y, xa = fused._decode_product(x, t, base.bias, a, b, 0.5)
    assert y.dtype == torch.float16 and y.shape == (rows, 40)
    torch.testing.assert_close(xa, down_(x, a, 0.5), rtol=0, atol=0)
    xa64 = (x.double() @ a.half().double().T * 0.5).half().double()
    torch.testing.assert_close(xa.double(), xa64, rtol=2e-3, atol=2e-3)
    from alignlab.quant.nf4 import nf4_dequantize

    want = x.double() @ nf4_dequantize(t, torch.float32).double().T + xa.double() @ b.half().double().T
    if bias:
        want += base.bias.half().double()
    torch.testing.assert_close(y.double(), want, rtol=2e-3, atol=2e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, k, n, r", [(1, 4096, 4096, 16), (7, 4096, 1024, 16), (16, 14336, 4096, 64),
                                        (3, 257, 129, 5), (33, 4096, 1024, 16), (64, 14336, 4096, 64)])
@pytest.mark.parametrize("programs", [None, 4])
def test_kernels_match_the_reference_on_cuda(m, k, n, r, dtype, programs, monkeypatch):
    from alignlab.kernels import lora_decode

    if programs:  # slices of several 256-column steps each
        monkeypatch.setattr(lora_decode, "DOWN_PROGRAMS", programs)
    x, a, b, y = _case(m, k, n, r, dtype, "cuda")
    got = lora_decode_add_(y.clone(), x, a, b, 2.0)
    want = lora_decode_reference(y, x, a, b, 2.0)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    exact = _reference_by_hand(y, x, a, b, 2.0)
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)  # one rounding of the result (xa's may flip too)
    assert ((got.double() - exact.double()).abs() <= 2 * ulp * exact.double().abs() + 1e-2).all()


@pytest.mark.cuda
def test_qlora_generation_step_takes_the_kernels_and_matches_the_gemm_path(monkeypatch):
    """An NF4 base with a LoRA adapter under ``no_grad`` at one row: kernels on vs off, bf16."""
    from alignlab.adapters import LoRALinear, fused
    from alignlab.quant import NF4Linear

    torch.manual_seed(0)
    layer = LoRALinear(NF4Linear.from_linear(nn.Linear(512, 384, device="cuda", dtype=torch.bfloat16)), r=16,
                       alpha=32)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    x = torch.randn(4, 1, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got = [layer(x) for _ in range(3)]
        monkeypatch.setattr(fused, "DECODE_KERNELS", False)
        want = layer(x)
    for g in got:
        torch.testing.assert_close(g, want, rtol=2e-2, atol=2e-2)
        assert torch.equal(g, got[0])  # deterministic (the split kernel adds its partials in a fixed order)


def _qlora_cuda(seed=0, bias=False, dtype=torch.bfloat16, dense=False):
    """A LoRA layer on an NF4 base in ``dtype`` (its compute dtype: x's, so the fused path), or on a frozen dense
    ``nn.Linear`` in ``dtype`` with ``dense``."""
    from alignlab.adapters import LoRALinear
    from alignlab.quant import NF4Linear

    torch.manual_seed(seed)
    linear = nn.Linear(512, 384, bias=bias, device="cuda", dtype=dtype).requires_grad_(False)
    layer = LoRALinear(linear if dense else NF4Linear.from_linear(linear, compute_dtype=dtype), r=16, alpha=32)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    return layer


def _unkept(layer, x):
    """The layer's decode product without its kept launchers for the rank-r term (the same kernels, launched as
    lora_decode_add_ launches them)."""
    from alignlab.adapters import fused

    base = layer.base_layer
    weight = base.weight if type(base) is nn.Linear else base.quant_weight
    with torch.no_grad():
        return fused._decode_product(x, weight, base.bias, layer.lora_A["default"].weight,
                                     layer.lora_B["default"].weight, layer.scaling["default"])[0]


# the bases whose decode calls go through kept launchers: NF4 with and without the rank-term epilogue, dense
_KEPT_BASES = pytest.mark.parametrize("dense,epilogue", [(False, False), (False, True), (True, False)],
                                      ids=["nf4_up_kernel", "nf4_rank_epilogue", "dense"])


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(1, 512), (4, 1, 512), (16, 512)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@_KEPT_BASES
def test_qlora_decode_launchers_kept_per_layout_with_and_without_grad(shape, bias, dtype, dense, epilogue,
                                                                       monkeypatch):
    """A (Q)LoRA layer at decode rows keeps its launchers per input layout (the kept launchers off: none kept): the
    same output bits with and without grad and without the launchers, the same gradients."""
    from alignlab.adapters import fused
    from alignlab.quant import linear

    monkeypatch.setattr(fused, "DECODE_RUNNERS", True)
    monkeypatch.setattr(fused, "RANK_EPILOGUE", epilogue)
    layer = _qlora_cuda(bias=bias, dtype=dtype, dense=dense)
    x = torch.randn(shape, device="cuda", dtype=dtype)

    def calls():
        with torch.no_grad():
            outs = [layer(x) for _ in range(3)]
        y, grads = _step(layer, x)
        return outs, y, grads

    monkeypatch.setattr(linear, "DECODE_LAUNCHERS", False)
    ref = calls()
    assert not layer._decode_runs
    monkeypatch.setattr(linear, "DECODE_LAUNCHERS", True)
    got = calls()
    (entry,) = layer._decode_runs.values()
    assert entry[-1] is not None  # a runner was kept
    for y in [*got[0], got[1], ref[1]]:
        torch.testing.assert_close(y, ref[0][0], rtol=0, atol=0)
    for g, want in zip(got[2], ref[2]):
        torch.testing.assert_close(g, want, rtol=0, atol=0)
    monkeypatch.setattr(fused, "decode_runner", None)  # a rebuild would raise now: the kept runner serves the calls
    again = calls()
    for y in [*again[0], again[1]]:
        torch.testing.assert_close(y, ref[0][0], rtol=0, atol=0)
    # and the GEMM path (decode kernels off): the same output and gradients to rounding
    monkeypatch.setattr(fused, "DECODE_KERNELS", False)
    gemm = calls()
    torch.testing.assert_close(gemm[1], got[1], rtol=2e-2, atol=2e-2)
    for g, want in zip(got[2], gemm[2]):
        torch.testing.assert_close(g, want, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@_KEPT_BASES
def test_a_call_that_builds_the_launchers_makes_each_product_once(grad, dtype, dense, epilogue, monkeypatch):
    """The call that binds a layout's launchers (its first, or any after they were dropped: a new packed weight as
    FSDP2's re-allocated storage gives) launches the same kernels as a call through kept ones, not the base product
    two or three times over, and returns the same bits."""
    from torch.profiler import ProfilerActivity, profile

    from alignlab.adapters import fused

    monkeypatch.setattr(fused, "DECODE_RUNNERS", True)
    monkeypatch.setattr(fused, "RANK_EPILOGUE", epilogue)
    layer = _qlora_cuda(2, dtype=dtype, dense=dense)
    x = torch.randn(3, 512, device="cuda", dtype=dtype, requires_grad=grad)

    def kernels():
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            with torch.set_grad_enabled(grad):
                y = layer(x)
            torch.cuda.synchronize()
        # products only: copies, memsets and fills left out (where this test is the first of its process to launch a
        # split-K kernel, its first call also zero-fills the process's pool of arrival counters, once: seen in a
        # `pytest -m cuda -n 8` run on an H100, whose tests xdist hands to workers one by one)
        names = sorted(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                       and "emcpy" not in e.name and "emset" not in e.name and "FillFunctor" not in e.name)
        return y.detach(), names

    first = kernels()  # compiles and binds
    kept = kernels()
    layer._decode_runs.clear()  # rebinds over the kept base launcher
    rebound = kernels()
    if not dense:
        layer.base_layer.quant_weight.__dict__.pop("_runners", None)  # rebinds the base launcher too
    fresh = kernels()
    assert kept[1], "no kernel seen"
    for y, names in (first, rebound, fresh):
        assert names == kept[1]
        torch.testing.assert_close(y, kept[0], rtol=0, atol=0)


@pytest.mark.cuda
@_KEPT_BASES
def test_qlora_decode_launchers_follow_the_factors_the_scale_the_stream_and_copies(dense, epilogue, monkeypatch):
    """The kept launchers read the factors through their addresses: an in-place update shows; a factor at a new
    address, a new scale, another stream each get a launcher of their own; a deepcopy computes with its own tensors
    and pickles (the launchers stay behind); deleting the adapter drops them. A dense base weight is read as it is
    (an in-place write, a new ``.data`` of its shape); one of another shape is a ValueError, not a stray write."""
    import copy
    import pickle

    from alignlab.adapters import fused

    monkeypatch.setattr(fused, "DECODE_RUNNERS", True)
    monkeypatch.setattr(fused, "RANK_EPILOGUE", epilogue)
    layer = _qlora_cuda(1, bias=True, dense=dense)
    x = torch.randn(2, 512, device="cuda", dtype=torch.bfloat16)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(layer(x), _unkept(layer, x), rtol=0, atol=0)
        a.add_(0.01)  # an optimizer step: same tensor, same address
        torch.testing.assert_close(layer(x), _unkept(layer, x), rtol=0, atol=0)
        a.data = a.data.clone() * 2  # a new address
        torch.testing.assert_close(layer(x), _unkept(layer, x), rtol=0, atol=0)
        layer.scaling["default"] = 0.5
        torch.testing.assert_close(layer(x), _unkept(layer, x), rtol=0, atol=0)
        base = layer.base_layer  # a bias replaced by another of the same dtype (load_state_dict(assign=True))
        base.bias = nn.Parameter(torch.randn(384, device="cuda", dtype=torch.bfloat16), requires_grad=False)
        torch.testing.assert_close(layer(x), _unkept(layer, x), rtol=0, atol=0)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())  # x and the factors were written on the default stream
        with torch.cuda.stream(stream):
            y = layer(x)
            torch.testing.assert_close(y, _unkept(layer, x), rtol=0, atol=0)
        torch.cuda.synchronize()
        assert len(layer._decode_runs) == 2  # this stream's and the default stream's
        twin = copy.deepcopy(layer)
        assert not twin._decode_runs
        twin.lora_B["default"].weight.mul_(-1)
        torch.testing.assert_close(twin(x), _unkept(twin, x), rtol=0, atol=0)
        torch.testing.assert_close(layer(x), _unkept(layer, x), rtol=0, atol=0)
        assert not torch.equal(twin(x), layer(x))
        again = pickle.loads(pickle.dumps(layer))
        torch.testing.assert_close(again(x), layer(x), rtol=0, atol=0)
        if dense:
            w = layer.base_layer.weight
            w.mul_(-1)
            torch.testing.assert_close(layer(x), _unkept(layer, x), rtol=0, atol=0)
            w.data = w.data.clone() * 2
            torch.testing.assert_close(layer(x), _unkept(layer, x), rtol=0, atol=0)
            layer.base_layer.bias = None
            torch.testing.assert_close(layer(x), _unkept(layer, x), rtol=0, atol=0)  # kept for the no-bias key
            w.data = w.data[:200].clone()
            with pytest.raises(ValueError, match="the base weight now has 200 outputs, its adapter 384"):
                layer(x)  # the kept runner checks before its up kernel writes 384 columns
            layer._decode_runs.clear()
            with pytest.raises(ValueError, match=r"b must be \(out, r\) = \(200, 16\)"):
                layer(x)  # none is built over the mismatch: lora_linear names it
    layer.delete_adapter("default")
    assert not layer._decode_runs


@pytest.mark.cuda
@pytest.mark.parametrize("dense", [False, True], ids=["nf4", "dense"])
def test_a_kept_runner_is_looked_up_first_and_passed_by_what_its_key_does_not_fix(dense, monkeypatch):
    """A call whose layout has a kept runner goes straight to it (with and without grad); what can change without
    changing the runner's key sends calls past it: the decode kernels or the kept runners switched off, the base's
    compute dtype changed under an input of the old one, a bias or a dense base weight that starts to train (which
    then gets its gradient)."""
    from alignlab.adapters import fused
    from alignlab.quant import linear

    layer = _qlora_cuda(4, bias=True, dense=dense)
    x = torch.randn(2, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = layer(x)
    assert layer._decode_runs and torch.equal(layer(x.requires_grad_(False)), want)

    def kept_runner(xx):
        raise AssertionError("kept runner called")

    for key, entry in list(layer._decode_runs.items()):
        layer._decode_runs[key] = (*entry[:-1], kept_runner)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(AssertionError, match="kept runner called"):
            layer(x.detach().requires_grad_(grad))
    for module, switch in ((fused, "DECODE_KERNELS"), (fused, "DECODE_RUNNERS"), (linear, "DECODE_LAUNCHERS")):
        with monkeypatch.context() as m:
            m.setattr(module, switch, False)
            with torch.no_grad():
                torch.testing.assert_close(layer(x), want, rtol=2e-2, atol=2e-2)
    base = layer.base_layer
    if not dense:
        with monkeypatch.context() as m:
            m.setattr(base, "compute_dtype", torch.float16)
            with torch.no_grad():
                torch.testing.assert_close(layer(x).float(), want.float(), rtol=2e-2, atol=2e-2)
    else:
        base.weight.requires_grad_(True)
        with torch.no_grad():  # no gradient needed: the runner still serves the call
            with pytest.raises(AssertionError, match="kept runner called"):
                layer(x)
        y = layer(x.detach().requires_grad_(True))
        y.float().sum().backward()
        torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(base.weight.grad.float(), x.float().sum(0).expand(384, -1).contiguous(),
                                   rtol=2e-2, atol=2e-2)
        base.weight.requires_grad_(False)
    base.bias.requires_grad_(True)
    y = layer(x.detach().requires_grad_(True))
    y.float().sum().backward()
    torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(base.bias.grad.float(), torch.full((384,), 2.0, device="cuda"))


def test_kept_launchers_are_dropped_by_moves_and_left_out_of_copies():
    """A device move or cast drops the kept launchers (they hold the old tensors); copies and pickles leave them out,
    and a compiled layer's copy does not run the original's compiled call."""
    import copy
    import pickle

    layer = _layer(11)
    layer._decode_runs[("default", "a layout")] = ("kept", "tensors")  # what a CUDA call would have kept
    assert copy.deepcopy(layer)._decode_runs == {}
    assert pickle.loads(pickle.dumps(layer))._decode_runs == {}
    layer.cpu()
    assert layer._decode_runs == {}
    layer.compile()
    twin = copy.deepcopy(layer)
    assert getattr(twin, "_compiled_call_impl", None) is None
    pickle.dumps(layer)  # a compiled layer pickles (nn.Module leaves its compiled call out)


@pytest.mark.parametrize("env, on", [(None, True), ("0", False), ("1", True)])
def test_kept_qlora_launchers_on_by_default_and_switched_off_by_the_environment(env, on):
    """A QLoRA layer keeps its decode launchers unless ``ALIGNLAB_LORA_DECODE_RUNNERS=0``."""
    out = printed_in_fresh_process("__import__('alignlab.adapters.fused').adapters.fused.DECODE_RUNNERS",
                                   {"ALIGNLAB_LORA_DECODE_RUNNERS": env})
    assert out == str(on)


@pytest.mark.parametrize("env, on", [(None, True), ("0", False)])
def test_on_by_default_and_switched_off_by_the_environment(env, on):
    """``ALIGNLAB_LORA_DECODE=0`` turns the decode kernels off for the process, read once at import."""
    out = printed_in_fresh_process("__import__('alignlab.adapters.fused').adapters.fused.DECODE_KERNELS",
                                   {"ALIGNLAB_LORA_DECODE": env})
    assert out == str(on)


@pytest.mark.parametrize("env, on", [(None, True), ("0", False), ("off", False)])
def test_rank_epilogue_on_by_default_and_switched_off_by_the_environment(env, on):
    """A QLoRA decode call adds its rank term in the NF4 kernel's epilogue unless ``ALIGNLAB_LORA_RANK_EPILOGUE=0``."""
    out = printed_in_fresh_process("__import__('alignlab.adapters.fused').adapters.fused.RANK_EPILOGUE",
                                   {"ALIGNLAB_LORA_RANK_EPILOGUE": env})
    assert out == str(on)


@pytest.mark.parametrize("env, on", [(None, True), ("0", False)])
def test_rank_overlap_on_by_default_and_switched_off_by_the_environment(env, on):
    """The NF4 product starts alongside the down kernel (where the GPU takes dependent launches) unless
    ``ALIGNLAB_LORA_RANK_OVERLAP=0``."""
    out = printed_in_fresh_process("__import__('alignlab.kernels.nf4_small').kernels.nf4_small.RANK_OVERLAP",
                                   {"ALIGNLAB_LORA_RANK_OVERLAP": env})
    assert out == str(on)


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 7, 16, 33, 64])
def test_rank_overlap_gives_the_same_bits_eagerly_and_in_a_cuda_graph(rows, monkeypatch):
    """``nf4_small.RANK_OVERLAP``: the NF4 product launched as a programmatic dependent of the down kernel, its K loop
    running alongside and its epilogue waiting for ``xa``. The outputs are the same bits as without it, over many
    layers called back to back (a missed wait would read a stale or half-written ``xa``; so would shared workspace
    or counters), with kept launchers, without them, and replayed from a CUDA graph."""
    from alignlab.adapters import fused
    from alignlab.kernels import launch, nf4_small

    if not launch.dependent_launch(torch.cuda.current_device()):
        pytest.skip("programmatic dependent launch needs compute capability 9.0 and a Triton with launch_pdl")
    monkeypatch.setattr(fused, "RANK_EPILOGUE", True)
    layers = [_qlora_cuda(seed=i, bias=i % 2 == 1) for i in range(6)]
    xs = [torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16) for _ in layers]

    def run():
        with torch.no_grad():
            return [layer(x) for layer, x in zip(layers, xs)]

    monkeypatch.setattr(nf4_small, "RANK_OVERLAP", False)
    want = run()
    monkeypatch.setattr(nf4_small, "RANK_OVERLAP", True)
    for layer in layers:
        layer._decode_runs.clear()
    for _ in range(20):  # first calls bind the launchers; later ones take them
        for got, ref in zip(run(), want):
            assert torch.equal(got, ref)
    for layer, x, ref in zip(layers, xs, want):
        assert torch.equal(_unkept(layer, x), ref)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        for got, ref in zip(outs, want):
            assert torch.equal(got, ref)


def test_public_entry_points_check_shapes_and_take_leading_dims(triton_mode):
    """``lora_decode_add_`` and ``down_`` read their operands as given: shapes that do not fit gave wrong numbers (or
    reads past a buffer on a GPU) without an error, where the reference path raised. Now a ValueError names them;
    ``down_`` takes ``x (..., K)`` as the reference did; x in another dtype than y takes the reference path (the up
    kernel multiplies them together)."""
    from alignlab.kernels.lora_decode import down_

    x, a, b, y = _case(4, 300, 40, 8, torch.float16, "cpu")
    bad = [((torch.zeros(6, 40, dtype=torch.float16), x, a, b), "y"),  # y's rows
           ((y, x, a, torch.randn(40, 4)), "b must be"),  # b's rank
           ((y, x, torch.randn(8, 200), b), "same K"),  # a's K
           ((y, x.view(2, 2, 300), a, b), "x must be"),
           ((y, x, a, "b"), "b must be a tensor")]
    for args, match in bad:
        with pytest.raises((ValueError, TypeError), match=match):
            lora_decode_add_(*args, 1.0)
    with pytest.raises(ValueError, match="same K"):
        down_(x, torch.randn(8, 200), 1.0)
    xa3 = down_(x.view(2, 2, 300), a, 0.5)
    assert xa3.shape == (2, 2, 8) and torch.equal(xa3.view(4, 8), down_(x, a, 0.5))
    got = lora_decode_add_(y.clone().float(), x, a, b, 0.7)  # fp16 x into an fp32 y: the reference, no kernel
    torch.testing.assert_close(got, lora_decode_reference(y.float(), x, a, b, 0.7), rtol=0, atol=0)
