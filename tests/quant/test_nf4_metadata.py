"""A checkpoint whose NF4 metadata (the JSON bytes of weight.quant_state.bitsandbytes__nf4, or NF4Tensor's own
'meta') lacks shape / blocksize or holds something else there or in nested_offset / nested_blocksize is a ValueError
naming it, so NF4Linear.load_state_dict reports it with the layer's name instead of letting KeyError /
AttributeError / TypeError out."""

import json

import pytest
import torch
from torch import nn

from alignlab.quant import NF4Linear, nf4_quantize
from alignlab.quant.nf4 import NF4Tensor, nf4_from_bnb_state_dict

_KEY = "weight.quant_state.bitsandbytes__nf4"


def _blob(obj) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)


def _bad_metas(meta: dict) -> dict:
    return {
        "no shape": {k: v for k, v in meta.items() if k != "shape"},
        "no blocksize": {k: v for k, v in meta.items() if k != "blocksize"},
        "not an object": [1, 2],
        "shape a string": dict(meta, shape="8x64"),
        "shape of floats": dict(meta, shape=[8.5, 64]),
        "blocksize a string": dict(meta, blocksize="64"),
        # user trial 2026-12-06: float(None) let a TypeError out of load_state_dict unnamed, 256.5 was read as 256
        "nested_offset null": dict(meta, nested_offset=None),
        "nested_offset a string": dict(meta, nested_offset="0.1"),
        "nested_offset NaN": dict(meta, nested_offset=float("nan")),  # a helper's find, 2026-12-07: NaN weights
        "nested_offset inf": dict(meta, nested_offset=float("inf")),
        "nested_blocksize a float": dict(meta, nested_blocksize=256.5),
        "nested_blocksize a string": dict(meta, nested_blocksize="abc"),
    }


@pytest.mark.parametrize("case", list(_bad_metas({"shape": [8, 64], "blocksize": 64})))
def test_bad_bitsandbytes_metadata_is_reported_by_load_state_dict(case):
    layer = NF4Linear.from_linear(nn.Linear(64, 8))
    sd = layer.state_dict()
    meta = json.loads(bytes(sd[_KEY].tolist()).decode("utf-8"))
    sd[_KEY] = _blob(_bad_metas(meta)[case])
    with pytest.raises(ValueError, match="bitsandbytes__nf4"):
        nf4_from_bnb_state_dict({k: v for k, v in sd.items() if k.startswith("weight")})
    fresh = NF4Linear.from_linear(nn.Linear(64, 8))
    with pytest.raises(RuntimeError, match="weight: weight.quant_state"):  # torch's load report, layer named
        fresh.load_state_dict(sd)


@pytest.mark.parametrize("case", list(_bad_metas({"shape": [8, 64], "blocksize": 64})))
def test_bad_nf4tensor_metadata_is_a_value_error(case):
    sd = nf4_quantize(torch.randn(8, 64)).state_dict()
    meta = json.loads(bytes(sd["meta"].tolist()).decode("utf-8"))
    sd["meta"] = _blob(_bad_metas(meta)[case])
    with pytest.raises(ValueError, match="meta"):
        NF4Tensor.from_state_dict(sd)


def test_metadata_stored_as_floats_is_a_value_error_naming_the_key():
    """The JSON bytes as a float tensor raised a bare TypeError from bytes() (a helper's find, 2026-12-07)."""
    layer = NF4Linear.from_linear(nn.Linear(64, 8))
    sd = layer.state_dict()
    sd[_KEY] = sd[_KEY].float()
    with pytest.raises(RuntimeError, match="weight.quant_state.bitsandbytes__nf4 must be a uint8 tensor"):
        NF4Linear.from_linear(nn.Linear(64, 8)).load_state_dict(sd)


def test_unknown_weight_keys_stay_unexpected():
    """Every weight.* key was taken off the unexpected keys, so strict loading passed a misspelt one silently."""
    sd = dict(NF4Linear.from_linear(nn.Linear(64, 8)).state_dict())
    sd["weight.quant_mapp"] = sd["weight.quant_map"]
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "weight.quant_mapp"'):
        NF4Linear.from_linear(nn.Linear(64, 8)).load_state_dict(sd)
    result = NF4Linear.from_linear(nn.Linear(64, 8)).load_state_dict(sd, strict=False)
    assert result.unexpected_keys == ["weight.quant_mapp"] and result.missing_keys == []


def test_icq_shifts_and_scales_of_the_wrong_shape_or_dtype_are_refused_at_load():
    """weight.icq_shift was attached after the checks (3 shifts for 10 blocks loaded, then the forward failed; an
    fp16 one was taken), and an absmax of shape (1, nb) loaded (a helper's find, 2026-12-07)."""
    layer = NF4Linear.from_linear(nn.Linear(70, 9), compute_dtype=torch.float32, calibrate="icq")
    good = layer.state_dict()
    for key, value, message in (("weight.icq_shift", torch.zeros(3), r"shift must be float32 of shape \(10,\)"),
                                ("weight.icq_shift", torch.zeros(10, dtype=torch.float16), "shift must be float32"),
                                ("weight.absmax", good["weight.absmax"][None], r"absmax must have shape \(10,\)")):
        sd = dict(good, **{key: value})
        fresh = NF4Linear.from_linear(nn.Linear(70, 9), compute_dtype=torch.float32)
        before = fresh.qdata.clone()
        with pytest.raises(RuntimeError, match=message):
            fresh.load_state_dict(sd)
        assert torch.equal(fresh.qdata, before)  # nothing changed
    fresh = NF4Linear.from_linear(nn.Linear(70, 9), compute_dtype=torch.float32)
    fresh.load_state_dict(good)
    assert fresh.calibrate == "icq" and torch.equal(fresh(torch.ones(2, 70)), layer(torch.ones(2, 70)))


def test_a_layer_built_on_an_icq_weight_keeps_calibrating():
    """NF4Linear(t) with an ICQ-calibrated t kept calibrate=None: the next re-quantization (a merge,
    load_dense_weight_) dropped the calibration (a helper's find, 2026-12-07)."""
    w = torch.randn(8, 64) * 0.02 + 0.05
    layer = NF4Linear(nf4_quantize(w, calibrate="icq"), compute_dtype=torch.float32)
    assert layer.calibrate == "icq"
    layer.load_dense_weight_(w)
    assert layer.quant_weight.shift is not None
    assert NF4Linear(nf4_quantize(w), compute_dtype=torch.float32).calibrate is None
