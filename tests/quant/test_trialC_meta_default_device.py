"""Deferred init under ``with torch.device("meta")``: quantizing there raised 'Cannot copy out of meta tensor'
when it was the process's first double quantization on meta (the 8-bit dynamic map was built on the default
device, then read back with ``.tolist()``). The layer now quantizes to meta buffers and takes real weights."""

import pytest
import torch
from torch import nn

from alignlab.quant import NF4Linear, nf4
from alignlab.quant import quantize_model


@pytest.fixture
def fresh_tables(monkeypatch):
    # the maps are cached per device for the process; start as a new process would
    monkeypatch.setattr(nf4, "_TABLES", {})


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_under_meta_default_device(fresh_tables, signed):
    with torch.device("meta"):
        m = nf4.dynamic_map("meta", signed=signed)
    assert m.is_meta and m.shape == (256,)
    assert torch.equal(nf4.dynamic_map("cpu", signed=signed), nf4._build_dynamic_map(signed))


def test_quantize_model_inside_meta_context_then_load(fresh_tables):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    real = quantize_model(dense, quantize_head=True, compute_dtype=torch.float32)
    with torch.device("meta"):
        deferred = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
        quantize_model(deferred, quantize_head=True, compute_dtype=torch.float32)
    assert isinstance(deferred[0], NF4Linear) and deferred[0].qdata.is_meta
    deferred.to_empty(device="cpu")
    deferred.load_state_dict(real.state_dict())
    x = torch.randn(5, 64)
    assert torch.equal(deferred(x), real(x))
