"""transformers' ``resize_token_embeddings`` after ``inject``: with an adapter over the input embedding or the output head
(trainable token rows, LoRA on ``embed_tokens`` / ``lm_head``, either in ``modules_to_save``) it failed with
``AttributeError: ... has no attribute 'weight'`` or transformers' ``TypeError`` on the wrapper's type, and where only
the head was wrapped, after the input table was already resized (a model with 136 input rows and 128 logits). On T5 a
LoRA on ``encoder`` / ``decoder.embed_tokens`` was replaced by the resized ``shared`` table: the adapter was gone.
PEFT fails the same ways (its docs: resize, then ``get_peft_model``). It is now a ``ValueError`` before any change,
giving the order of calls; a model whose adapters stay away from those tables resizes as before."""

import copy
import warnings

import pytest
import torch
from torch import nn

from conftest import make_tied_llama, make_tiny_llama, make_tiny_t5

from alignlab.adapters import LoRAConfig, adapter_configs, delete_adapter, inject, merge_and_unload

OVER_TABLES = {
    "token rows": dict(target_modules=["q_proj"], trainable_token_indices=[1, 2]),
    "LoRA on the embedding": dict(target_modules=["q_proj", "embed_tokens"]),
    "LoRA on the head": dict(target_modules=["q_proj", "lm_head"]),
    "saved embedding": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
    "saved head": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


def _shapes(model: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _inject_quietly(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the tied head a LoRA on lm_head shares with the embedding
        return inject(model, LoRAConfig(r=4, **kw))


@pytest.mark.parametrize("make", [make_tiny_llama, make_tied_llama], ids=["untied", "tied"])
@pytest.mark.parametrize("case", OVER_TABLES)
def test_resizing_under_an_adapter_over_the_vocabulary_tables_is_refused_before_any_change(make, case):
    model = _inject_quietly(make(), **OVER_TABLES[case])
    vocab, shapes = model.config.vocab_size, _shapes(model)
    modules = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=r"resize_token_embeddings.*resize the vocabulary first, then inject"):
        model.resize_token_embeddings(vocab + 8)
    assert model.config.vocab_size == vocab and _shapes(model) == shapes
    assert [(n, type(m)) for n, m in model.named_modules()] == modules


@pytest.mark.parametrize("kw", [dict(target_modules=["q", "embed_tokens"]), dict(target_modules=["q"],
                                modules_to_save=["lm_head"]), dict(target_modules=["q"], trainable_token_indices=[1])],
                         ids=["LoRA on embed_tokens", "saved head", "token rows"])
def test_t5_resize_keeps_the_adapters_on_the_embed_tokens_that_share_the_table(kw):
    # set_input_embeddings put the resized `shared` in place of encoder/decoder.embed_tokens, LoRA layers and all
    model = _inject_quietly(make_tiny_t5(), **kw)
    shapes = _shapes(model)
    modules = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match="resize the vocabulary first"):
        model.resize_token_embeddings(72)
    assert _shapes(model) == shapes and [(n, type(m)) for n, m in model.named_modules()] == modules


@pytest.mark.parametrize("make", [make_tiny_llama, make_tied_llama], ids=["untied", "tied"])
def test_adapters_away_from_the_tables_resize_as_before(make):
    model = _inject_quietly(make(), target_modules=["q_proj", "v_proj"])
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(ids).logits
    vocab = model.config.vocab_size
    model.resize_token_embeddings(vocab + 8)
    with torch.no_grad():
        after = model(ids).logits
    assert after.shape[-1] == vocab + 8 and model.config.vocab_size == vocab + 8
    torch.testing.assert_close(after[..., :vocab], before)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "LoRALinear"
    assert not model.model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad


def test_after_merge_and_unload_or_delete_adapter_the_model_resizes():
    merged = merge_and_unload(_inject_quietly(make_tiny_llama(), **OVER_TABLES["LoRA on the embedding"]))
    assert "resize_token_embeddings" not in merged.__dict__  # a plain model again
    merged.resize_token_embeddings(136)
    assert merged.lm_head.out_features == 136
    kept = _inject_quietly(make_tiny_llama(), **OVER_TABLES["saved head"])
    delete_adapter(kept, "default")
    kept.resize_token_embeddings(136)
    assert kept.lm_head.out_features == 136 and adapter_configs(kept) == {}


def test_a_deep_copy_checks_and_resizes_itself():
    model = _inject_quietly(make_tiny_llama(), **OVER_TABLES["token rows"])
    twin = copy.deepcopy(model)
    delete_adapter(twin, "default")
    twin.resize_token_embeddings(136)
    assert twin.model.embed_tokens.num_embeddings == 136 and model.config.vocab_size == 128
    with pytest.raises(ValueError, match="resize the vocabulary first"):
        model.resize_token_embeddings(136)


def test_token_ids_beyond_the_table_say_to_resize_first():
    with pytest.raises(ValueError, match=r"out of range.*resize_token_embeddings.*before inject"):
        inject(make_tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[130]))
