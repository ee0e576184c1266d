"""``save_adapter`` writes ``ensure_weight_tying: true`` only when the adapter ties something (a LoRA embedding's head,
trainable token rows). It copied the config's flag: with LoRA on a tied ``lm_head`` (or a tied head in
``modules_to_save``) alignlab ties nothing, yet the file asked PEFT 0.21 to tie, and PEFT then built another adapter
(the head's LoRA moved onto the embedding: logits 31 off on a tiny Llama) or failed on a key it wanted for the tied
copy (``KeyError 'base_model.model.model.embed_tokens.weight'``). ``inject`` now warns that the flag tied nothing."""

import json

import pytest
import torch

from conftest import make_tied_llama

from alignlab.adapters import LoRAConfig, inject, load_adapter, save_adapter

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


CASES = {
    "lora on the tied head": dict(target_modules=["q_proj", "lm_head"]),
    "tied head in modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "tied embedding in modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_flag_that_tied_nothing_is_saved_false_and_peft_loads_our_outputs(case, tmp_path):
    with pytest.warns(RuntimeWarning, match="ensure_weight_tying=True tied nothing"):
        ours = inject(make_tied_llama(), LoRAConfig(r=4, ensure_weight_tying=True, **CASES[case]))
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    want = _logits(ours)
    assert (want - _logits(make_tied_llama())).abs().max() > 1e-2
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["ensure_weight_tying"] is False
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(make_tied_llama(), str(tmp_path))), want)
    torch.testing.assert_close(_logits(load_adapter(make_tied_llama(), tmp_path)), want)


@pytest.mark.parametrize("config", [dict(target_modules=["q_proj", "embed_tokens"]),
                                    dict(target_modules=["q_proj"], trainable_token_indices=[3, 4])],
                         ids=["embedding lora", "token rows"])
def test_a_flag_that_ties_is_saved_true_without_a_warning(config, tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ours = inject(make_tied_llama(), LoRAConfig(r=4, ensure_weight_tying=True, **config))
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["ensure_weight_tying"] is True
