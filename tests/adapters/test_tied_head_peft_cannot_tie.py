"""``ensure_weight_tying`` on an embedding PEFT does not tie (GPT-2's ``wte``; PEFT 0.21 ties only ``embed_tokens``):
PEFT loads our file, drops the head's keys without a word and computes without the head's update (logits 22 off on a
tiny GPT-2). ``save_adapter`` now says so with a ``RuntimeWarning``; alignlab reads its file back as saved."""

import warnings

import pytest
import torch
import transformers

from alignlab.adapters import LoRAConfig, TiedLoRAHead, inject, load_adapter, save_adapter

IDS = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def _trained(model, targets):
    model = inject(model, LoRAConfig(r=4, target_modules=targets, ensure_weight_tying=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    return model


def test_saving_a_head_tied_to_wte_warns_and_reloads_as_saved(tmp_path):
    model = _trained(_gpt2(), ["c_attn", "wte"])
    assert isinstance(model.lm_head, TiedLoRAHead)
    with pytest.warns(RuntimeWarning, match="'lm_head' carries the LoRA of the embedding 'transformer.wte'.*PEFT does not tie"):
        save_adapter(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(_gpt2(), tmp_path)(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_saving_a_head_tied_to_embed_tokens_does_not_warn(tmp_path):
    model = _trained(_llama(), ["q_proj", "embed_tokens"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        save_adapter(model, tmp_path)
