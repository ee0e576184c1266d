"""small_m_matmul's launch parameters as NumPy integers (a sweep over ``np.arange`` / a config array hands them so).

``_check_launch`` accepts them (``alignlab._checks.is_int``: Python or NumPy integers), so they must run like the
Python ints of the same value; ``block_n``, ``nb`` and ``split`` reached the kernels unconverted and failed inside
Triton ("cannot convert 16 of type <class 'numpy.int64'> to tensor", "arange's arguments must be of type
tl.constexpr"), an error that names neither the argument nor what was expected.
"""

import numpy as np
import pytest
import torch

from alignlab.kernels.nf4_small import small_m_matmul
from alignlab.quant.nf4 import nf4_dequantize, nf4_quantize


@pytest.mark.parametrize("kernel", ["dot", "swap"])
@pytest.mark.parametrize("name,value", [("block_n", 16), ("nb", 2), ("split", 2)])
def test_numpy_int_launch_parameters_run_as_python_ints(kernel, name, value, triton_mode):
    g = torch.Generator().manual_seed(0)
    t = nf4_quantize(torch.randn(24, 256, generator=g) * 0.1, blocksize=64)
    x = torch.randn(3, 256, generator=g)
    want = x.double() @ nf4_dequantize(t, torch.float32).double().T
    y = small_m_matmul(x, t, kernel=kernel, **{name: np.int64(value)})
    assert torch.equal(y, small_m_matmul(x, t, kernel=kernel, **{name: value}))
    assert ((y.double() - want).norm() / want.norm()).item() < 1e-5
