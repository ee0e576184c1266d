"""NF4Experts device moves, as NF4Linear does them: a move that fails part-way left the module without its packed
buffers (every forward then raised TypeError 'NoneType' object is not subscriptable), and to_empty() from the meta
device (build on meta, then load a state dict) raised "Cannot copy out of meta tensor"."""

import copy

import pytest
import torch

from conftest import make_experts

from alignlab.quant import NF4Experts


def _quantized():
    return NF4Experts.from_experts(make_experts("gpt_oss"), compute_dtype=torch.float32)  # gpt-oss: biases are parameters too


ROUTING = (torch.randn(3, 64, generator=torch.Generator().manual_seed(1)), torch.tensor([[0, 1], [1, 2], [2, 0]]),
           torch.rand(3, 2, generator=torch.Generator().manual_seed(2)))


def test_a_move_that_fails_leaves_the_module_as_it_was():
    q = _quantized()
    expected = q(*ROUTING)

    def fails_on_parameters(t):  # the size-0 probe passes, the first real tensor (a bias) fails
        if t.numel():
            raise RuntimeError("out of memory")
        return t

    with pytest.raises(RuntimeError, match="out of memory"):
        q._apply(fails_on_parameters)
    torch.testing.assert_close(q(*ROUTING), expected, rtol=0, atol=0)


def test_meta_then_to_empty_then_a_state_dict():
    q = _quantized()
    expected, state = q(*ROUTING), copy.deepcopy(q.state_dict())
    q.to("meta")
    assert q.down_proj_qdata.is_meta and q.down_proj_qdata.dtype == torch.uint8
    q.to_empty(device="cpu")
    assert q.down_proj_qdata.device.type == "cpu" and q.down_proj_qdata.dtype == torch.uint8
    q.load_state_dict(state)
    torch.testing.assert_close(q(*ROUTING), expected, rtol=0, atol=0)
