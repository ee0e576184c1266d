"""ShardableNF4Linear (shardable_nf4_, what shard_model converts to) moves as NF4Linear does: to_empty out of
meta for a state dict to fill (the FSDP2 deferred-init flow), and a failed move leaves the layer as it was."""

import pytest
import torch
from torch import nn

from alignlab.quant import quantize_model
from alignlab.quant.fsdp import ShardableNF4Linear, shardable_nf4_


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16, bias=False))


def _reference():
    torch.manual_seed(0)
    model = quantize_model(_model(), compute_dtype=torch.float32)
    return model, torch.randn(3, 64)


@pytest.mark.parametrize("double_quant", [True, False])
def test_to_empty_from_meta_then_a_state_dict(double_quant):
    ref, x = _reference()
    if not double_quant:
        ref = quantize_model(_model(), compute_dtype=torch.float32, double_quant=False)
    with torch.device("meta"):
        model = _model()
    quantize_model(model, compute_dtype=torch.float32, double_quant=double_quant)
    shardable_nf4_(model)
    model.to_empty(device="cpu")  # raised 'Cannot copy out of meta tensor' on the fp32 scale buffers
    assert isinstance(model[0], ShardableNF4Linear)
    assert not any(t.is_meta for t in list(model.buffers()) + list(model.parameters()))
    model.load_state_dict(ref.state_dict())
    assert torch.equal(model(x), ref(x))


def test_a_failed_move_leaves_the_layer_as_it_was():
    ref, x = _reference()
    model = shardable_nf4_(quantize_model(_model(), compute_dtype=torch.float32))
    model.load_state_dict(ref.state_dict())
    y = model(x)

    def fails_on_data(t):  # the device probe (an empty tensor) passes, the first real tensor fails
        if t.numel():
            raise RuntimeError("out of memory (simulated)")
        return t

    with pytest.raises(RuntimeError, match="simulated"):
        model[0]._apply(fails_on_data)
    # the double-quantization scales were left None: the 8-bit codes were then read as the scales, silently
    assert model[0].qnested_absmax is not None and model[0].qnested_offset is not None
    assert torch.equal(model(x), y)
