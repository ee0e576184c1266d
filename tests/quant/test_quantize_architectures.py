"""``quantize_model`` across transformers architectures: the quantized model computes exactly what the dense
model computes on the dequantized weights.

The oracle is the dense model itself with every linear (and GPT-2 ``Conv1D``, and fused expert) weight that
``quantize_model`` put in NF4 replaced by its dequantization, both in float32 (``compute_dtype=torch.float32``),
so any difference is a wiring bug (a layer skipped or quantized twice, a transposed Conv1D, a model that reads
``.weight`` directly), not quantization error. A one-off sweep of the causal-LM / seq2seq model types of
transformers 5.25 found no wrong output on 2026-12-05 (docs/quantization.md); these are a spread of them
(attention variants, MoE, seq2seq, Conv1D).
"""

import copy

import pytest
import torch
import transformers
from transformers.pytorch_utils import Conv1D

from alignlab.quant import NF4Experts, NF4Linear, quantize_model
from alignlab.quant.nf4 import nf4_dequantize

TINY = dict(hidden_size=32, d_model=32, n_embd=32, intermediate_size=64, ffn_dim=64, d_ff=64, n_inner=64,
            num_attention_heads=2, n_head=2, num_heads=2, num_key_value_heads=1, encoder_attention_heads=2,
            decoder_attention_heads=2, num_hidden_layers=2, n_layer=2, num_layers=2, encoder_layers=2,
            decoder_layers=2, vocab_size=128, head_dim=16, max_position_embeddings=64, num_experts=4,
            num_local_experts=4, encoder_ffn_dim=64, decoder_ffn_dim=64)

TYPES = ["gemma3_text", "bloom", "gpt_neox", "opt", "cohere2", "granitemoe", "mixtral", "starcoder2", "xglm", "gpt2",
         "bart"]


def _tiny(model_type: str):
    config = transformers.AutoConfig.for_model(model_type)
    for key, value in TINY.items():
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, value)
    seq2seq = model_type == "bart"
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    return auto.from_config(config).eval(), seq2seq


@torch.no_grad()
def _dense_on_dequantized(model, quantized):
    for name, module in quantized.named_modules():
        if isinstance(module, NF4Linear):
            dense = model.get_submodule(name)
            w = nf4_dequantize(module.quant_weight, torch.float32)
            dense.weight.copy_(w.T if isinstance(dense, Conv1D) else w)  # Conv1D stores (in, out)
        elif isinstance(module, NF4Experts):
            dense = model.get_submodule(name)
            for param in module.expert_parameters:
                w = module.dequantize_experts(param, dtype=torch.float32)
                getattr(dense, param).copy_(w.transpose(1, 2) if getattr(dense, "is_transposed", False) else w)
    return model


@pytest.mark.parametrize("model_type", TYPES)
def test_quantized_model_equals_the_dense_model_on_its_dequantized_weights(model_type):
    model, seq2seq = _tiny(model_type)
    quantized = quantize_model(copy.deepcopy(model), compute_dtype=torch.float32)
    assert sum(isinstance(m, (NF4Linear, NF4Experts)) for m in quantized.modules()) >= 4
    oracle = _dense_on_dequantized(model, quantized)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    extra = {"decoder_input_ids": ids[:, :5]} if seq2seq else {}
    with torch.no_grad():
        got, want = quantized(input_ids=ids, **extra).logits, oracle(input_ids=ids, **extra).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
