"""``merge_and_unload`` of a ``modules_to_save`` copy whose original is tied to another module.

GPT-2 (and Gemma, ...) tie ``lm_head.weight`` to the input embedding. A ``modules_to_save`` copy of either one is
trained on its own, and ``merge_and_unload`` puts it in place of the original, but left
``config.tie_word_embeddings = True``: the next ``tie_weights()`` (``resize_token_embeddings``, loaders that honour
the flag) put the other module's table back over the trained one without a word (logits 2.9 off on a tiny GPT-2).
"""

import tempfile
import warnings

import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters import LoRAConfig, inject, merge_and_unload


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def _train_copies(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)


@pytest.mark.parametrize("saved", ["lm_head", "wte"])
def test_tied_copy_unties_the_config(saved):
    model = _tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    inject(model, LoRAConfig(r=2, target_modules=["c_attn"], modules_to_save=[saved]))
    _train_copies(model)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    with pytest.warns(UserWarning, match="tie_word_embeddings is set to False"):
        plain = merge_and_unload(model)
    assert plain.config.tie_word_embeddings is False
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, want)
    plain.tie_weights()  # what resize_token_embeddings and loaders do: must not bring the other table back
    plain.resize_token_embeddings(104)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits[..., :100], want)
    with tempfile.TemporaryDirectory() as d:
        plain.save_pretrained(d)
        again = type(plain).from_pretrained(d).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits[..., :100], want)


def test_untied_or_inactive_copies_leave_the_config_alone():
    model = make_tiny_llama()  # lm_head not tied
    inject(model, LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    _train_copies(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_and_unload(model)
    gpt2 = _tiny_gpt2()
    inject(gpt2, LoRAConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    inject(gpt2, LoRAConfig(r=2, target_modules=["c_attn"]), adapter_name="other")
    from alignlab.adapters import set_adapter

    set_adapter(gpt2, "other")  # the copy is not active: the original (tied) head comes back
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = merge_and_unload(gpt2)
    assert plain.config.tie_word_embeddings is True
    assert plain.lm_head.weight is plain.transformer.wte.weight


def _tiny_switch():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.SwitchTransformersConfig(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                   num_decoder_layers=2, num_heads=4, num_experts=2,
                                                   expert_capacity=64, decoder_start_token_id=0)
    return transformers.SwitchTransformersForConditionalGeneration(config).eval()


@pytest.mark.parametrize("config, how", [
    (LoRAConfig(r=2, target_modules=["q", "lm_head"]), "merge"),
    (LoRAConfig(r=2, target_modules=["q", "lm_head"]), "merge_and_unload"),
    (LoRAConfig(r=2, target_modules=["q", "embed_tokens"]), "merge"),
    (LoRAConfig(r=2, target_modules=["q", "embed_tokens"]), "merge_and_unload"),
    (LoRAConfig(r=2, target_modules=["q"], modules_to_save=["lm_head"]), "merge_and_unload"),  # merge keeps the copy
])
def test_untie_refused_where_the_forward_reads_the_tie_flag(config, how):
    """SwitchTransformers (and UDOP) scale the decoder output by ``d_model ** -0.5`` only while
    ``config.tie_word_embeddings`` is True: the untie a merge into a tied table needs set it False, and the merged
    model's logits were 17 off the adapter's, without a word. Refused before any change (PEFT merges into the shared
    table instead, which changes the other modules)."""
    from alignlab.adapters import merge

    model = _tiny_switch()
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.shared.weight
    inject(model, config)
    _train_copies(model)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    kw = dict(input_ids=ids, decoder_input_ids=ids[:, :4])
    with torch.no_grad():
        want = model(**kw).logits
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        merge_and_unload(model) if how == "merge_and_unload" else merge(model)
    assert model.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(model(**kw).logits, want, rtol=0, atol=0)


def test_merge_that_unties_nothing_is_fine_where_the_forward_reads_the_tie_flag():
    model = _tiny_switch()
    inject(model, LoRAConfig(r=2, target_modules=["q", "v"]))
    _train_copies(model)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    kw = dict(input_ids=ids, decoder_input_ids=ids[:, :4])
    with torch.no_grad():
        want = model(**kw).logits
        torch.testing.assert_close(merge_and_unload(model)(**kw).logits, want)
