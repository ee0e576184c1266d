"""``trainable_token_indices`` rows whose module (or the head tied to it) will hold a LoRA layer that cannot take them
are refused before ``inject`` changes the model.

A LoRA on a tied ``lm_head`` next to rows on the embedding was accepted, and the head kept scoring the trained
tokens with the frozen rows (its LoRA wrapper hid it from the tie check); rows on a head that ``ensure_weight_tying``
turns into a ``TiedLoRAHead`` were refused only after the LoRA layers were in place and the config registered.
Plain LoRA on the tied head now takes the rows under it, as PEFT does (``test_lora_head_over_token_rows.py``);
under ``ensure_weight_tying`` (PEFT fails there) it is still refused.
"""

import pytest
import torch
from torch import nn

from alignlab.adapters import LoRAConfig, adapter_configs, inject
from conftest import make_tied_llama

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("config", [
    LoRAConfig(r=2, target_modules=["q_proj", "lm_head"], trainable_token_indices=[3], ensure_weight_tying=True),
    LoRAConfig(r=2, target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True,
               trainable_token_indices={"lm_head": [3]}),
], ids=["lora-on-tied-head", "tied-lora-head"])
def test_rows_on_a_head_that_gets_lora_are_refused_before_any_change(config):
    model = make_tied_llama()
    with pytest.raises(ValueError, match="trainable_token_indices: (the head )?'lm_head' (tied to 'model.embed_tokens' )?also gets a LoRA"):
        inject(model, config)
    assert adapter_configs(model) == {}
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear


def test_rows_on_a_tied_embedding_beside_lora_elsewhere_still_work():
    model = make_tied_llama()
    inject(model, LoRAConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3]))
    assert type(model.lm_head).__name__ == "TrainableTokensLayer"
