"""NF4Tensor.to moves buffers only; a dtype there, or a broken NF4Tensor handed to an NF4Linear, is refused."""

import dataclasses

import pytest
import torch
from torch import nn

from alignlab.quant import NF4Linear, nf4_dequantize, nf4_quantize


@pytest.mark.parametrize("double_quant", [True, False])
def test_to_refuses_a_dtype_and_leaves_the_tensor_as_it_was(double_quant):
    t = nf4_quantize(torch.randn(8, 64, generator=torch.Generator().manual_seed(0)), double_quant=double_quant)
    before = nf4_dequantize(t)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        with pytest.raises(TypeError, match="device must be"):
            t.to(dtype)  # used to turn the uint8 codes into floats; the next dequantize raised NotImplementedError
    with pytest.raises(TypeError, match="device must be"):
        t.to(True)
    assert t.data.dtype == torch.uint8 and torch.equal(nf4_dequantize(t), before)
    for device in ("cpu", torch.device("cpu")):
        moved = t.to(device)
        assert moved.data.dtype == torch.uint8 and moved.absmax.dtype == t.absmax.dtype
        assert torch.equal(nf4_dequantize(moved), before)


def test_load_quant_weight_refuses_a_broken_tensor_and_keeps_the_layer():
    layer = NF4Linear.from_linear(nn.Linear(64, 8), compute_dtype=torch.float32)
    x = torch.randn(3, 64)
    y = layer(x)
    t = layer.quant_weight
    broken = dataclasses.replace(t, data=t.data.to(torch.float16))  # what t.to(torch.float16) used to give
    with pytest.raises(ValueError, match="uint8"):
        layer.load_quant_weight_(broken)  # was taken, and every forward then failed
    short = dataclasses.replace(t, absmax=t.absmax[:-1])
    with pytest.raises(ValueError, match="absmax"):
        layer.load_quant_weight_(short)
    assert torch.equal(layer(x), y)
