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
