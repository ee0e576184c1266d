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


def test_shard_model_explains_an_fsdp2_that_cannot_shard_uint8(monkeypatch):
    """torch 2.11's FSDP2 wraps each shard in a Parameter that requires grad, which uint8 cannot (seen on the
    GPU image): shard_model says so and what to do, instead of torch's bare message. Simulated here: CI's
    torch shards the bytes."""
    import torch.distributed.fsdp as fsdp

    from alignlab.distributed import shard_model

    def fully_shard(module, **kwargs):
        nn.Parameter(torch.zeros(2, dtype=torch.uint8))  # what the old FSDPParam did with a uint8 shard

    monkeypatch.setattr(fsdp, "fully_shard", fully_shard)
    model = nn.Sequential(nn.Sequential(_layer()))
    with pytest.raises(RuntimeError, match=r"pytorch/pytorch#177844.*upgrade torch") as info:
        shard_model(model, block_types=["Sequential"], mesh=object())
    assert "can require gradients" in str(info.value.__cause__)

    def other_failure(module, **kwargs):
        raise RuntimeError("no process group")

    monkeypatch.setattr(fsdp, "fully_shard", other_failure)
    with pytest.raises(RuntimeError, match="^no process group$"):  # anything else passes through unchanged
        shard_model(nn.Sequential(nn.Sequential(_layer())), block_types=["Sequential"], mesh=object())


def test_the_packed_weight_view_follows_storage_that_moved_under_the_same_tensors():
    """FSDP2 keeps its unsharded tensors between steps but frees and re-allocates their storage: the kept
    ``NF4Tensor`` view (and the decode launchers kept on it, which hold addresses) must not outlive the addresses
    it was made for; the same storage keeps the same view."""
    ref = _layer()
    lay = shardable_nf4_(nn.Sequential(_layer()))[0]
    first = lay.quant_weight
    assert lay.quant_weight is first  # nothing moved: the cached view
    first.__dict__["_runners"] = {"layout": "a launcher bound to the old addresses"}
    qdata = lay.qdata
    qdata.data = qdata.data.clone()  # the same Parameter object, other storage (as FSDP2's resize / refill)
    assert lay.qdata is qdata
    moved = lay.quant_weight
    assert moved is not first and "_runners" not in moved.__dict__
    assert moved.data.data_ptr() == qdata.data_ptr()
    assert lay.quant_weight is moved
    x = torch.randn(2, 96)
    torch.testing.assert_close(lay(x), ref(x), rtol=0, atol=0)


def test_compiles_in_one_graph_after_an_eager_call():
    """The storage check of ``quant_weight`` asks for addresses, which Dynamo cannot trace: traced calls skip it (they
    keep no launchers), so a compiled model stays one graph once an eager call cached the view."""
    ref = _layer()
    model = shardable_nf4_(nn.Sequential(_layer()))
    x = torch.randn(3, 96)
    model(x)  # the eager call that caches the view
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), ref(x), rtol=0, atol=0)
