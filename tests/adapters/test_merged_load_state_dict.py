"""``load_state_dict`` into a merged model, then ``unmerge``.

A state loaded into a merged model is read as a merged one, as PEFT reads it: unmerge takes the loaded adapter out
of the loaded base. Before, a QLoRA layer put back the packed base it kept at merge time, so the model after unmerge
was the old base with the loaded adapter, which neither state describes; a DoRA layer divided by the old row norms.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

from conftest import randomise_trainable

from alignlab.adapters import LoRAConfig, inject, merge, unmerge
from alignlab.quant import quantize_model


def _model(seed: int, quantized: bool, dora: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    if quantized:
        quantize_model(model, compute_dtype=torch.float32)
    inject(model, LoRAConfig(r=2, alpha=4, target_modules=["0", "2"], use_dora=dora))
    return randomise_trainable(model, scale=0.05, seed=seed + 10)  # a small ΔW, as a trained adapter has


def _base_weights(model: nn.Module) -> list[torch.Tensor]:
    return [model[i].base_layer.dequantize(torch.float32) if hasattr(model[i].base_layer, "dequantize")
            else model[i].base_layer.weight.detach().clone() for i in (0, 2)]


@pytest.fixture(autouse=True)
def _quiet_requantization_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="merging into a quantized base")
        yield


@pytest.mark.parametrize("quantized", [True, False])
def test_unmerge_after_loading_a_merged_state_gives_the_loaded_base(quantized):
    src = _model(1, quantized)
    merge(src)
    state = copy.deepcopy(src.state_dict())
    # what the loaded state implies: its merged base less its adapter (a quantized base re-quantized once more)
    want = []
    for i in (0, 2):
        base, delta = copy.deepcopy(src[i].base_layer), src[i].delta_weight("default")
        if quantized:
            want.append(base.load_dense_weight_(base.dequantize(torch.float32) - delta).dequantize(torch.float32))
        else:
            want.append(base.weight.detach() - delta)
    dst = _model(0, quantized)
    merge(dst)
    dst.load_state_dict(state)
    unmerge(dst)
    for got, w in zip(_base_weights(dst), want):
        torch.testing.assert_close(got, w, rtol=0, atol=0 if quantized else 1e-6)
    x = torch.randn(5, 64)
    unmerge(src)
    if not quantized:  # a quantized base differs from src's by the two roundings of merge and unmerge
        torch.testing.assert_close(dst(x), src(x), rtol=1e-5, atol=1e-5)


def test_loading_the_same_state_keeps_the_exact_unmerge():
    """A state equal to what the layer holds (resuming a merged model) changes nothing: the packed base kept at
    merge time still comes back bit for bit."""
    model = _model(0, quantized=True)
    before = [model[i].base_layer.quant_weight.data.clone() for i in (0, 2)]
    merge(model)
    model.load_state_dict(copy.deepcopy(model.state_dict()))
    unmerge(model)
    for i, packed in zip((0, 2), before):
        assert torch.equal(model[i].base_layer.quant_weight.data, packed)


@pytest.mark.parametrize("quantized", [True, False])
def test_dora_unmerge_after_loading_another_merged_state_raises(quantized):
    """A merged DoRA weight m ⊙ V/‖V‖ does not determine its base (any row scale of V merges to it): unmerge
    refuses by name instead of dividing by the row norms of the weights held before the load."""
    src = _model(1, quantized, dora=True)
    merge(src)
    dst = _model(0, quantized, dora=True)
    merge(dst)
    dst.load_state_dict(copy.deepcopy(src.state_dict()))
    with pytest.raises(ValueError, match="cannot unmerge DoRA adapter 'default'.*load_state_dict"):
        unmerge(dst)
    same = _model(0, quantized, dora=True)
    bases = _base_weights(same)
    merge(same)
    same.load_state_dict(copy.deepcopy(same.state_dict()))
    unmerge(same)
    for got, want in zip(_base_weights(same), bases):
        torch.testing.assert_close(got, want, rtol=0, atol=0 if quantized else 1e-5)


def test_expert_dora_unmerge_after_loading_another_merged_state_raises():
    from conftest import make_experts

    from alignlab.adapters import ExpertLoRA

    def layer(seed):
        experts = ExpertLoRA(make_experts(hidden=16, intermediate=12, seed=seed), {"down_proj": 2}, alpha=4.0,
                             use_dora=True)
        return randomise_trainable(experts, scale=0.05, seed=seed + 3)

    src, dst = layer(1), layer(0)
    src.merge()
    dst.merge()
    dst.load_state_dict(copy.deepcopy(src.state_dict()))
    with pytest.raises(ValueError, match="cannot unmerge DoRA adapter 'default' 'down_proj'.*load_state_dict"):
        dst.unmerge()
