"""QLoRA on MoE experts under FSDP2: two gloo ranks on CPU against one process on the same global batch.

The NF4 expert stacks (``NF4Experts``) are sharded along the experts; the losses, the adapter gradients of
every step, the saved adapter and the gathered state dict equal the single process's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import spawn_ranks

pytest.importorskip("transformers")
if not torch.distributed.is_available():  # pragma: no cover - every CPU wheel ships gloo
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))  # spawned ranks import the worker by module name
import fsdp_moe_worker as w  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

from alignlab.adapters import save_adapter  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe")
    spawn_ranks(w.worker, str(out))
    fsdp = torch.load(out / "fsdp.pt", weights_only=False)
    model = w.build()
    losses, grads = w.train(model, w.global_batch())
    save_adapter(model, out / "single")
    return out, fsdp, {"losses": losses, "grads": grads, "model": model}


def test_expert_bytes_are_sharded_along_the_experts(runs):
    _, fsdp, _ = runs
    assert fsdp["sharded"] == {"type": "ShardableNF4Experts", "is_dtensor": True, "local_rows": 2}  # 4 experts / 2


def test_losses_and_adapter_gradients_match_one_process(runs):
    _, fsdp, single = runs
    torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-6)
    for step, (got, want) in enumerate(zip(fsdp["grads"], single["grads"])):
        assert sorted(got) == sorted(want) and any("experts.lora_A" in n for n in got), step
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=f"step {step}: {name}")


def test_saved_adapter_and_state_dict_match_one_process(runs):
    out, fsdp, single = runs
    a, b = load_file(out / "fsdp" / "adapter_model.safetensors"), load_file(out / "single" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    state, want = fsdp["state_dict"], single["model"].state_dict()
    assert sorted(state) == sorted(want)
    for key in ("model.layers.0.mlp.experts.base_layer.gate_up_proj_qdata",
                "model.layers.1.mlp.experts.base_layer.down_proj_qabsmax"):
        assert torch.equal(state[key], want[key])
