"""Soft prompts and an attention mask that is not ``(batch, seq)``: ``generate(cache_implementation="static")`` hands
the model a prepared 4-D mask (transformers 5), as does a caller with a hand-built one. The hook concatenated ones of
shape ``(batch, n)`` onto it and failed deep inside with "Tensors must have same number of dimensions: got 2 and 4"
(PEFT 0.21: ``KeyError: 'cache_position'``). Both now raise a ``ValueError`` that names the mask and the way out."""

import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters import PrefixTuningConfig, PromptTuningConfig, inject

IDS = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 5, [0, 0] + [1] * 3])
CONFIGS = {"prompt": lambda: PromptTuningConfig(num_virtual_tokens=3), "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=3)}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_generate_with_a_static_cache_is_refused_clearly(kind):
    model = inject(make_tiny_llama(), CONFIGS[kind]())
    with pytest.raises(ValueError, match=r"2-D attention_mask.*static"):
        model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=2, do_sample=False, pad_token_id=0,
                       cache_implementation="static")
    # the default (dynamic) cache still works
    out = model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 7)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_a_4d_mask_in_a_forward_call_is_refused_clearly(kind):
    model = inject(make_tiny_llama(), CONFIGS[kind]())
    mask4d = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match=r"2-D attention_mask \(batch, seq\), got shape \(2, 1, 5, 5\)"):
        model(input_ids=IDS, attention_mask=mask4d)
