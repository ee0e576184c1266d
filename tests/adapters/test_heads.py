"""ALPS-style head selection: scores, top-k, gradient masking, parameter count, probe helper, errors."""

import copy

import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters.heads import attention_blocks, head_scores, restrict_to_heads, select_heads, selected_parameter_count, top_heads

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def test_scores_find_the_changed_head():
    base = make_tiny_llama()
    tuned = copy.deepcopy(base)
    d = 8  # hidden 32 / 4 heads
    with torch.no_grad():
        tuned.model.layers[1].self_attn.q_proj.weight[2 * d:3 * d] *= 1.5
        tuned.model.layers[0].self_attn.o_proj.weight[:, 0:d] += 0.001
    for metric in ("wasserstein", "l2"):
        scores = head_scores(base, tuned, metric)
        assert scores.shape == (2, 4)
        assert top_heads(scores, 0.125) == [(1, 2)]
        assert set(top_heads(scores, 0.25)) == {(1, 2), (0, 0)}
        assert (scores[0, 1:] == 0).all() and (scores[1, [0, 1, 3]] == 0).all()
    # W1 written out for the changed head: mean |sorted differences|
    p = torch.cat([base.model.layers[1].self_attn.q_proj.weight[16:24].flatten(), base.model.layers[1].self_attn.o_proj.weight[:, 16:24].flatten()])
    q = torch.cat([tuned.model.layers[1].self_attn.q_proj.weight[16:24].flatten(), tuned.model.layers[1].self_attn.o_proj.weight[:, 16:24].flatten()])
    torch.testing.assert_close(head_scores(base, tuned)[1, 2], (p.sort().values - q.sort().values).abs().mean().detach())


def test_restrict_masks_gradients_of_other_heads():
    model = make_tiny_llama()
    heads = [(0, 1), (1, 3)]
    handles = restrict_to_heads(model, heads)
    model(input_ids=IDS, labels=IDS).loss.backward()
    d, group = 8, 2  # 4 heads, 2 kv heads
    for layer, head in ((0, 1), (1, 3)):
        attn = model.model.layers[layer].self_attn
        gq, go = attn.q_proj.weight.grad, attn.o_proj.weight.grad
        rows = torch.zeros(32, dtype=torch.bool)
        rows[head * d:(head + 1) * d] = True
        assert gq[rows].abs().sum() > 0 and (gq[~rows] == 0).all()
        assert go[:, rows].abs().sum() > 0 and (go[:, ~rows] == 0).all()
        kv_rows = torch.zeros(16, dtype=torch.bool)
        kv_rows[(head // group) * d:(head // group + 1) * d] = True
        assert (attn.k_proj.weight.grad[~kv_rows] == 0).all() and attn.v_proj.weight.grad[kv_rows].abs().sum() > 0
    assert model.model.layers[0].mlp.up_proj.weight.grad is None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * (2 * 32 * 32 + 2 * 16 * 32)  # whole q/k/v/o matrices carry requires_grad ...
    assert selected_parameter_count(model, heads) == 2 * (2 * 8 * 32 * 2)  # ... but only these slices move
    for h in handles:
        h.remove()


def test_select_heads_probe_leaves_model_untouched():
    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": (ids := torch.randint(0, 128, (2, 6), generator=g)), "labels": ids} for _ in range(3)]
    heads = select_heads(model, batches, fraction=0.25, steps=3, lr=1e-2)
    assert len(heads) == 2 and len(set(heads)) == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(attention_blocks(model)) == 2


def test_errors():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="outside the model"):
        restrict_to_heads(model, [(5, 0)])
    with pytest.raises(ValueError, match="fraction"):
        top_heads(torch.ones(2, 2), 0.0)
    with pytest.raises(ValueError, match="metric"):
        head_scores(model, model, "cosine")
    with pytest.raises(ValueError, match="no batches"):
        select_heads(model, [], steps=2)
    with pytest.raises(ValueError, match="no attention block"):
        attention_blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("scores", [torch.rand(4), torch.rand(2, 3, 4), torch.rand(0, 4)])
def test_top_heads_refuses_scores_that_are_not_layers_by_heads(scores):
    # a 1-D vector raised IndexError from scores.shape[1]; a 3-D one came back as wrong (layer, head) pairs
    with pytest.raises(ValueError, match=r"scores must be a non-empty \(layers, heads\) tensor"):
        top_heads(scores, 0.5)
