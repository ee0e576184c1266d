"""``lora_linear`` / ``dora_linear`` called directly with a compute dtype other than the dense weight's, or
under ``torch.autocast``: they raised 'self and mat2 must have the same dtype' (a 16-bit product added into
by an fp32 epilogue). Under autocast they now compute in and return the autocast dtype, as ``F.linear``;
an explicit ``dtype`` wins, and the output is then in ``x``'s dtype."""

import pytest
import torch

from alignlab.adapters.fused import dora_linear, lora_linear
from alignlab.quant.nf4 import nf4_dequantize, nf4_quantize


def _leaves(dora: bool, out_f: int = 12, in_f: int = 64, r: int = 3, tokens=(2, 5)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*tokens, in_f, generator=g).requires_grad_()
    w = torch.randn(out_f, in_f, generator=g) / 4
    bias = torch.randn(out_f, generator=g)
    a = (torch.randn(r, in_f, generator=g) / 3).requires_grad_()
    b = (torch.randn(out_f, r, generator=g) / 3).requires_grad_()
    m = (w.norm(dim=1) * 1.1).requires_grad_() if dora else None
    return x, w, bias, a, b, m


def _oracle(x, w, bias, a, b, s, m, dtype, gy=None):
    """The formula in float64 from operands rounded to the compute dtype (what a product in ``dtype`` with
    fp32 accumulation approximates), with DoRA's norm detached. With ``gy``: also the float64 gradients
    of ``x, w, a, b, m`` (m: where given)."""
    x, w, a, b = (t.detach().to(dtype).double().requires_grad_() for t in (x, w, a, b))
    md = None if m is None else m.detach().double().requires_grad_()
    v = w + s * b @ a
    if md is not None:
        v = md[:, None] * v / v.norm(dim=1, keepdim=True).detach()
    y = x @ v.T + bias.double()
    if gy is None:
        return y
    leaves = [x, w, a, b] + ([md] if md is not None else [])
    return y, dict(zip("xwabm", torch.autograd.grad(y, leaves, gy.double())))


def _call(dora, x, w, bias, a, b, s, m, dtype=None):
    if dora:
        return dora_linear(x, w, bias, a, b, s, m, dtype)
    return lora_linear(x, w, bias, a, b, s, dtype)


def _close(got, want, rel):
    """Norm-wise relative error: per-element tolerances mislead on 16-bit sums that cancel to near 0."""
    err = (got.double() - want).norm() / want.norm().clamp_min(1e-12)
    assert err < rel, f"relative error {err:.2e} >= {rel}"


def _check(y, grads, gy, names, operands, dtype, rel=(1e-2, 2e-2)):
    """``y`` and the gradients of the leaves ``names`` (from "xwabm") against :func:`_oracle` in ``dtype``;
    ``rel``: the norm-wise tolerances of the output and of the gradients."""
    ref, ref_grads = _oracle(*operands, dtype, gy)
    _close(y, ref, rel[0])
    for got, name in zip(grads, names):
        assert got.dtype == torch.float32  # fp32 leaves get fp32 gradients whatever the compute dtype
        _close(got, ref_grads[name], rel[1])


def _grads(y, leaves):
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    return y, torch.autograd.grad(y, leaves, gy.to(y.device)), gy


@pytest.mark.parametrize("dora", [False, True])
def test_fp32_weight_under_bf16_autocast_follows_autocast(dora):
    x, w, bias, a, b, m = _leaves(dora)
    leaves = [t for t in (x, a, b, m) if t is not None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, grads, gy = _grads(_call(dora, x, w, bias, a, b, 2.0, m), leaves)
    assert y.dtype == torch.bfloat16  # as F.linear under autocast
    _check(y, grads, gy, "xabm", (x, w, bias, a, b, 2.0, m), torch.bfloat16)


@pytest.mark.parametrize("dora", [False, True])
def test_explicit_dtype_casts_a_dense_weight_and_returns_x_dtype(dora):
    x, w, bias, a, b, m = _leaves(dora)
    w.requires_grad_()  # a trainable dense weight gets its gradient in its own dtype
    leaves = [t for t in (x, w, a, b, m) if t is not None]
    y, grads, gy = _grads(_call(dora, x, w, bias, a, b, 0.5, m, torch.bfloat16), leaves)
    assert y.dtype == torch.float32
    _check(y, grads, gy, "xwabm", (x, w, bias, a, b, 0.5, m), torch.bfloat16)


@pytest.mark.parametrize("dora", [False, True])
def test_explicit_fp32_under_bf16_autocast_is_exact_fp32(dora):
    x, w, bias, a, b, m = _leaves(dora)
    leaves = [t for t in (x, a, b, m) if t is not None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, grads, gy = _grads(_call(dora, x, w, bias, a, b, 2.0, m, torch.float32), leaves)
    assert y.dtype == torch.float32
    _check(y, grads, gy, "xabm", (x, w, bias, a, b, 2.0, m), torch.float32, rel=(1e-6, 1e-5))  # no bf16 product


@pytest.mark.parametrize("dora", [False, True])
def test_float64_is_left_alone_by_autocast(dora):
    x, w, bias, a, b, m = _leaves(dora)
    x, w, bias = x.detach().double().requires_grad_(), w.double(), bias.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _call(dora, x, w, bias, a, b, 2.0, m)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, _oracle(x, w, bias, a, b, 2.0, m, torch.float64), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("rows", [1, 20])  # the small-M kernels and dequantize + matmul
def test_nf4_weight_under_autocast(kernel_mode, kernel_device, dora, rows):
    # the interpreter cannot run a bf16 tl.dot (DoRA's row norm): fp16 there, bf16 on the torch path / a GPU
    dtype = torch.float16 if kernel_mode == "triton" and kernel_device == "cpu" else torch.bfloat16
    x, w, bias, a, b, m = (t if t is None else t.detach().to(kernel_device).requires_grad_(t.requires_grad)
                           for t in _leaves(dora, tokens=(rows,)))
    t = nf4_quantize(w, blocksize=32)
    leaves = [t_ for t_ in (x, a, b, m) if t_ is not None]
    with torch.autocast(kernel_device, dtype=dtype):
        y, grads, gy = _grads(_call(dora, x, t, bias, a, b, 2.0, m), leaves)
    assert y.dtype == dtype
    cpu = lambda v: None if v is None else v.cpu()  # noqa: E731
    _check(y.cpu(), [g.cpu() for g in grads], gy.cpu(), "xabm",
           (*map(cpu, (x, nf4_dequantize(t, torch.float32), bias, a, b)), 2.0, cpu(m)), dtype)


@pytest.mark.parametrize("dora", [False, True])
def test_compiled_call_under_autocast_matches_eager(dora):
    """torch.compile traces backward with the forward's autocast state: the autocast-off region in backward
    must be traceable (a recursive call into the autograd function was not)."""
    x, w, bias, a, b, m = _leaves(dora)
    leaves = [t for t in (x, a, b, m) if t is not None]
    fn = torch.compile(lambda x: _call(dora, x, w, bias, a, b, 2.0, m), fullgraph=True, backend="eager")
    results = []
    for f in (fn, lambda x: _call(dora, x, w, bias, a, b, 2.0, m)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = f(x)
            results.append((y, torch.autograd.grad(y.float().sum(), leaves)))
    (y, grads), (y_ref, grads_ref) = results
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)
