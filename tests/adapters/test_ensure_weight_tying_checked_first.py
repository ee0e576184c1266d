"""``ensure_weight_tying`` with a tied head that cannot carry the embedding's update (a LoRA target itself, or
already holding another adapter layer) is a ValueError raised before ``inject`` changes the model; it used to
come after the LoRA layers were in place and the config registered, so a corrected retry failed with
"adapter 'default' already exists"."""

import pytest
import torch
from torch import nn

from alignlab.adapters import LoRAConfig, adapter_configs, inject
from conftest import make_tied_llama

transformers = pytest.importorskip("transformers")


def test_the_head_as_a_target_too_is_refused_before_any_change():
    model = make_tied_llama()
    with pytest.raises(ValueError, match="ensure_weight_tying: the head 'lm_head' tied to 'model.embed_tokens'"):
        inject(model, LoRAConfig(r=2, target_modules=["embed_tokens", "lm_head"], ensure_weight_tying=True))
    assert adapter_configs(model) == {}
    assert type(model.model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear
    inject(model, LoRAConfig(r=2, target_modules=["embed_tokens"], ensure_weight_tying=True))   # the corrected call
    assert type(model.lm_head).__name__ == "TiedLoRAHead"


def test_a_head_holding_another_adapter_is_refused_before_any_change():
    model = make_tied_llama()
    inject(model, LoRAConfig(r=2, target_modules=["lm_head"]), adapter_name="a")
    with pytest.raises(ValueError, match="ensure_weight_tying: the head 'lm_head' tied to 'model.embed_tokens' holds a LoRALinear"):
        inject(model, LoRAConfig(r=2, target_modules=["embed_tokens"], ensure_weight_tying=True), adapter_name="b")
    assert list(adapter_configs(model)) == ["a"]
    assert type(model.model.embed_tokens) is nn.Embedding
