"""Llama 4's experts (``Llama4TextExperts``) hold fused 3-D weights but are not a transformers
``@use_experts_implementation`` module: no ``is_transposed``, and ``forward(rows already sorted by expert)``.
quantize_model turned them into NF4Experts, and the model then failed in its first forward (NF4Experts.forward()
missing 'top_k_index' and 'top_k_weights'). They are refused at quantization now, with the way to keep them dense."""

import pytest
import torch

from alignlab.quant import NF4Experts, NF4Linear, quantize_model

transformers = pytest.importorskip("transformers")


def _tiny_llama4():
    torch.manual_seed(0)
    config = transformers.Llama4TextConfig(vocab_size=64, hidden_size=32, intermediate_size=32, intermediate_size_mlp=64,
                                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           num_local_experts=4, num_experts_per_tok=1, max_position_embeddings=64)
    return transformers.Llama4ForCausalLM(config).eval()


def test_llama4_experts_are_refused_naming_the_class():
    model = _tiny_llama4()
    with pytest.raises(TypeError, match="Llama4TextExperts holds fused 3-D weights but not the interface"):
        NF4Experts.from_experts(model.model.layers[0].feed_forward.experts)
    with pytest.raises(TypeError, match="Llama4TextExperts"):
        quantize_model(_tiny_llama4(), compute_dtype=torch.float32)


def test_skipping_them_quantizes_the_rest_and_runs():
    model = quantize_model(_tiny_llama4(), compute_dtype=torch.float32, skip=["experts"])
    assert not any(isinstance(m, NF4Experts) for m in model.modules())
    assert any(isinstance(m, NF4Linear) for m in model.modules())
    with torch.no_grad():
        assert model(torch.randint(0, 64, (1, 5))).logits.shape == (1, 5, 64)
