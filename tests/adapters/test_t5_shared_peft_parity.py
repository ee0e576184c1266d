"""T5's one vocabulary table sits under ``shared``, ``encoder.embed_tokens``, ``decoder.embed_tokens`` and the tied
``lm_head``; transformers 5 runs the two ``embed_tokens`` modules, never ``shared``. Trainable token rows, embedding
LoRA and ``modules_to_save`` naming ``shared`` or ``embed_tokens`` against PEFT 0.21 on a tiny T5: the same trainable
parameters, file keys and shapes, logits and gradients, files loading both ways, and the base table still one tensor
under all four modules. ``modules_to_save=["shared"]`` trains a copy that no forward reads (PEFT builds the same): it
was silent, it now warns as LoRA on ``shared`` does."""

import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_t5

from alignlab.adapters import LoRAConfig, inject, load_adapter, save_adapter

peft = pytest.importorskip("peft")

IDS = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
CASES = {
    "rows": dict(target_modules=["q"], trainable_token_indices=[3, 5]),
    "rows on shared": dict(target_modules=["q"], trainable_token_indices={"shared": [3, 5]}),
    "rows on embed_tokens": dict(target_modules=["q"], trainable_token_indices={"embed_tokens": [3, 5]}),
    "LoRA on embed_tokens": dict(target_modules=["q", "embed_tokens"]),
    "LoRA on shared": dict(target_modules=["q", "shared"]),
    "saved embed_tokens": dict(target_modules=["q"], modules_to_save=["embed_tokens"]),
    "saved shared": dict(target_modules=["q"], modules_to_save=["shared"]),
}


def _loss(model):
    return model(input_ids=IDS, decoder_input_ids=IDS[:, :4]).logits


def _ours_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.").replace(".token_adapter.", ".")


def _randomised_peft(kw, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_tiny_t5(), peft.LoraConfig(r=4, **kw))
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted((n, p) for n, p in theirs.named_parameters() if p.requires_grad)):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.5)
    theirs.save_pretrained(tmp_path / "theirs")
    return theirs


def _table(module):
    while hasattr(module, "base_layer") or "original_module" in module._modules:
        module = module.base_layer if hasattr(module, "base_layer") else module._modules["original_module"]
    return module.weight


@pytest.mark.parametrize("case", CASES)
def test_t5_shared_and_embed_tokens_match_peft(case, tmp_path):
    kw = CASES[case]
    theirs = _randomised_peft(kw, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'shared' warns: see below
        ours = load_adapter(make_tiny_t5(), tmp_path / "theirs")
    want = {_ours_name(n): p for n, p in theirs.named_parameters() if p.requires_grad}
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(want)
    _loss(theirs).square().mean().backward()
    got = _loss(ours)
    torch.testing.assert_close(got, _loss(theirs).detach())
    got.square().mean().backward()
    for name, p in ours.named_parameters():
        if not p.requires_grad:
            continue
        if want[name].grad is None:  # a copy no forward reads ("saved shared")
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, want[name].grad, msg=name)
    table = _table(ours.shared)
    assert all(_table(ours.get_submodule(n)) is table for n in ("encoder.embed_tokens", "decoder.embed_tokens",
                                                                 "lm_head"))
    save_adapter(ours, tmp_path / "ours")
    mine, peers = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in peers.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(make_tiny_t5(), str(tmp_path / "ours"))
    with torch.no_grad():
        torch.testing.assert_close(_loss(back), got.detach())


def test_a_saved_copy_of_shared_warns_that_no_forward_reads_it():
    with pytest.warns(RuntimeWarning, match=r"modules_to_save: the embedding 'shared'.*also held by "
                                            r"\['encoder.embed_tokens', 'decoder.embed_tokens'\]"):
        model = inject(make_tiny_t5(), LoRAConfig(r=4, target_modules=["q"], modules_to_save=["shared"]))
    before = _loss(model).detach()
    with torch.no_grad():
        model.shared.modules_to_save["default"].weight.add_(1.0)
    torch.testing.assert_close(_loss(model).detach(), before)  # indeed dead, as in PEFT


@pytest.mark.parametrize("saved", [["embed_tokens"], ["shared", "embed_tokens"], ["lm_head"]])
def test_saved_copies_that_run_do_not_warn(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        inject(make_tiny_t5(), LoRAConfig(r=4, target_modules=["q"], modules_to_save=saved))
