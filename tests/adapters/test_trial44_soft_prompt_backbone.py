"""Soft prompts reach a direct call of the backbone, ``model.model(...)``, which the fused losses use for hidden
states (docs: DPO, GRPO, distillation); the hook sat on the task model only, so such calls silently ran the
frozen base: a policy equal to its reference, and no gradient for the prompt."""

import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters import PrefixTuningConfig, PromptTuningConfig, disabled, inject

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 7, [0, 0] + [1] * 5])


@pytest.mark.parametrize("config", [PromptTuningConfig(num_virtual_tokens=3), PrefixTuningConfig(num_virtual_tokens=3)],
                         ids=["prompt", "prefix"])
def test_backbone_call_sees_the_soft_prompt(config):
    base = make_tiny_llama()
    with torch.no_grad():
        plain = base.model(input_ids=IDS, attention_mask=MASK).last_hidden_state
    model = inject(base, config)
    full = model(input_ids=IDS, attention_mask=MASK, labels=IDS, output_hidden_states=True)
    hidden = model.model(input_ids=IDS, attention_mask=MASK).last_hidden_state
    n = 3 if isinstance(config, PromptTuningConfig) else 0  # prompt tuning's hidden states hold the virtual tokens
    assert hidden.shape == (2, 7 + n, 32)
    torch.testing.assert_close(hidden, full.hidden_states[-1])
    torch.testing.assert_close(model.lm_head(hidden), full.logits)
    assert not torch.allclose(hidden[:, n:], plain)
    model.lm_head(hidden).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    with disabled(model), torch.no_grad():  # the DPO reference through the backbone: the base
        torch.testing.assert_close(model.model(input_ids=IDS, attention_mask=MASK).last_hidden_state, plain,
                                   rtol=0, atol=0)
