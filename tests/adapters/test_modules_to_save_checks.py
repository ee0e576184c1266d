"""``modules_to_save`` is checked before ``inject`` changes the model.

A name that matches no module used to raise after the targets were wrapped: the model kept a LoRA layer whose
adapter no config described, and injecting again failed with "adapter 'default' already exists on this layer".
A quantized module (``NF4Linear``: its weight is frozen uint8 buffers) was accepted, and its copy trained
nothing without a word.
"""

import pytest
import torch
from torch import nn

from alignlab.adapters import LoRAConfig, adapter_configs, inject
from alignlab.quant import NF4Linear, quantize_model


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 8))


def test_an_unknown_name_leaves_the_model_as_it_was():
    net = _net()
    with pytest.raises(ValueError, match="modules_to_save: no module named"):
        inject(net, LoRAConfig(r=2, target_modules=["0"], modules_to_save=["nope"]))
    assert [type(m) for m in net] == [nn.Linear, nn.ReLU, nn.Linear, nn.Linear]
    assert adapter_configs(net) == {}
    inject(net, LoRAConfig(r=2, target_modules=["0"], modules_to_save=["3"]))   # the corrected call works
    assert net[3].modules_to_save["default"].weight.requires_grad


@pytest.mark.parametrize("saved", [["3"], ["2"]])
def test_a_quantized_module_is_refused_by_name(saved):
    net = quantize_model(_net(), quantize_head=True)
    assert isinstance(net[3], NF4Linear)
    with pytest.raises(ValueError, match=f"modules_to_save: '{saved[0]}' holds a quantized"):
        inject(net, LoRAConfig(r=2, target_modules=["0"], modules_to_save=saved))
    assert isinstance(net[0], NF4Linear) and adapter_configs(net) == {}


def test_a_block_holding_a_quantized_linear_is_refused_too():
    net = nn.Sequential(nn.Linear(64, 64), nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64)))
    quantize_model(net, quantize_head=True)
    with pytest.raises(ValueError, match="'1' holds a quantized .*'1.1'"):
        inject(net, LoRAConfig(r=2, target_modules=["0"], modules_to_save=["1"]))


def _llama(tied: bool):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=32, tie_word_embeddings=tied))


@pytest.mark.parametrize("tied, saved, culprit", [(True, "lm_head", "lm_head"), (True, "embed_tokens", "model.embed_tokens"),
                                                  (False, "embed_tokens", "model.embed_tokens")])
def test_token_rows_on_a_module_trained_in_full_are_refused_before_any_change(tied, saved, culprit):
    model = _llama(tied)
    config = LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=[saved], trainable_token_indices=[3, 4])
    with pytest.raises(ValueError, match=f"trainable_token_indices: {culprit!r}.*modules_to_save"):
        inject(model, config)
    assert adapter_configs(model) == {}
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding


def test_token_rows_beside_an_untied_head_trained_in_full_are_fine():
    model = _llama(False)
    inject(model, LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], trainable_token_indices=[3]))
    assert model.lm_head.weight.requires_grad
