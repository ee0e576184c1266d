"""``set_adapter`` refusing adapters whose token rows overlap leaves every layer as it was.

The layers before the refusing one (every LoRA layer before ``lm_head``) were switched already, so the model ran
``a + b`` there while ``active_adapters`` still said ``["a"]``."""

import pytest

from conftest import make_tiny_llama

from alignlab.adapters import LoRAConfig, active_adapters, adapter_layers, inject, set_adapter


def test_overlapping_token_rows_refused_without_switching_any_layer():
    model = inject(make_tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"lm_head": [3]}),
                   adapter_name="a")
    inject(model, LoRAConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"lm_head": [3, 4]}), adapter_name="b")
    with pytest.raises(ValueError, match=r"overlapping token ids \(\[3\]\)"):
        set_adapter(model, ["a", "b"])
    assert active_adapters(model) == ["a"]
    assert {name: layer.active_adapters for name, layer in adapter_layers(model)} == {
        name: ["a"] for name, _ in adapter_layers(model)}
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A["a"].weight.requires_grad and not q.lora_A["b"].weight.requires_grad


def test_two_trained_copies_of_one_module_cannot_be_active_together():
    """Two adapters that each train their own copy of ``lm_head`` (``modules_to_save``): a copy cannot be summed, and
    the first name's copy ran alone, so ``["a", "b"]`` and ``["b", "a"]`` gave different logits without a word.
    Refused before any change, as PEFT refuses it ("Only one adapter can be set at a time for ModulesToSaveWrapper");
    copies of different modules, or one copy beside a plain LoRA, stay fine."""
    model = inject(make_tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                   adapter_name="a")
    inject(model, LoRAConfig(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"]), adapter_name="b")
    before = {name: list(layer.active_adapters) for name, layer in adapter_layers(model)}
    with pytest.raises(ValueError, match=r"\['a', 'b'\].*'lm_head'.*modules_to_save"):
        set_adapter(model, ["a", "b"])
    assert active_adapters(model) == ["a"]
    assert {name: layer.active_adapters for name, layer in adapter_layers(model)} == before
    assert model.lm_head.active_adapters == ["a"]
    inject(model, LoRAConfig(r=2, target_modules=["k_proj"], modules_to_save=["model.norm"]), adapter_name="c")
    set_adapter(model, ["a", "c"])
    assert active_adapters(model) == ["a", "c"]
