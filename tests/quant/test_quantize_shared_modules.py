"""quantize_model on a linear reachable under two names (one layer shared by two blocks): one NF4Linear under
both names, still shared; skip / the head rule under either name keeps it dense under both."""

import pytest
import torch
from torch import nn

from alignlab.quant import NF4Linear, quantize_model


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
        self.dec = nn.Sequential(self.enc[0], nn.ReLU(), nn.Linear(64, 8))  # enc.0 and dec.0: one module

    def forward(self, x):
        return self.dec(self.enc(x))


def test_a_shared_linear_becomes_one_shared_nf4_layer():
    torch.manual_seed(0)
    model = quantize_model(_Shared(), compute_dtype=torch.float32)
    # dec.0 stayed the dense nn.Linear while enc.0 became NF4: the shared weight was no longer shared
    assert isinstance(model.enc[0], NF4Linear) and model.dec[0] is model.enc[0]
    x = torch.randn(3, 64)
    w0, w2 = model.enc[0].dequantize(torch.float32), model.dec[2].dequantize(torch.float32)
    h = torch.relu(x @ w0.T + model.enc[0].bias)
    ref = torch.relu(h @ w0.T + model.enc[0].bias) @ w2.T + model.dec[2].bias
    torch.testing.assert_close(model(x), ref)


@pytest.mark.parametrize("skip", ["enc.0", "dec.0"])
def test_skipping_either_name_keeps_the_shared_linear_dense(skip):
    model = quantize_model(_Shared(), skip=[skip])
    assert type(model.enc[0]) is nn.Linear and model.dec[0] is model.enc[0]
    assert isinstance(model.dec[2], NF4Linear)
