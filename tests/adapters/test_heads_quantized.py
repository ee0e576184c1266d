"""ALPS trains the selected slices of the base attention weights in place: on a quantized model (NF4 projections,
frozen packed codes) there is nothing to train. ``select_heads`` failed inside its probe's backward with torch's
"element 0 of tensors does not require grad", and ``restrict_to_heads`` froze the whole model and returned, so a
training loop ran with no trainable parameter; both now refuse it by name, the model left as it was. Scoring
(:func:`head_scores`) only reads weights and still works on NF4 models."""

import copy

import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters import head_scores, restrict_to_heads, select_heads
from alignlab.quant import quantize_model

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _nf4(**kw):
    return quantize_model(make_tiny_llama(), compute_dtype=torch.float32, **kw)


def test_select_heads_refuses_quantized_projections_by_name():
    model = _nf4()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*quantized"):
        select_heads(model, [dict(input_ids=IDS, labels=IDS)], fraction=0.25, steps=1)


def test_restrict_to_heads_refuses_and_leaves_the_model_as_it_was():
    model = _nf4(skip=["q_proj", "k_proj", "v_proj"])  # o_proj alone is quantized
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.o_proj.*quantized"):
        restrict_to_heads(model, [(0, 1)])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_head_scores_still_read_nf4_weights():
    base = _nf4()
    scores = head_scores(base, copy.deepcopy(base))
    assert scores.shape == (2, 4) and (scores == 0).all()
