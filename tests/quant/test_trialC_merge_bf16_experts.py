"""LoRA / DoRA merged into NF4 experts with ``compute_dtype=bf16`` (QLoRA for MoE): each expert's weight was
dequantized in bf16 and the merged fp32 weight written back into that bf16 buffer before re-quantization. The merge
now works on the fp32 dequantization, so the packed result is the fp32 formula quantized once, as with
``compute_dtype=fp32``."""

import copy

import pytest
import torch
import transformers

from alignlab.adapters.experts import ExpertLoRA
from alignlab.quant import NF4Experts, nf4_dequantize, nf4_quantize


def _mixtral_experts():
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=32)
    experts = transformers.MixtralForCausalLM(cfg).model.layers[0].mlp.experts
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.05)
    return experts


@pytest.mark.parametrize("dora", [False, True])
def test_expert_merge_with_bf16_compute_is_the_fp32_formula_quantized_once(dora):
    quant = NF4Experts.from_experts(copy.deepcopy(_mixtral_experts()), compute_dtype=torch.bfloat16)
    layer = ExpertLoRA(quant, {"down_proj": 4}, alpha=8.0, use_dora=dora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.lora_B["default"].values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    w = quant.dequantize_experts("down_proj", dtype=torch.float32).double()  # (E, out, in)
    a, b = (t.detach().double() for t in layer._views("default", "down_proj"))  # (E, r, in), (E, out, r)
    merged = w + layer.scaling["default"]["down_proj"] * b @ a
    if dora:
        m = layer.lora_magnitude_vector["default"]["down_proj"].detach().double()
        merged = m[..., None] * merged / merged.norm(dim=-1, keepdim=True)
    with pytest.warns(UserWarning):
        layer.merge()
    got = quant.dequantize_experts("down_proj", dtype=torch.float32)
    for e in range(w.shape[0]):
        want = nf4_dequantize(nf4_quantize(merged[e].float(), blocksize=64, double_quant=True), torch.float32)
        # DoRA's fp32 row norms may move the double-quantized mean offset by an ulp (1e-8); a bf16 rounding on the
        # way moves codes by a whole NF4 step
        assert (got[e] - want).abs().max() < 1e-6, e
