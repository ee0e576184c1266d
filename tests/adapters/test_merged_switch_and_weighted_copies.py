"""Two silent wrong-output cases (a helper's finds, 2026-12-07): set_adapter after merge ran the merged adapter in
the base weight beside the new one; add_weighted_adapter dropped the adapters' trained modules_to_save copies."""

import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters import LoRAConfig, add_weighted_adapter, inject, merge, set_adapter, unmerge

IDS = torch.tensor([[3, 5, 7, 9, 11]])


def _two_adapters(**config):
    model = make_tiny_llama()
    for name in ("a", "b"):
        inject(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], **config), adapter_name=name)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def test_set_adapter_that_leaves_out_a_merged_adapter_is_refused():
    model = _two_adapters()
    set_adapter(model, "b")
    with torch.no_grad():
        only_b = model(IDS).logits
    set_adapter(model, "a")
    merge(model)
    with pytest.raises(ValueError, match=r"adapter\(s\) \['a'\] are merged into its base weight.*unmerge\(model\)"):
        set_adapter(model, "b")
    assert all(layer.active_adapters == ["a"] for layer in _layers(model))  # nothing switched
    set_adapter(model, ["a", "b"])  # the merged one stays listed: base + a (merged) + b is what runs, as listed
    set_adapter(model, "a")
    unmerge(model)
    set_adapter(model, "b")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, only_b, rtol=1e-5, atol=1e-5)  # (unmerge rounds)


def _layers(model):
    from alignlab.adapters import adapter_layers

    return [layer for _, layer in adapter_layers(model)]


@pytest.mark.parametrize("both", [True, False])
def test_weighted_combination_of_adapters_with_saved_copies_is_refused(both):
    model = make_tiny_llama()
    inject(model, LoRAConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), adapter_name="a")
    inject(model, LoRAConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"] if both else None),
           adapter_name="b")
    with pytest.raises(ValueError, match=r"modules_to_save: \['lm_head \(a\)'"):
        add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "mix", combination="cat")
    assert "mix" not in _layers(model)[0].adapter_names()


def test_deleting_the_active_adapter_beside_a_merged_one_activates_the_merged_one():
    """delete_adapter's fallback activation goes through set_adapter: beside a merged adapter it takes that one
    (the earliest remaining would be refused after the deletion, leaving the model half changed)."""
    from alignlab.adapters import delete_adapter

    model = _two_adapters()
    inject(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="c")
    set_adapter(model, "c")
    merge(model, ["b"])  # merged by name while "c" alone is active
    with pytest.warns(UserWarning, match=r"\['b'\] is now the active adapter"):
        delete_adapter(model, "c")
    assert all(layer.active_adapters == ["b"] for layer in _layers(model))
