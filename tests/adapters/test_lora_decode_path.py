"""LoRALinear.decode_kernel: no-grad calls of at most 64 rows add the adapter term with one kernel."""

import pytest
import torch
from torch import nn

pytest.importorskip("triton")
import alignlab.kernels.lora_decode as lora_decode  # noqa: E402
from alignlab.adapters import LoRALinear  # noqa: E402
from alignlab.quant import NF4Linear  # noqa: E402


def _layer(base_kind, dtype=torch.float32, use_dora=False):
    torch.manual_seed(0)
    lin = nn.Linear(96, 72, dtype=dtype)
    base = NF4Linear.from_linear(lin, compute_dtype=dtype) if base_kind == "nf4" else lin
    layer = LoRALinear(base, r=6, alpha=9, use_dora=use_dora)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    return layer.eval()


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = lora_decode.lora_update_

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(lora_decode, "lora_update_", spy)
    return calls


@pytest.mark.parametrize("base_kind", ["linear", "nf4"])
@pytest.mark.parametrize("shape", [(1, 96), (2, 3, 96), (64, 96)])
def test_decode_kernel_equals_the_default_path(base_kind, shape, triton_mode, counted, monkeypatch):
    layer = _layer(base_kind)
    x = torch.randn(*shape)
    with torch.no_grad():
        want = layer(x)
        monkeypatch.setattr(layer, "decode_kernel", True)
        got = layer(x)
    assert len(counted) == 1 and got.shape == want.shape
    # oracle: base output plus the update written out in float64
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    with torch.no_grad():
        ref = layer.base_layer(x).double() + layer.scaling["default"] * (x.double() @ a.T) @ b.T
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-5
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_decode_kernel_leaves_other_calls_alone(triton_mode, counted, monkeypatch):
    """Gradient-needing calls, more than 64 rows, DoRA adapters and active dropout take the usual paths."""
    layer = _layer("linear")
    monkeypatch.setattr(LoRALinear, "decode_kernel", True)
    layer(torch.randn(2, 96)).sum().backward()  # A, B need grad
    assert layer.lora_B["default"].weight.grad is not None
    with torch.no_grad():
        layer(torch.randn(65, 96))
        _layer("linear", use_dora=True)(torch.randn(2, 96))
        drop = LoRALinear(nn.Linear(96, 72), r=4, dropout=0.5).train()
        drop(torch.randn(2, 96))
    assert counted == []
    with torch.no_grad():
        layer(torch.randn(2, 96))
    assert len(counted) == 1
