"""Merging LoRA / DoRA into an NF4 base whose ``compute_dtype`` is bf16 (the usual QLoRA setup) dequantized the base
in bf16 and rounded ``W + ΔW`` to bf16 before re-quantizing: two roundings more than the re-quantization, and
bf16-rounded block maxima change every code's scale. The merge now dequantizes in fp32 and re-quantizes the fp32
sum, so the merged packed weight is the same whatever the compute dtype: that of the formula, written out here in
float64, rounded once to fp32 and quantized (DoRA: up to the last bit of fp32 row norms)."""

import pytest
import torch
from torch import nn

from alignlab.adapters import DoRALinear, LoRALinear
from alignlab.quant import NF4Linear, nf4_dequantize, nf4_quantize


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_nf4_merge_is_the_fp32_formula_quantized_once(cls, compute_dtype):
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(128, 64).bfloat16(), compute_dtype=compute_dtype)
    layer = cls(base, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    w = base.dequantize(torch.float32).double()
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    merged = w + 2.0 * b @ a
    if cls is DoRALinear:
        m = layer.lora_magnitude_vector["default"].double()
        merged = m[:, None] * merged / merged.norm(dim=1, keepdim=True)
    expected = nf4_quantize(merged.float(), blocksize=64, double_quant=True)
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge()
    got, want = layer.base_layer.dequantize(torch.float32), nf4_dequantize(expected, torch.float32)
    if cls is LoRALinear:
        assert torch.equal(got, want)
    else:
        # DoRA's fp32 row norms may differ from float64's in the last bit, which moves the double-quantized mean
        # offset by an ulp (a 1e-8 shift); an extra bf16 rounding moves codes by a whole NF4 step (~1e-2 here)
        assert (got - want).abs().max() < 1e-6
    assert layer.base_layer.quant_weight.dtype == torch.bfloat16  # the original dtype is still recorded


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_merge_into_bf16_compute_nf4_is_the_fp32_product_quantized_once(feedforward):
    from alignlab.adapters import IA3Linear

    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(128, 64).bfloat16(), compute_dtype=torch.bfloat16)
    layer = IA3Linear(base, feedforward=feedforward)
    with torch.no_grad():
        layer.ia3_l["default"].uniform_(0.5, 1.5)
    w, vec = base.dequantize(torch.float32), layer.ia3_l["default"].detach()
    expected = nf4_quantize(w * (vec[None, :] if feedforward else vec[:, None]), blocksize=64, double_quant=True)
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge()
    assert torch.equal(layer.base_layer.dequantize(torch.float32), nf4_dequantize(expected, torch.float32))


@pytest.mark.parametrize("one_call", [True, False])
def test_several_adapters_merged_into_nf4_are_quantized_once(one_call):
    """Each LoRA merge into an NF4 base re-quantized the weight the previous merge had re-quantized: two adapters
    meant two NF4 roundings, and the second moved codes the first had already rounded. Now every merge starts from
    the packed weight kept before the first one and quantizes W + ΣΔW once, in one call or in several."""
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(128, 64).bfloat16(), compute_dtype=torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8)
    layer.add_adapter("second", r=2, alpha=2)
    with torch.no_grad():
        for name in ("default", "second"):
            layer.lora_B[name].weight.normal_(0, 0.1)
    w = base.dequantize(torch.float32).double()
    merged = w.clone()
    for name in ("default", "second"):
        a, b = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
        merged += layer.scaling[name] * b @ a
    want = nf4_dequantize(nf4_quantize(merged.float(), blocksize=64, double_quant=True), torch.float32)
    with pytest.warns(UserWarning, match="re-quantizes"):
        if one_call:
            layer.merge(["default", "second"])
        else:
            layer.merge(["default"])
            layer.merge(["second"])
    # fp32 sums of the two ΔW in another order than float64's can differ by an ulp; a second NF4 rounding moves codes
    # by a whole level (~1e-2 here)
    assert (layer.base_layer.dequantize(torch.float32) - want).abs().max() < 1e-6
    layer.unmerge()
    assert torch.equal(layer.base_layer.dequantize(torch.float32), w.float())
