"""quantize_model on torch's nn.TransformerEncoder: eval mode works (its fused inference path read
linear1.weight / linear2.weight, which an NF4Linear does not have) and equals the layer on the dequantized
weights; the model still pickles."""

import copy
import pickle

import pytest
import torch
from torch import nn

from alignlab.quant import NF4Linear, quantize_model


def _encoder():
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


@pytest.mark.parametrize("grad", [True, False])
def test_eval_forward_equals_the_dequantized_dense_encoder(grad):
    torch.manual_seed(0)
    model = _encoder().eval()
    dense = copy.deepcopy(model)
    quantize_model(model, compute_dtype=torch.float32)
    for (_, q), (_, d) in zip(model.named_modules(), dense.named_modules()):
        if isinstance(q, NF4Linear):
            d.weight.data = q.dequantize(torch.float32)
    x = torch.randn(2, 5, 32)
    with torch.set_grad_enabled(grad):
        y = model(x)  # AttributeError: 'NF4Linear' object has no attribute 'weight'
    with torch.no_grad():
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            ref = dense(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(y.detach(), ref, rtol=1e-5, atol=1e-5)
    again = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        torch.testing.assert_close(again(x), y.detach())


def test_quantizing_twice_adds_one_hook():
    model = quantize_model(quantize_model(_encoder()))
    assert all(len(m._forward_pre_hooks) == 1 for m in model.layers)
