"""ALPS head selection: malformed arguments are refused naming them (True selected every head; "0.1", a
float layer index or a 1-tuple failed deep inside with unrelated TypeErrors)."""

import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters import restrict_to_heads, select_heads, selected_parameter_count, top_heads


@pytest.mark.parametrize("fraction", [True, "0.1", None])
def test_top_heads_fraction_must_be_a_number_in_range(fraction):
    with pytest.raises(ValueError, match="fraction must be a number"):
        top_heads(torch.rand(2, 4), fraction)
    assert len(top_heads(torch.rand(2, 4), 0.25)) == 2


@pytest.mark.parametrize("pair", [(0.0, 1), ("0", 1), (0,), (0, 1, 2), (True, 1), 3])
def test_restrict_to_heads_takes_pairs_of_ints(pair):
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="heads must be"):
        restrict_to_heads(model, [pair])
    handles = restrict_to_heads(model, [(1, 3)])
    assert len(handles) == 4 and model.model.layers[1].self_attn.q_proj.weight.requires_grad


@pytest.mark.parametrize("heads, match", [([(0, 99)], "outside the model"), ([(5, 0)], "outside the model"),
                                          ([("0", 1)], "heads must be"), ([(0,)], "heads must be"),
                                          ([(0, 1.5)], "heads must be")])
def test_selected_parameter_count_refuses_what_restrict_to_heads_refuses(heads, match):
    # (0, 99) was counted as a head of layer 0 and (5, 0) or ("0", 1) as nothing, without a word
    model = make_tiny_llama()
    with pytest.raises(ValueError, match=match):
        selected_parameter_count(model, heads)
    with pytest.raises(ValueError, match=match):
        restrict_to_heads(model, heads)
    assert selected_parameter_count(model, [[0, 1], (0, 1)]) == 2 * 8 * 32 * 2  # a list pair, a repeat counted once


@pytest.mark.parametrize("lr", [0, 0.0, -1e-3, float("nan"), float("inf"), "1e-4", None])
def test_select_heads_lr_must_be_a_positive_number(lr):
    # lr = 0 moved no head and returned an arbitrary "top" pick (every score 0)
    model = make_tiny_llama()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        select_heads(model, [{"input_ids": ids, "labels": ids}], steps=1, lr=lr)


def test_select_heads_refuses_a_diverged_probe():
    # a NaN probe gave NaN scores, which topk ranks first: the diverged heads came back as the selection
    model = make_tiny_llama()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="diverged"):
        select_heads(model, [{"input_ids": ids, "labels": ids}] * 4, steps=4, lr=1e20)
    assert len(select_heads(model, [{"input_ids": ids, "labels": ids}] * 3, steps=3, lr=1e-2, fraction=0.25)) == 2


def test_top_heads_refuses_non_finite_scores():
    scores = torch.rand(2, 4)
    scores[1, 2] = float("nan")  # topk ranked it first
    with pytest.raises(ValueError, match="scores must be finite"):
        top_heads(scores, 0.25)
