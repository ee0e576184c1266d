"""quantize_model(quantize_head=True) on a model whose lm_head shares the input embedding: it warns that the tie
is broken and unties the config, so transformers' tie_weights() no longer hangs the dense table on the NF4 head."""

import warnings

import pytest
import torch

from alignlab.quant import NF4Linear, quantize_model

transformers = pytest.importorskip("transformers")


def _llama(tie: bool):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_quantizing_a_tied_head_warns_and_unties():
    torch.manual_seed(0)
    model = _llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.warns(UserWarning, match=r"lm_head.weight \(tied to \['model.embed_tokens.weight'\]\)"):
        quantize_model(model, quantize_head=True, compute_dtype=torch.float32)
    assert isinstance(model.lm_head, NF4Linear) and not model.config.tie_word_embeddings
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        y = model(input_ids=ids).logits
    model.tie_weights()  # registered the embedding as an unused 'weight' parameter of the NF4 head
    assert "weight" not in model.lm_head._parameters
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, y)


def test_untied_or_kept_heads_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(_llama(tie=False), quantize_head=True)
        model = quantize_model(_llama(tie=True))  # the head stays dense: still tied
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings


def test_a_tied_head_is_refused_where_the_forward_reads_the_tie_flag():
    """SwitchTransformers (and UDOP) rescale the decoder output by ``d_model ** -0.5`` only while
    ``config.tie_word_embeddings`` is True: the NF4 copy of a tied head sets it False, which moved the logits by 35 on
    a tiny model. Refused before any module is replaced; the head left dense is still fine."""
    torch.manual_seed(0)
    config = transformers.SwitchTransformersConfig(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                   num_decoder_layers=2, num_heads=4, num_experts=2,
                                                   expert_capacity=64, decoder_start_token_id=0)
    model = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.shared.weight
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    kw = dict(input_ids=ids, decoder_input_ids=ids[:, :4])
    with torch.no_grad():
        want = model(**kw).logits
    with pytest.raises(ValueError, match=r"lm_head.weight \(tied to .*SwitchTransformersForConditionalGeneration"):
        quantize_model(model, compute_dtype=torch.float32, quantize_head=True)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.shared.weight
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(**kw).logits, want, rtol=0, atol=0)
    quantize_model(model, compute_dtype=torch.float32)  # the head stays dense and tied
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.shared.weight


@pytest.mark.parametrize("compute_dtype", [torch.float64, "bf16", None])
def test_a_bad_compute_dtype_is_refused_before_the_tie_is_broken(compute_dtype):
    """compute_dtype was checked by the first NF4Linear, after the tied head's config flag was cleared (and its
    warning given): the refused call left a model whose config said untied while its weights still were."""
    model = _llama(tie=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no untying warning either
        with pytest.raises(TypeError, match="compute_dtype must be one of"):
            quantize_model(model, compute_dtype=compute_dtype, quantize_head=True)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
