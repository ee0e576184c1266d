"""``masked_mean`` on half-precision values. It summed the values and cast the token count in the values' dtype:
in float16 a count above 65504 is ``inf`` (a mean of 1.5 over 120000 tokens came out NaN, of 0.1 over 100000
tokens 0), and in bfloat16 the count and the sum were rounded. Half precision is now summed and divided in float32
(``torch.mean`` accumulates in float32 as well); the reference is the float64 mean of the same values."""

import pytest
import torch

from alignlab.losses.reward import masked_mean


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_mean_over_many_tokens(dtype):
    g = torch.Generator().manual_seed(0)
    values = (torch.rand(4, 30000, generator=g) + 1.0).to(dtype)  # sum ~ 1.8e5 and count 1.2e5: beyond float16
    mask = torch.rand(4, 30000, generator=g) < 0.9
    mask[3] = True
    want = values.double()[mask].mean()
    got = masked_mean(values, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    rows = masked_mean(values, mask, dim=1)
    want_rows = torch.stack([values[i].double()[mask[i]].mean() for i in range(4)])
    torch.testing.assert_close(rows.double(), want_rows, rtol=1e-5, atol=0)
    torch.testing.assert_close(masked_mean(values).double(), values.double().mean(), rtol=1e-5, atol=0)


def test_gradient_reaches_half_values_and_float64_stays():
    values = torch.tensor([[1.0, 2.0, float("nan")]], dtype=torch.bfloat16, requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    out = masked_mean(values, mask)
    out.backward()
    assert float(out.detach()) == 1.5
    assert values.grad.dtype == torch.bfloat16 and values.grad.tolist() == [[0.5, 0.5, 0.0]]
    assert masked_mean(values.detach().double(), mask).dtype == torch.float64
