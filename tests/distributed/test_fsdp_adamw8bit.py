"""AdamW8bit under FSDP2: two gloo ranks on CPU against one process on the same global batch.

Each rank updates its own shard, with 8-bit state sized for that shard. The oracle is twofold: the first step
(taken from zero moments, so before any quantization error) equals the single process's to float rounding, and
over the following steps both the sharded and the single-process run track ``torch.optim.AdamW`` within the
tolerance ``tests/optim/test_adamw8bit.py`` uses (the shards' quantization blocks differ from the unsharded
parameter's, so the 8-bit codes, not the tolerance, differ).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import spawn_ranks

if not torch.distributed.is_available():  # pragma: no cover - every CPU wheel ships gloo
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))  # spawned ranks import the worker by module name
import fsdp_adamw8bit_worker as w  # noqa: E402

from alignlab.optim import AdamW8bit  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("adamw8bit")
    spawn_ranks(w.worker, str(out))
    fsdp = torch.load(out / "fsdp.pt", weights_only=False)
    x, y = w.batch()
    single, ref = w.build(), w.build()
    init = w.whole_params(single)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGNLAB_KERNELS", "torch")  # the ranks' path
        ours = w.train(single, AdamW8bit(single.parameters(), **w.HYPER, min_8bit_size=w.MIN_8BIT), x, y)
    fp32 = w.train(ref, torch.optim.AdamW(ref.parameters(), **w.HYPER), x, y)
    return fsdp, ours, fp32, init


def test_first_step_equals_one_process(runs):
    """From zero moments the first update is exact AdamW on both: the shards were updated, each with its own
    gradient, as the whole parameter is in one process (before the fix: 'mixed torch.Tensor and DTensor')."""
    fsdp, single, _, _ = runs
    assert sorted(fsdp["first"]) == sorted(single["first"])
    for name, want in single["first"].items():
        torch.testing.assert_close(fsdp["first"][name], want, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("run", ["fsdp", "single"])
def test_tracks_torch_adamw_within_8bit_error(runs, run):
    """tests/optim's tolerance against fp32 AdamW: every loss within 5%, and the final weights off AdamW's by
    less than 5% of how far AdamW moved them."""
    fsdp, single, fp32, init = runs
    got = fsdp if run == "fsdp" else single
    rel = [abs(a - b) / b for a, b in zip(got["losses"], fp32["losses"])]
    assert max(rel) < 0.05, rel
    for name, p_ref in fp32["last"].items():
        assert (got["last"][name] - p_ref).norm() < 0.05 * (p_ref - init[name]).norm(), name


def test_state_is_sized_per_local_shard(runs):
    fsdp, _, _, _ = runs
    blocks = lambda n: -(-n // 256)  # noqa: E731
    for key in ("trained", "migrated"):  # after steps, and loaded from torch.optim.AdamW's DTensor moments
        ranks = [s[key] for s in fsdp["state"]]
        for name in ("fc1.weight", "row"):  # 8-bit: codes and block scales of this rank's shard only
            for st in ranks:
                n = st[name]["local_numel"]
                assert st[name]["codes"] == ("Tensor", (2, n)) and st[name]["absmax"] == ("Tensor", (2, blocks(n)))
            assert sum(st[name]["local_numel"] for st in ranks) == {"fc1.weight": 4040, "row": 1010}[name]
        assert [st["fc1.weight"]["local_numel"] for st in ranks] == [2040, 2000]
        assert [st["row"]["local_numel"] for st in ranks] == [1010, 0]  # one row: rank 1 holds none of it
        for name in ("fc1.bias", "fc2.weight", "fc2.bias"):  # fp32 moments: plain tensors of the local shape
            for st in ranks:
                shape = st[name]["local_shape"]
                assert st[name]["exp_avg"] == st[name]["exp_avg_sq"] == ("Tensor", shape)


def test_state_dict_round_trips_on_the_shards(runs):
    assert [st["round_trip"] for st in runs[0]["state"]] == [True, True]


def test_offloaded_equals_in_memory_on_the_shards(runs):
    fsdp = runs[0]
    assert [st["offload_state_equal"] for st in fsdp["state"]] == [True, True]
    for name, want in fsdp["last"].items():
        assert torch.equal(fsdp["offload_last"][name], want), name
