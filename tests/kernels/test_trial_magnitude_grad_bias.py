"""magnitude_grad with a strided bias (user trial 2026-12-04): the kernel indexed it as contiguous."""

import pytest
import torch

from alignlab.kernels.dora import magnitude_grad


@pytest.mark.parametrize("splits", [None, 1, 3])
def test_strided_bias_gives_the_reference_values(splits, triton_mode):
    torch.manual_seed(0)
    gy, y = torch.randn(6, 8), torch.randn(6, 8)
    m = torch.rand(8) + 0.5
    bias = torch.randn(16)[::2]
    ref = ((gy * y).sum(0) - bias * gy.sum(0)) / m
    torch.testing.assert_close(magnitude_grad(gy, y, bias, m, splits=splits), ref, rtol=1e-5, atol=1e-5)
