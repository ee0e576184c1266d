"""LoRA and DoRA on a real BERT (all-MiniLM-L6-v2): PEFT-format round trips both ways, and PiSSA's
init, with PEFT as the oracle. DoRA's magnitude is the column norm of the real weights and PiSSA's
factors are their top singular vectors, which a random-initialised model never exercises."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from alignlab.adapters import LoRAConfig, adapter_layers, inject, load_adapter, save_adapter

peft = pytest.importorskip("peft", reason="peft is the oracle for the adapter file format")

TARGETS = ["query", "value", "dense"]  # attention q/v, attention output, intermediate and output MLP
TOL = dict(rtol=1e-4, atol=2e-5)


def _hidden(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def _randomise(model, seed: int) -> None:
    """Non-zero adapter weights (B starts at zero, which would make every round trip trivially equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                scale = 0.05 if "magnitude" in n else 0.02
                p.add_(scale * torch.randn(p.shape, generator=g) * (p.abs().mean() if "magnitude" in n else 1))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_saved_by_alignlab_loads_in_peft(minilm_bert, minilm_batch, tmp_path, use_dora):
    base = minilm_bert
    ours = inject(copy.deepcopy(base), LoRAConfig(r=8, alpha=16, target_modules=TARGETS, use_dora=use_dora))
    assert len(list(adapter_layers(ours))) == 6 * 5 + 1  # q, v, attention.output / intermediate / output dense; pooler
    _randomise(ours, seed=0)
    save_adapter(ours, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is use_dora
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    want = _hidden(ours, minilm_batch)
    torch.testing.assert_close(_hidden(loaded, minilm_batch), want, **TOL)
    assert (want - _hidden(base, minilm_batch)).abs().max() > 1e-2, "the adapter changed nothing: a vacuous round trip"


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_saved_by_peft_loads_in_alignlab(minilm_bert, minilm_batch, tmp_path, use_dora):
    base = minilm_bert
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, use_dora=use_dora)
    ).eval()
    _randomise(theirs, seed=1)
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = load_adapter(copy.deepcopy(base), tmp_path / "p").eval()
    want = _hidden(theirs, minilm_batch)
    torch.testing.assert_close(_hidden(ours, minilm_batch), want, **TOL)
    assert (want - _hidden(base, minilm_batch)).abs().max() > 1e-2


def test_dora_magnitude_is_the_real_weight_norm_as_in_peft(minilm_bert):
    base = minilm_bert
    ours = inject(copy.deepcopy(base), LoRAConfig(r=4, alpha=8, target_modules=TARGETS, use_dora=True))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True))
    sd = theirs.state_dict()
    for name, layer in adapter_layers(ours):
        peer = sd[f"base_model.model.{name}.lora_magnitude_vector.default.weight"]
        torch.testing.assert_close(layer.lora_magnitude_vector["default"].detach().float(), peer.float(), rtol=1e-5, atol=1e-6)
        # at init B = 0, so the magnitude is the row norm of the real weight itself
        w = base.get_submodule(name).weight
        torch.testing.assert_close(peer.float(), w.norm(dim=1), rtol=1e-5, atol=1e-6)


def test_pissa_init_on_real_weights_matches_peft(minilm_bert, minilm_batch):
    """PiSSA (arXiv 2404.02948): A, B from the top-r singular triplets, the rest stays in the base."""
    base = minilm_bert
    ours = inject(copy.deepcopy(base), LoRAConfig(r=8, alpha=8, target_modules=["query", "value"], init="pissa"))
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"], init_lora_weights="pissa")
    ).eval()
    sd = theirs.state_dict()
    for name, layer in adapter_layers(ours):
        # singular vectors are defined up to sign: compare the product B @ A
        prod = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        peer = sd[f"base_model.model.{name}.lora_B.default.weight"] @ sd[f"base_model.model.{name}.lora_A.default.weight"]
        torch.testing.assert_close(prod, peer, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.base_layer.weight, sd[f"base_model.model.{name}.base_layer.weight"], rtol=1e-4, atol=1e-5)
    # the split loses nothing: residual + B A is the original weight, so the outputs are unchanged
    torch.testing.assert_close(_hidden(ours, minilm_batch), _hidden(base, minilm_batch), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(_hidden(ours, minilm_batch), _hidden(theirs, minilm_batch), rtol=1e-4, atol=1e-4)
