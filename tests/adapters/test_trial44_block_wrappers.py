"""A second family next to a block-level wrapper (bottleneck adapters, soft prompts with the prefix MLP):
the wrapped block's linears are targets, the first family's own adapter modules are not."""

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama

from alignlab.adapters import (
    AdapterLayer,
    BitFitConfig,
    BottleneckConfig,
    LoKrConfig,
    LoRAConfig,
    PrefixTuningConfig,
    VeRAConfig,
    inject,
    set_adapter,
)

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
BLOCK_LINEARS = {f"model.layers.{i}.{block}.base_layer.{proj}" for i in range(2)
                 for block, projs in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                      ("mlp", ("gate_proj", "up_proj", "down_proj"))) for proj in projs}


def _holding(model, name):
    return {n for n, m in model.named_modules() if isinstance(m, AdapterLayer) and name in m.adapter_names()}


@pytest.mark.parametrize("config", [LoKrConfig(r=2), LoRAConfig(r=2, target_modules="all-linear"),
                                    BitFitConfig(target_modules="all-linear")], ids=["lokr", "lora", "bitfit"])
def test_all_linear_after_houlsby_takes_the_block_linears_not_the_bottleneck(config):
    model = inject(make_tiny_llama(), BottleneckConfig(reduction_factor=4), "houlsby")
    inject(model, config, "second")
    # LoKr/LoRA wrapped the bottleneck's down/up projections too (LoKr then crashed reading .weight);
    # BitFit found nothing inside the wrapped blocks and raised
    assert _holding(model, "second") == BLOCK_LINEARS
    for block in ("self_attn", "mlp"):
        layer = model.get_submodule(f"model.layers.0.{block}")
        assert all(type(m) is nn.Linear for m in (*layer.adapter_down.values(), *layer.adapter_up.values()))
    set_adapter(model, ["houlsby", "second"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    assert torch.isfinite(model(input_ids=IDS).logits).all()


def test_vera_all_linear_leaves_the_prefix_mlp_alone():
    model = inject(make_tiny_llama(), PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=8),
                   "prefix")
    inject(model, VeRAConfig(r=4), "vera")
    holding = _holding(model, "vera")
    assert not any("prefix_encoder" in n for n in holding)
    assert holding == {n.replace(".base_layer", "") for n in BLOCK_LINEARS}
    encoder = model.get_input_embeddings().prefix_encoder["prefix"]
    assert all(type(encoder.transform[i]) is nn.Linear for i in (0, 2))
