"""An empty list of adapter names: ``set_adapter`` refuses it, as ``merge`` / ``merge_and_unload`` /
``add_weighted_adapter`` do, and ``delete_adapter`` names a list it cannot take.

``set_adapter(model, [])`` used to switch every adapter off and freeze them all without a word: the model ran its
base, and an optimizer built from the trainable parameters got none. The way to the base is ``disabled(model)``."""

import pytest
import torch
from torch import nn

from alignlab.adapters import (LoRAConfig, active_adapters, add_weighted_adapter, delete_adapter, disabled, inject,
                               merge, merge_and_unload, set_adapter)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    inject(model, LoRAConfig(r=2, target_modules=["0", "2"]), adapter_name="a")
    inject(model, LoRAConfig(r=2, target_modules=["0", "2"]), adapter_name="b")
    with torch.no_grad():  # B starts at zero: give the adapters an effect to lose
        for layer in (model[0], model[2]):
            for name in ("a", "b"):
                layer.lora_B[name].weight.normal_()
    return model


def _trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("empty", [[], (), {}.keys()])
def test_set_adapter_refuses_no_names_and_leaves_the_model_as_it_was(empty):
    model = _model()
    x = torch.randn(3, 4)
    out, trainable = model(x), _trainable(model)
    with pytest.raises(ValueError, match=r"names is empty.*disabled\(model\)"):
        set_adapter(model, empty)
    assert active_adapters(model) == ["a"]
    assert _trainable(model) == trainable and trainable
    torch.testing.assert_close(model(x), out)
    with disabled(model):  # the way to the base model the message names
        base = model(x)
    assert not torch.allclose(base, out)


def test_set_adapter_none_is_a_type_error_naming_names():
    with pytest.raises(TypeError, match="names must be an adapter name"):
        set_adapter(_model(), None)


def test_other_name_list_functions_refuse_an_empty_list():
    model = _model()
    for call in (lambda: merge(model, []), lambda: merge_and_unload(model, [])):
        with pytest.raises(ValueError, match="adapter_names is empty"):
            call()
    with pytest.raises(ValueError, match="non-empty"):
        add_weighted_adapter(model, [], [], "mix")
    assert active_adapters(model) == ["a"] and not model[0].merged


@pytest.mark.parametrize("names", [[], ["a"]])
def test_delete_adapter_names_a_list(names):
    model = _model()
    with pytest.raises(TypeError, match="name must be one adapter name"):
        delete_adapter(model, names)
    assert sorted(model[0].adapter_names()) == ["a", "b"]


def test_a_name_given_twice_is_refused_where_it_would_run_or_merge_twice():
    """``set_adapter(model, ["a", "a"])`` summed adapter a twice (base + 2ΔW) and ``merge`` folded it twice; both
    refuse now, leaving the model as it was. ``add_weighted_adapter`` still takes a name twice (weights add)."""
    model = _model()
    x = torch.randn(3, 4)
    out = model(x)
    with pytest.raises(ValueError, match=r"names names \['a'\] more than once"):
        set_adapter(model, ["a", "b", "a"])
    for call in (lambda: merge(model, ["b", "b"]), lambda: merge_and_unload(model, ["a", "a"])):
        with pytest.raises(ValueError, match=r"adapter_names names \['.'\] more than once"):
            call()
    assert active_adapters(model) == ["a"] and not model[0].merged
    torch.testing.assert_close(model(x), out)
    add_weighted_adapter(model, ["a", "a"], [0.5, 0.5], "twice", combination="linear")
