"""``layers_to_transform`` / ``layers_pattern`` (PEFT's options) on ``LoRAConfig`` and in files. Every PEFT file that
set them was refused ("layers_to_transform=[1] is not supported by alignlab"); they now select the layers as PEFT 0.21
does (first numbered block after the pattern; only for suffix matches of a list ``target_modules``), files both ways."""

import pytest
import torch
import transformers

from conftest import logits_of, make_tiny_llama, randomise_trainable

from alignlab.adapters import LoRAConfig, adapter_layers, find_targets, inject, load_adapter, save_adapter

peft = pytest.importorskip("peft")

IDS = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))


def _gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                                n_positions=32)).eval()


CASES = {
    "list with pattern": (make_tiny_llama, dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1],
                                                layers_pattern="layers")),
    "one index, no pattern": (make_tiny_llama, dict(target_modules=["q_proj"], layers_to_transform=0)),
    "patterns list": (make_tiny_llama, dict(target_modules=["q_proj"], layers_to_transform=[1],
                                            layers_pattern=["blocks", "layers"])),
    "exact name kept": (make_tiny_llama, dict(target_modules=["q_proj", "model.layers.0.self_attn.v_proj"],
                                              layers_to_transform=[1])),
    "gpt2 h": (_gpt2, dict(target_modules=["c_attn"], layers_to_transform=[1], layers_pattern="h")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layers_match_peft_both_ways(case, tmp_path):
    make, kw = CASES[case]
    theirs = randomise_trainable(peft.get_peft_model(make(), peft.LoraConfig(r=4, **kw))).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(make(), tmp_path / "peft")
    peft_names = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                        if hasattr(m, "lora_A") and len(m.lora_A))
    assert sorted(n for n, _ in adapter_layers(ours)) == peft_names
    torch.testing.assert_close(logits_of(ours, IDS), logits_of(theirs, IDS))

    mine = randomise_trainable(inject(make(), LoRAConfig(r=4, **kw)))
    assert sorted(n for n, _ in adapter_layers(mine)) == peft_names
    save_adapter(mine, tmp_path / "ours")
    torch.testing.assert_close(logits_of(peft.PeftModel.from_pretrained(make(), str(tmp_path / "ours")), IDS), logits_of(mine, IDS))


def test_layer_selection_with_a_regex_target_is_refused():
    with pytest.raises(ValueError, match="layers_to_transform works with a list target_modules"):
        LoRAConfig(target_modules=r".*\.q_proj", layers_to_transform=[1])
    with pytest.raises(ValueError, match="layers_to_transform must be a layer index"):
        LoRAConfig(target_modules=["q_proj"], layers_to_transform=["1"])


def test_empty_layer_list_selects_every_layer():
    model = make_tiny_llama()
    assert find_targets(model, LoRAConfig(target_modules=["q_proj"], layers_to_transform=[])) == \
        find_targets(model, LoRAConfig(target_modules=["q_proj"]))
