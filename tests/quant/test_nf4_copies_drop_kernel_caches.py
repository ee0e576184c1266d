"""Copies and pickles of NF4 weights hold the fields only, not the kernels' caches kept on the NF4Tensor.

After a no-grad CUDA call, ``NF4Linear`` keeps a decode launcher on its packed weight (a local closure bound to
those tensors); ``torch.save(model)`` / ``pickle`` then failed ("Can't pickle local object"), and a deepcopy
(a DPO reference model) ran its products through the original's tensors. Found in a user trial (2026-12-06);
the CUDA launcher is stood in for here by a closure from a patched ``decode_runner``, the code path
``alignlab.kernels.nf4_matmul.keep_runner`` takes on the GPU.
"""

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import alignlab.kernels.nf4_matmul as nf4_matmul
from alignlab.adapters import LoRAConfig, inject, merge
from alignlab.quant import NF4Linear


def _layer_with_launcher(monkeypatch):
    def decode_runner(x, t, bias):  # like small_m_runner: a local closure bound to t's tensors
        def run(xx, b):
            return nn.functional.linear(xx, t.dequantize(xx.dtype), b)
        return run

    monkeypatch.setattr(nf4_matmul, "decode_runner", decode_runner)
    layer = NF4Linear.from_linear(nn.Linear(64, 8), compute_dtype=torch.float32)
    nf4_matmul.keep_runner(torch.randn(1, 64), layer.quant_weight, layer.bias, ("layout",))
    assert layer.quant_weight.__dict__["_runners"]
    return layer


def test_pickle_and_torch_save_after_a_decode_launcher(monkeypatch):
    layer = _layer_with_launcher(monkeypatch)
    x = torch.randn(3, 64)
    back = pickle.loads(pickle.dumps(layer))  # raised: Can't pickle local object '...run'
    assert torch.equal(back(x), layer(x))
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), layer(x))


def test_deepcopy_does_not_share_the_originals_launchers(monkeypatch):
    layer = _layer_with_launcher(monkeypatch)
    twin = copy.deepcopy(layer)
    assert "_runners" not in twin.quant_weight.__dict__  # was the original's closure, over the original's bytes
    assert twin.qdata is not layer.qdata and torch.equal(twin.qdata, layer.qdata)
    x = torch.randn(3, 64)
    assert torch.equal(twin(x), layer(x))


def test_pickle_a_merged_adapter_layer_whose_snapshot_has_a_launcher(monkeypatch):
    layer = _layer_with_launcher(monkeypatch)
    model = nn.Sequential(layer)
    inject(model, LoRAConfig(r=2, alpha=4, target_modules=["0"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the re-quantization warning of a merge into NF4
        merge(model)  # keeps the packed weight from before the merge, the NF4Tensor holding the launcher
    x = torch.randn(3, 64)
    assert torch.equal(pickle.loads(pickle.dumps(model))(x), model(x))


@pytest.mark.cuda
def test_a_copy_after_real_decode_calls_pickles_and_computes_with_its_own_tensors(monkeypatch):
    """The same on the GPU, with the launcher ``NF4Linear`` really keeps after eager no-grad decode calls."""
    from alignlab.quant import linear

    monkeypatch.setattr(linear, "DECODE_LAUNCHERS", True)
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(256, 128, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = layer(x)
        layer(x)
    assert layer.quant_weight.__dict__.get("_runners")  # a launcher serves this layout now
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    twin = copy.deepcopy(layer)
    assert "_runners" not in twin.quant_weight.__dict__
    twin.quant_weight.data.zero_()  # the copy's own bytes: its products must follow them, the original's not
    with torch.no_grad():
        torch.testing.assert_close(back(x), want, rtol=0, atol=0)
        torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
        assert not torch.equal(twin(x), want)
