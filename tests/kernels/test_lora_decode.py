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
                                        (2, 1, 7, 16), (16, 40, 50, 64)])
@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.float16])
def test_kernels_match_the_reference_under_the_interpreter(m, k, n, r, factor_dtype, triton_mode):
    """Odd sizes (not multiples of the blocks), one row, one output column, K = 1, rank 1."""
    x, a, b, y = _case(m, k, n, r, torch.float16, "cpu", factor_dtype)
    want = lora_decode_reference(y, x, a, b, 0.7)
    got = lora_decode_add_(y.clone(), x, a, b, 0.7)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got, _reference_by_hand(y, x, a, b, 0.7), rtol=2e-3, atol=2e-3)


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


@pytest.mark.parametrize("rows", [1, 4])
def test_fused_layer_no_grad_decode_path_matches_its_gemm_path(rows, triton_mode, monkeypatch):
    """A LoRA layer on an fp16 ``nn.Linear`` under ``no_grad`` at decode rows takes the kernels (no factor cast);
    the same call with them off takes the GEMMs: the same output to rounding, and with grad the GEMM path."""
    from alignlab.adapters import LoRALinear, fused

    torch.manual_seed(rows)
    layer = LoRALinear(nn.Linear(64, 48, dtype=torch.float16), r=8, alpha=16)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    x = torch.randn(2, rows, 64, dtype=torch.float16)
    calls = []
    real = fused.lora_decode_add_
    monkeypatch.setattr(fused, "lora_decode_add_", lambda *args: calls.append(1) or real(*args))
    with torch.no_grad():
        got = layer(x)
        assert calls and "default" not in layer._casts
        monkeypatch.setattr(fused, "DECODE_KERNELS", False)
        want = layer(x)
    assert len(calls) == 1
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    monkeypatch.setattr(fused, "DECODE_KERNELS", True)
    layer(x.requires_grad_(True)).sum().backward()  # grad needed: the autograd function, not the kernels
    assert len(calls) == 1 and x.grad is not None


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, k, n, r", [(1, 4096, 4096, 16), (7, 4096, 1024, 16), (16, 14336, 4096, 64),
                                        (3, 257, 129, 5)])
def test_kernels_match_the_reference_on_cuda(m, k, n, r, dtype):
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
        assert torch.equal(g, got[0])  # deterministic: no atomics


@pytest.mark.parametrize("env, on", [(None, True), ("0", False)])
def test_on_by_default_and_switched_off_by_the_environment(env, on):
    """``ALIGNLAB_LORA_DECODE=0`` turns the decode kernels off for the process, read once at import."""
    out = printed_in_fresh_process("__import__('alignlab.adapters.fused').adapters.fused.DECODE_KERNELS",
                                   {"ALIGNLAB_LORA_DECODE": env})
    assert out == str(on)
