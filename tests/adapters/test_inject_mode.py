"""Modules made by inject take the train/eval mode of what they wrap (nn.Module starts in training mode, so
adapter dropout ran in a model injected into, or loaded into, in eval mode)."""

import copy

import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters import AdaLoRAConfig, LoRAConfig, SoRAConfig, VeRAConfig, inject, load_adapter

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))

CONFIGS = {
    "lora": lambda: LoRAConfig(r=4, dropout=0.5, target_modules=["q_proj", "v_proj"]),
    "adalora": lambda: AdaLoRAConfig(init_r=4, target_r=2, total_step=10, dropout=0.5),
    "sora": lambda: SoRAConfig(r=4, dropout=0.5, target_modules=["q_proj", "up_proj"]),
    "vera": lambda: VeRAConfig(r=4, dropout=0.5, target_modules=["q_proj", "v_proj"]),
}


def _perturb(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_injected_into_an_eval_model_the_adapters_are_in_eval_mode(method):
    model = inject(make_tiny_llama().eval(), CONFIGS[method]())
    inject(model, CONFIGS[method](), "second")  # added to the existing layers
    assert not any(m.training for m in model.modules())
    _perturb(model)
    torch.testing.assert_close(model(IDS).logits, model(IDS).logits, rtol=0, atol=0)  # no dropout
    model.train()
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_injected_into_a_training_model_the_adapters_train(method):
    model = inject(make_tiny_llama().train(), CONFIGS[method]())
    assert all(m.training for m in model.modules())


def test_a_frozen_submodule_mode_is_kept():
    model = make_tiny_llama().train()
    model.model.layers[0].self_attn.eval()  # e.g. a block the user keeps in eval
    inject(model, LoRAConfig(r=2, dropout=0.5, target_modules=["q_proj"]))
    q0, q1 = model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.q_proj
    assert not any(m.training for m in q0.modules()) and all(m.training for m in q1.modules())


def test_peft_file_with_dropout_loaded_for_inference_gives_peft_logits(tmp_path):
    peft = pytest.importorskip("peft")
    base = make_tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3,
                                                                      target_modules=["q_proj", "v_proj"]))
    _perturb(theirs)
    theirs.save_pretrained(str(tmp_path))
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))  # eval, as from_pretrained gives it
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(ours(IDS).logits, reference(IDS).logits, rtol=1e-5, atol=1e-6)
