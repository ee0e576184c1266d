"""ExpertGroups.from_routing with thousands of experts.

The group offsets were a float ``histc`` over the sorted ids: from about 4100 experts on, expert E - 2's rows
were binned into E - 1's group, so ExpertLoRA ran those tokens through the wrong expert's weights (no error).
Oracle: counts written out per expert, and transformers' own eager expert loop.
"""

import pytest
import torch

from alignlab.adapters import ExpertLoRA
from alignlab.expert_routing import ExpertGroups

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.modeling_mixtral import MixtralExperts  # noqa: E402


@pytest.mark.parametrize("num_experts", [1, 2, 4097, 4100, 8192])
def test_every_expert_counts_its_own_rows(num_experts):
    ids = torch.arange(num_experts).repeat_interleave(2).roll(3).reshape(-1, 2)  # every expert twice, shuffled
    ids = torch.cat([ids, torch.full((1, 2), num_experts)])  # one token routed to a sentinel: in no group
    offsets = ExpertGroups.from_routing(ids, num_experts).offsets
    assert offsets.dtype == torch.int32
    assert offsets.tolist() == [2 * (e + 1) for e in range(num_experts)]


def _experts(num_experts):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=8, intermediate_size=8, num_local_experts=num_experts,
                                        num_experts_per_tok=2)
    experts = MixtralExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.3)
        experts.down_proj.normal_(0, 0.3)
    return experts


def test_tokens_of_the_last_experts_of_a_large_block_use_their_own_weights():
    E = 4100
    base = _experts(E)
    layer = ExpertLoRA(base, {"down_proj": 2})
    h = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    idx = torch.tensor([[E - 2, 0], [E - 1, E - 2], [E - 3, 5]])
    w = torch.rand(3, 2, generator=torch.Generator().manual_seed(2))
    eager = type(base).forward.__wrapped__  # transformers' loop over the routed experts
    with torch.no_grad():
        torch.testing.assert_close(layer(h, idx, w), eager(base, h, idx, w))

