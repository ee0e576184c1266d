"""A merge into a float16 base forms W + ΔW in fp32; values beyond ±65504 were rounded to inf and written into
the model without a word. They are refused as the merge methods refuse them (alignlab.merging), naming the
layer, before the base changes; bfloat16 (float32's range) merges the same adapter."""

import copy

import pytest
import torch
from torch import nn

from alignlab.adapters import ExpertLoRA, LoRAConfig, inject, merge, merge_and_unload, unmerge

MSG = r"merging adapter 'default'.*merged value\(s\) are beyond float16's largest finite value 65504.*bfloat16"


def _model(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).to(dtype)
    with torch.no_grad():
        model[2].weight.fill_(60000.0)
    return model


def _adapted(dtype, use_dora):
    model = inject(_model(dtype), LoRAConfig(r=2, alpha=2.0, target_modules=["0", "2"], use_dora=use_dora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(100.0 if name.startswith("2.") else 0.01)
            elif "lora_A" in name:
                p.fill_(50.0 if name.startswith("2.") else 0.01)
            elif "magnitude" in name and name.startswith("2."):
                p.fill_(2e5)  # DoRA: the gain m/‖W + sBA‖ takes the rows past float16's range
    return model


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("fold", [merge, merge_and_unload])
def test_float16_merge_beyond_range_raises_naming_the_layer(fold, use_dora):
    model = _adapted(torch.float16, use_dora)
    before = model[2].base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="^2: " + MSG):
        fold(model)
    assert torch.equal(model[2].base_layer.weight, before)  # the layer that overflows is not written
    assert model[2].merged_adapters == []
    ref = _adapted(torch.bfloat16, use_dora)  # the same adapter on a bfloat16 base merges
    fold(ref)
    assert torch.isfinite((ref[2].base_layer if fold is merge else ref[2]).weight).all()


def test_float16_merge_within_range_is_unchanged():
    model = inject(_model(torch.float16), LoRAConfig(r=2, alpha=2.0, target_modules=["2"]))
    with torch.no_grad():
        model[2].lora_B["default"].weight.fill_(1.0)
    x = torch.randn(3, 6).half()
    y = model(x)
    merge(model)
    torch.testing.assert_close(model(x), y, rtol=2e-3, atol=1.0)  # weights near 6e4: float16 spacing is 32
    unmerge(model)


def test_float16_inf_already_in_base_is_passed_through():
    model = _adapted(torch.float16, False)
    with torch.no_grad():
        model[2].base_layer.weight[0, 0] = float("inf")
    merge(model)
    assert torch.isinf(model[2].base_layer.weight).sum() > 1


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_float16_expert_merge_beyond_range_raises_before_any_expert_changes(use_dora):
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(vocab_size=16, hidden_size=8, intermediate_size=6, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=3,
                                        num_experts_per_tok=2)
    experts = transformers.MixtralForCausalLM(config).model.layers[0].mlp.experts.half()
    with torch.no_grad():
        experts.down_proj.fill_(0.1)
        experts.gate_up_proj.fill_(0.1)
    layer = ExpertLoRA(copy.deepcopy(experts), {"gate_up_proj": 2, "down_proj": 2}, alpha=2.0, use_dora=use_dora)
    with torch.no_grad():
        for store in (layer.lora_A["default"], layer.lora_B["default"]):
            store["gate_up_proj"].fill_(0.01)
            store["down_proj"].fill_(0.01)
        a, b = layer._views("default", "down_proj")  # (E, r, in), (E, out, r) views of PEFT's storage
        a[2].fill_(300.0)  # only the last expert of the second parameter
        b[2].fill_(300.0)
        if use_dora:  # the gain m/‖W + sBA‖ takes the rows (norm m) past float16's range
            layer.lora_magnitude_vector["default"]["down_proj"][2].fill_(2e5)
    before = {p: getattr(layer.base_layer, p).detach().clone() for p in ("gate_up_proj", "down_proj")}
    with pytest.raises(ValueError, match=MSG.replace("'default'", r"'default' into 'down_proj' \(expert 2\)")):
        layer.merge()
    for p, w in before.items():  # nothing written, not even the experts and parameter folded before
        assert torch.equal(getattr(layer.base_layer, p), w)
    assert layer.merged_adapters == []
    with torch.no_grad():
        b[2].fill_(0.01)
        if use_dora:
            layer.lora_magnitude_vector["default"]["down_proj"][2].fill_(1.0)
    layer.merge()  # within range: merges
    assert torch.isfinite(layer.base_layer.down_proj).all()
