"""alignlab.hf_cache.cache_keyword through wrappers that pass keyword arguments on.

``torch.compile``'s module, DataParallel and a PEFT model declare ``forward(*args, **kwargs)``: the keyword was
read off the wrapper and fell back to ``past_key_values``, so CompanionLM handed a transformers >= 5.24 model
inside one the deprecated name (a deprecation warning every decoding step, removed in 5.40). The oracle is the
keyword the wrapped model itself declares.
"""

import pytest
import torch
from torch import nn

from alignlab.hf_cache import cache_keyword


class _NewModel(nn.Module):  # a model of transformers >= 5.24
    def forward(self, input_ids, cache=None, **kwargs):
        return input_ids


class _OldModel(nn.Module):  # a model of an older release
    def forward(self, input_ids, past_key_values=None, **kwargs):
        return input_ids


class _PassThrough(nn.Module):  # PEFT's shape: forward(*args, **kwargs) and get_base_model()
    def __init__(self, model):
        super().__init__()
        self.model = model

    def get_base_model(self):
        return self.model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


WRAPPERS = {
    "compile": torch.compile,
    "data_parallel": nn.DataParallel,
    "peft_like": _PassThrough,
    "compiled_peft_like": lambda m: torch.compile(_PassThrough(m)),
}


@pytest.mark.parametrize("model", [_NewModel, _OldModel], ids=["cache", "past_key_values"])
@pytest.mark.parametrize("wrap", list(WRAPPERS), ids=list(WRAPPERS))
def test_a_pass_through_wrapper_takes_the_keyword_of_the_model_inside(model, wrap):
    inner = model()
    assert cache_keyword(WRAPPERS[wrap](inner)) == cache_keyword(inner)


def test_a_module_without_a_cache_keyword_or_a_wrapped_model_keeps_the_long_lived_name():
    assert cache_keyword(nn.Linear(2, 2)) == "past_key_values"
    assert cache_keyword(_PassThrough(nn.Linear(2, 2))) == "past_key_values"


def test_a_peft_model_takes_the_keyword_of_its_base_model():
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    base = transformers.LlamaForCausalLM(config)
    wrapped = peft.get_peft_model(transformers.LlamaForCausalLM(config), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert cache_keyword(wrapped) == cache_keyword(base)
