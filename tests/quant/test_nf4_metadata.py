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
