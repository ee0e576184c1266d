"""AdaLoRA/SoRA helpers refuse an adapter name no layer holds instead of regularizing or pruning nothing (the
docs' loop injected "adalora" and called orthogonal_regularizer(model), which read "default": a silent 0)."""

import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters import (
    AdaLoRAAllocator,
    AdaLoRAConfig,
    SoRAConfig,
    active_ranks,
    inject,
    orthogonal_regularizer,
    prune_ranks,
    sora_proximal_step,
)


def test_orthogonal_regularizer_needs_a_held_adapter_name():
    config = AdaLoRAConfig(init_r=4, target_r=2, total_step=10)
    model = inject(make_tiny_llama(), config, "adalora")
    with pytest.raises(ValueError, match=r"adapter_name='default'.*\['adalora'\]"):
        orthogonal_regularizer(model)
    reg = orthogonal_regularizer(model, "adalora")
    assert reg > 0  # P, Q ~ N(0, 0.02²) are far from orthonormal
    reg.backward()
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.lora_A["adalora"].grad.abs().sum() > 0


def test_sora_helpers_need_a_held_adapter_name():
    model = inject(make_tiny_llama(), SoRAConfig(r=4), "sora")
    with pytest.raises(ValueError, match="adapter_name='default'"):
        sora_proximal_step(model, lr=0.5, sparsity=1.0)
    with pytest.raises(ValueError, match="adapter_name='default'"):
        active_ranks(model)
    assert sora_proximal_step(model, lr=0.5, sparsity=1.0, adapter_name="sora") == 0  # gates 1 → 0.5
    assert set(active_ranks(model, "sora").values()) == {4}
    assert sora_proximal_step(model, lr=0.5, sparsity=1.0, adapter_name="sora") == 14 * 4


def test_allocator_refuses_a_sora_config():
    config = SoRAConfig(r=4)
    model = inject(make_tiny_llama(), config)
    with pytest.raises(TypeError, match="AdaLoRAConfig"):
        AdaLoRAAllocator(model, config)


def test_allocator_step_after_zero_grad_is_refused_not_silently_skipped():
    config = AdaLoRAConfig(init_r=4, target_r=2, total_step=4, target_modules=["q_proj", "v_proj"])
    model = inject(make_tiny_llama(), config)
    alloc = AdaLoRAAllocator(model, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # λ = 0 at the start leaves P and Q without gradient: give every triplet a score
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(generator=g)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad()  # set_to_none: before, no score was kept and no rank was ever masked
    with pytest.raises(ValueError, match="before optimizer.zero_grad"):
        alloc.step(1)
    model(input_ids=ids, labels=ids).loss.backward()
    for step in range(1, 4):
        budget, pattern = alloc.step(step)
    assert pattern is not None and sum(active_ranks(model).values()) == budget == 2 * 4


def test_allocator_after_prune_ranks_asks_for_a_new_one():
    config = AdaLoRAConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"])
    model = inject(make_tiny_llama(), config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(generator=g)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    alloc = AdaLoRAAllocator(model, config)
    for step in range(4):
        model(input_ids=ids, labels=ids).loss.backward()
        alloc.step(step)
        model.zero_grad()
    kept = sum(prune_ranks(model).values())
    assert kept < 16
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(ValueError, match="build a new AdaLoRAAllocator"):  # a shape error in the EMA before
        alloc.step(4)
    fresh = AdaLoRAAllocator(model, config)
    assert fresh.initial_budget == kept
    fresh.step(4)
