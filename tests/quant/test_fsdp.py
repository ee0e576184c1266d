"""ShardableNF4Linear in one process: same outputs, same bitsandbytes state dict, uint8 kept as parameters.

The sharded behaviour (FSDP2 all-gather of these bytes) is checked with 2 ranks in
``tests/distributed/test_fsdp.py``.
"""

import pytest
import torch
from torch import nn

from alignlab.quant import NF4Linear
from alignlab.quant.fsdp import ShardableNF4Linear, shardable_nf4_


def _layer(double_quant=True, calibrate=None):
    torch.manual_seed(0)
    return NF4Linear.from_linear(nn.Linear(96, 40), double_quant=double_quant, compute_dtype=torch.float32,
                                 calibrate=calibrate)


@pytest.mark.parametrize("double_quant", [True, False])
def test_same_outputs_and_state_dict(double_quant):
    ref = _layer(double_quant)
    model = shardable_nf4_(nn.Sequential(_layer(double_quant)))
    lay = model[0]
    assert type(lay) is ShardableNF4Linear
    uint8 = {"qdata", "qabsmax"} if double_quant else {"qdata"}  # fp32 scales stay buffers (a bf16 policy would round them)
    assert {n for n, p in lay.named_parameters() if p.dtype == torch.uint8} == uint8
    assert not any(p.requires_grad for p in lay.parameters())
    assert all(b.dtype != torch.uint8 for b in lay.buffers())
    x = torch.randn(3, 96)
    torch.testing.assert_close(lay(x), ref(x), rtol=0, atol=0)
    want, got = ref.state_dict(), lay.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_count_parameters_counts_the_logical_weight_not_the_uint8_parameters():
    from alignlab.adapters import count_parameters

    model = shardable_nf4_(nn.Sequential(_layer()))
    assert count_parameters(model) == (0, 96 * 40 + 40)


def test_load_state_dict_and_dtype_moves_keep_the_bytes():
    ref = _layer()
    lay = shardable_nf4_(nn.Sequential(_layer(calibrate="icq")))[0]  # different weights first
    result = lay.load_state_dict({k: v for k, v in ref.state_dict().items()}, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(lay.qdata, ref.qdata) and lay.qdata.dtype == torch.uint8
    lay.half(), ref.half()  # nn.Module moves change only floating-point tensors; the NF4 state keeps its dtypes
    assert lay.qdata.dtype == torch.uint8 and lay.qnested_absmax.dtype == torch.float32
    x = torch.randn(2, 96)
    torch.testing.assert_close(lay(x), ref(x), rtol=0, atol=0)


def test_rejects_a_non_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        shardable_nf4_("not a model")
