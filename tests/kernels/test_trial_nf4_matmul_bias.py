"""nf4_matmul's bias (user trial 2026-12-04): the Triton kernels index it as a contiguous (N,) vector, so a strided
bias gave wrong values and a short one was read out of bounds, while the PyTorch path broadcast or raised."""

import pytest
import torch

from alignlab.kernels.nf4_matmul import nf4_matmul, nf4_matmul_t
from alignlab.quant import nf4_dequantize, nf4_quantize


@pytest.mark.parametrize("rows", [1, 4, 20])  # small-M kernels (GEMV, tl.dot) and dequantize + GEMM
def test_strided_bias(kernel_mode, rows):
    torch.manual_seed(0)
    t = nf4_quantize(torch.randn(8, 64), blocksize=32)
    x = torch.randn(rows, 64)
    bias = torch.randn(16)[::2]
    torch.testing.assert_close(nf4_matmul(x, t, bias), x @ nf4_dequantize(t).T + bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(7,), (9,), (1, 8), ()])
def test_bias_of_another_shape_is_refused(kernel_mode, shape):
    t = nf4_quantize(torch.randn(8, 64), blocksize=32)
    with pytest.raises(ValueError, match="bias"):
        nf4_matmul(torch.randn(4, 64), t, torch.ones(shape))


def test_0d_input_is_a_value_error(kernel_mode):
    t = nf4_quantize(torch.randn(8, 64), blocksize=32)
    with pytest.raises(ValueError, match="x.shape"):  # before: IndexError
        nf4_matmul(torch.tensor(1.0), t)
    with pytest.raises(ValueError, match="dy.shape"):
        nf4_matmul_t(torch.tensor(1.0), t)
