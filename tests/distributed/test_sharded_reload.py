"""An FSDP2-sharded QLoRA model loads its own whole state dict (resuming a run): the NF4 bytes it already holds are
nothing to replace. It raised "cannot replace the NF4 weight of a layer FSDP2 has sharded" for every layer (a
helper's find, 2026-12-07); other NF4 bytes are still refused. One gloo process, in this process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from alignlab.adapters import LoRAConfig, inject
from alignlab.quant import quantize_model

if not dist.is_available():  # pragma: no cover - every CPU wheel ships gloo
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)
transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[1, 5, 9, 3, 7]])


def _sharded(kind: str):
    from alignlab.distributed import shard_model

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(intermediate_size=64, **common))
    else:
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(intermediate_size=48, num_local_experts=4,
                                                                           num_experts_per_tok=2, **common))
    model = quantize_model(model, compute_dtype=torch.float32)
    inject(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return shard_model(model)


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_a_sharded_nf4_model_loads_its_own_state_dict(world_of_one, kind):
    model = _sharded(kind)
    with torch.no_grad():
        before = model(IDS).logits
    state = model.state_dict()
    assert any(k.endswith("weight.absmax") for k in state)  # the NF4 bytes are in it
    model.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)
    # other NF4 bytes for a sharded layer: refused as before
    name = next(k for k in state if k.endswith(".weight") and state[k].dtype == torch.uint8)
    changed = dict(state)
    changed[name] = state[name] ^ 1
    with pytest.raises((ValueError, RuntimeError), match="cannot replace the NF4"):
        model.load_state_dict(changed)


def test_a_sharded_nf4_experts_model_loads_changed_expert_bytes_into_its_shards(world_of_one):
    """(The experts' stacks are plain sharded parameters to load_state_dict: other bytes are copied into them.)"""
    model = _sharded("mixtral")
    state = model.state_dict()
    key = next(k for k in state if k.endswith("experts.gate_up_proj_qdata"))
    changed = dict(state)
    changed[key] = state[key] ^ 1
    model.load_state_dict(changed)
    assert torch.equal(model.state_dict()[key], changed[key])
