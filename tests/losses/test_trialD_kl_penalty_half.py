"""``kl_penalty`` on half-precision log-probs. k3 = e^{-d} - 1 + d cancels for the small d of a policy near its
reference; computed in bfloat16 it kept few correct digits (several percent off the exact value of the very same
bf16 inputs). Half-precision inputs are now computed, and returned, in float32; the reference is the formula in
float64 on the same (exactly representable) values."""

import pytest
import torch

from alignlab.losses.reward import kl_penalty


def _formula(lp, ref, estimator):
    d = lp.double() - ref.double()
    return {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) - 1 + d}[estimator]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_half_precision_inputs_give_the_float32_estimate(dtype, estimator):
    g = torch.Generator().manual_seed(0)
    lp32 = -torch.rand(4, 64, generator=g) * 3
    lp = lp32.to(dtype).requires_grad_(True)
    ref = (lp32 + 0.02 * torch.randn(4, 64, generator=g)).to(dtype)  # a policy close to its reference
    got = kl_penalty(lp, ref, estimator)
    assert got.dtype == torch.float32
    want = _formula(lp.detach(), ref, estimator)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-9)
    (grad,) = torch.autograd.grad(got.sum(), lp)
    assert grad.dtype == dtype
    d = lp.detach().double() - ref.double()
    want_grad = {"k1": torch.ones_like(d), "k2": d, "k3": 1 - torch.exp(-d)}[estimator]
    torch.testing.assert_close(grad.double(), want_grad.to(dtype).double(), rtol=1e-2, atol=1e-6)


def test_mixed_dtypes_and_mask():
    lp = torch.tensor([[-1.0, -2.0, float("nan")]], dtype=torch.bfloat16)
    ref = torch.tensor([[-1.01, -1.99, 0.0]], dtype=torch.float32)
    mask = torch.tensor([[1, 1, 0]])
    got = kl_penalty(lp, ref, "k3", mask)
    assert got.dtype == torch.float32
    want = _formula(lp[:, :2], ref[:, :2], "k3")
    torch.testing.assert_close(got[:, :2].double(), want, rtol=1e-5, atol=1e-9)
    assert float(got[0, 2]) == 0.0
    assert kl_penalty(lp.double(), ref.double(), "k3", mask).dtype == torch.float64
