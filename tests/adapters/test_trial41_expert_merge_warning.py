"""Merging expert LoRA into NF4 experts re-quantizes W_e + ΔW_e (on a tiny block the merged output moved by a few
tenths against base + adapter) with no word, while merging into an NF4Linear says so with a UserWarning, as
docs/quantization.md promises for an NF4 base. Dense experts merge exactly and stay silent."""

import copy
import warnings

import pytest
import torch

from conftest import make_experts

from alignlab.adapters import ExpertLoRA
from alignlab.quant import NF4Experts


def _experts():
    return make_experts()


def _adapted(base):
    layer = ExpertLoRA(base, {"gate_up_proj": 2, "down_proj": 2}, alpha=4.0)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    return layer


def test_merging_into_nf4_experts_warns_and_unmerge_restores_the_bytes():
    layer = _adapted(NF4Experts.from_experts(_experts(), compute_dtype=torch.float32))
    packed = {p: layer.base_layer.quantized_state(p)["qdata"].clone() for p in ("gate_up_proj", "down_proj")}
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge()
    layer.unmerge()
    for p, q in packed.items():
        assert torch.equal(layer.base_layer.quantized_state(p)["qdata"], q)


def test_merging_into_dense_experts_is_silent():
    layer = _adapted(copy.deepcopy(_experts()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.merge()
