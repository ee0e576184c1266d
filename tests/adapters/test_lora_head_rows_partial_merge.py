"""Merging a LoRA on a tied head alone, while trainable token rows of another adapter sit active and unmerged under
it (a7043ce's nesting): the rows layer scores its ids with ``x Dᵀ``, so a ``ΔW`` merged into the head's weight never
reached those logits (22 off on the tiny Llama), where the unmerged model adds ``s·B A x`` to them. The merge is
refused before any change (the head stays tied, nothing merged); merging the rows first, or both (or an adapter the
head does not hold), keeps the logits."""

import warnings

import pytest
import torch

from conftest import make_tied_llama, randomise_trainable

from alignlab.adapters import LoRAConfig, inject, merge, set_adapter, unmerge

IDS = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _model():
    model = inject(make_tied_llama(), LoRAConfig(r=2, target_modules=["lm_head"]), adapter_name="a")
    inject(model, LoRAConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[7]), adapter_name="b")
    inject(model, LoRAConfig(r=2, target_modules=["v_proj"]), adapter_name="c")
    randomise_trainable(model, scale=1.0)
    set_adapter(model, ["a", "b", "c"])
    return model


def test_merging_the_head_alone_over_live_rows_is_refused_before_any_change():
    model = _model()
    want = _logits(model)
    with pytest.raises(ValueError, match=r"lm_head: .*token rows of adapters \['b'\]"):
        merge(model, ["a"])
    assert not any(getattr(m, "merged_adapters", None) for m in model.modules())
    assert model.lm_head.base_layer.base_layer.weight is model.model.embed_tokens.base_layer.weight  # still tied
    assert model.config.tie_word_embeddings
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"token rows of adapters \['b'\]"):
        model.lm_head.merge(["a"])  # the layer's own merge too
    assert not model.lm_head.merged_adapters


@pytest.mark.parametrize("order", [[["a", "b"]], [["b"], ["a"]], [None], [["c"]]])  # c: the head takes no part
def test_merging_the_rows_first_or_together_keeps_the_logits(order):
    model = _model()
    want = _logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # merging into the tied head unties it
        for names in order:
            merge(model, names)
    torch.testing.assert_close(_logits(model), want, rtol=1e-4, atol=1e-4)
    unmerge(model)
    torch.testing.assert_close(_logits(model), want, rtol=1e-4, atol=1e-4)
