"""Experts classes that wrap transformers' decorated expert loop in a forward of their own (ErgoExperts: one row
per route, then a per-expert RMSNorm before the weighted sum). ExpertLoRA and NF4Experts replace that loop, so
they dropped the subclass's code: with B = 0 ExpertLoRA moved a tiny ErgoExperts' output by 2.9, NF4Experts by
2.8 against the same block on its dequantized weights. Both now refuse such a module."""

import copy

import pytest
import torch
from torch import nn

from alignlab.adapters import ExpertLoRA
from alignlab.expert_routing import forward_overridden_by
from alignlab.quant import NF4Experts

transformers = pytest.importorskip("transformers")
from transformers.integrations.moe import use_experts_implementation  # noqa: E402


# gated (gate_up_proj): the layout every transformers 5.x decorator takes (has_gate=False needs 5.1 or newer)
@use_experts_implementation
class _Experts(nn.Module):
    def __init__(self, config, experts=3, hidden=64, inter=32):
        super().__init__()
        self.num_experts = experts
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inter, hidden) * 0.1)
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inter) * 0.1)
        self.act_fn = nn.ReLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for slot in range(top_k_index.shape[1]):
                e = int(top_k_index[t, slot])
                gate, up = (self.gate_up_proj[e] @ hidden_states[t]).chunk(2)
                out[t] += top_k_weights[t, slot] * (self.down_proj[e] @ (self.act_fn(gate) * up))
        return out


class _Inherits(_Experts):  # the decorated loop still runs
    pass


class _Overrides(_Experts):  # scales every output after the loop: code the wrappers would drop
    def forward(self, hidden_states, top_k_index, top_k_weights):
        return 2.0 * super().forward(hidden_states, top_k_index, top_k_weights)


def _config():
    config = transformers.PretrainedConfig()
    if getattr(config, "_experts_implementation", None) is None:  # as make_experts (conftest): transformers 5.0
        config._experts_implementation = "eager"
    return config


def _routing():
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1], [2, 2]])
    return torch.randn(5, 64, generator=g), idx, torch.rand(5, 2, generator=g)


@pytest.mark.parametrize("cls", [_Experts, _Inherits])
def test_the_decorated_loop_is_wrapped_with_the_module_s_own_output(cls):
    torch.manual_seed(0)
    experts = cls(_config())
    assert forward_overridden_by(experts) is None
    x, idx, w = _routing()
    expected = experts(x, idx, w)
    torch.testing.assert_close(ExpertLoRA(copy.deepcopy(experts), {"gate_up_proj": 2})(x, idx, w), expected)  # B = 0
    q = NF4Experts.from_experts(experts, compute_dtype=torch.float32)
    assert q(x, idx, w).shape == expected.shape


def test_a_forward_of_its_own_around_the_decorated_loop_is_refused():
    torch.manual_seed(0)
    experts = _Overrides(_config())
    assert forward_overridden_by(experts) is _Overrides
    with pytest.raises(TypeError, match="_Overrides.forward adds its own code"):
        ExpertLoRA(copy.deepcopy(experts), {"gate_up_proj": 2})
    with pytest.raises(TypeError, match="_Overrides.forward adds its own code"):
        NF4Experts.from_experts(experts)


def test_ergo_experts_are_refused():
    ergo = pytest.importorskip("transformers.models.ergo.modeling_ergo")
    config = transformers.ErgoConfig(hidden_size=64, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    experts = ergo.ErgoExperts(config)
    with pytest.raises(TypeError, match="ErgoExperts.forward adds its own code"):
        ExpertLoRA(copy.deepcopy(experts), {"up_proj": 2, "down_proj": 2})
    with pytest.raises(TypeError, match="ErgoExperts.forward adds its own code"):
        NF4Experts.from_experts(experts)
