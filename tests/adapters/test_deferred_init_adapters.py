"""Deferred init (build under ``torch.device("meta")``, ``to_empty``, ``load_state_dict``) of adapters that keep
non-persistent buffers: VeRA's shared projections (drawn from the seed again when they leave meta) and trainable
token rows (index tensors made again, originals read from the loaded table). Before (a helper's find, 2026-12-07):
VeRA's logits came out wrong with no error, and ``inject`` with ``trainable_token_indices`` on a meta model raised
"Cannot copy out of meta tensor"."""

import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters import LoRAConfig, VeRAConfig, disabled, inject, merge, unmerge

IDS = torch.tensor([[3, 5, 7, 9, 11, 3, 5]])
CONFIGS = {
    "vera": lambda: VeRAConfig(r=8, target_modules=["q_proj", "v_proj"]),
    "tokens": lambda: LoRAConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 5]),
}


def _deferred(config):
    with torch.device("meta"):
        model = make_tiny_llama()
        inject(model, config())
    model.to_empty(device="cpu")
    return model


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_meta_to_empty_then_load_gives_the_models_outputs(kind):
    model = inject(make_tiny_llama(), CONFIGS[kind]())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    model.eval()
    deferred = _deferred(CONFIGS[kind])
    deferred.load_state_dict(model.state_dict())
    rotary = deferred.model.rotary_emb  # transformers' own non-persistent buffer, which its from_pretrained remakes
    rotary.inv_freq.copy_(model.model.rotary_emb.inv_freq)
    deferred.eval()
    with torch.no_grad():
        torch.testing.assert_close(deferred(IDS).logits, model(IDS).logits, rtol=0, atol=0)
        with disabled(deferred), disabled(model):
            torch.testing.assert_close(deferred(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    if kind == "tokens":  # merging and unmerging put back the loaded table's rows
        table = deferred.model.embed_tokens.base_layer.weight.detach().clone()
        merge(deferred)
        unmerge(deferred)
        torch.testing.assert_close(deferred.model.embed_tokens.base_layer.weight, table, rtol=0, atol=0)


def test_token_rows_refuse_to_merge_before_a_load():
    deferred = _deferred(CONFIGS["tokens"])
    layer = deferred.model.embed_tokens
    assert layer.token_indices("default") == [3, 5]
    with pytest.raises(ValueError, match="original rows are unknown"):
        merge(deferred)


def test_a_refused_merge_changes_no_layer():
    deferred = _deferred(CONFIGS["tokens"])
    with torch.no_grad():  # values in place of to_empty's uninitialized memory (NaNs compare unequal)
        for t in deferred.state_dict().values():
            if t.is_floating_point():
                t.normal_()
    before = {k: v.clone() for k, v in deferred.state_dict().items()}
    with pytest.raises(ValueError, match="model.embed_tokens: adapter 'default': the original rows are unknown"):
        merge(deferred)
    after = deferred.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    from alignlab.adapters import adapter_layers
    assert not any(layer.merged_adapters for _, layer in adapter_layers(deferred))


def test_vera_projections_written_after_deferred_init_just_move():
    """Projections drawn when leaving meta are drawn again at a later move (the values it would carry); once written
    (a file's vera_A / vera_B loaded into them, or by hand) a move carries the written values."""
    deferred = _deferred(CONFIGS["vera"])
    proj = deferred.model.layers[0].self_attn.q_proj.projections["default"]
    drawn = proj.A.clone()
    fresh = inject(make_tiny_llama(), CONFIGS["vera"]()).model.layers[0].self_attn.q_proj.projections["default"]
    torch.testing.assert_close(drawn, fresh.A, rtol=0, atol=0)
    deferred.double()
    torch.testing.assert_close(proj.A, drawn.double(), rtol=0, atol=0)
    with torch.no_grad():
        proj.A.mul_(2)
    deferred.float()
    torch.testing.assert_close(proj.A, 2 * drawn, rtol=0, atol=0)
    proj.A = proj.A.clone()  # a replaced buffer: moved as any other
    deferred.double()
    torch.testing.assert_close(proj.A, 2 * drawn.double(), rtol=0, atol=0)
