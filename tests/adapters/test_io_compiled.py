"""``save_adapter`` / ``load_adapter`` / ``adapter_state_dict`` on a ``torch.compile``d model. Its module names carry
``_orig_mod.``, which went into the file's keys and ``target_modules``: PEFT matched no module
(``NoMatchingPeftModuleError``), and ``load_adapter`` into a compiled model asked PEFT's files for
``base_model.model._orig_mod....`` keys ("adapter file lacks 5 key(s)")."""

import json

import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters import LoRAConfig, adapter_state_dict, inject, load_adapter, save_adapter

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _trained():
    model = inject(make_tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    return model


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_a_compiled_model_saves_the_keys_of_the_model_itself(tmp_path):
    model = _trained()
    want = _logits(model)
    compiled = torch.compile(model, backend="eager")
    assert sorted(adapter_state_dict(compiled)) == sorted(adapter_state_dict(model))
    save_adapter(compiled, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not any("_orig_mod" in t for t in raw["target_modules"]) and raw["task_type"] == "CAUSAL_LM"
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path))), want)


def test_a_peft_file_loads_into_a_compiled_model(tmp_path):
    model = _trained()
    want = _logits(model)
    save_adapter(model, tmp_path)
    compiled = torch.compile(make_tiny_llama(), backend="eager")
    load_adapter(compiled, tmp_path)
    torch.testing.assert_close(_logits(compiled), want)
