"""PEFT LoRA files that set a LoRA *variant* (aLoRA, layer replication, BD-LoRA, Arrow, VeLoRA, MonteCLoRA, KaSA) are
refused naming the field. ``load_adapter`` ignored those fields: an aLoRA file (``alora_invocation_tokens``, the
adapter acts only after the invocation sequence) loaded without a word and applied its adapter to every token, logits
0.5 off PEFT's on a tiny Llama; the others failed on a key or a shape with no hint of the cause. PEFT inits that leave
the base as it is (``orthogonal``, ``eva``) now load as the plain adapters they are (they were refused)."""

import json

import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters import adapter_layers, load_adapter

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _trained_peft(config, tmp_path):
    theirs = peft.get_peft_model(make_tiny_llama(), config)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    return theirs


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_alora_file_is_refused_naming_the_field(tmp_path):
    ids = IDS.clone()
    ids[:, 2:4] = torch.tensor([5, 6])  # the invocation sequence: the adapter acts from there on
    theirs = _trained_peft(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[5, 6],
                                           task_type="CAUSAL_LM"), tmp_path)
    assert not torch.allclose(_logits(theirs, ids), _logits(make_tiny_llama(), ids))
    model = make_tiny_llama()
    with pytest.raises(ValueError, match=r"alora_invocation_tokens=\[5, 6\] is not supported"):
        load_adapter(model, tmp_path)
    assert not list(adapter_layers(model))


def test_layer_replication_file_is_refused_naming_the_field(tmp_path):
    _trained_peft(peft.LoraConfig(r=4, target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]]), tmp_path)
    with pytest.raises(ValueError, match="layer_replication=.*not supported"):
        load_adapter(make_tiny_llama(), tmp_path)


@pytest.mark.parametrize("field, value", [
    ("use_bdlora", {"target_modules_bd_a": ["q_proj"], "target_modules_bd_b": [], "nblocks": 2}),
    ("arrow_config", {"top_k": 2}),
    ("velora_config", {"num_groups": 64}),
    ("monteclora_config", {"num_samples": 8}),
    ("kasa_config", {"beta": 1e-4, "gamma": 1e-3}),
    ("use_qalora", True),  # loaded before and failed on a shape that did not say QALoRA
    # Megatron-core's tensor-parallel layers (each rank's file holds its shards); loaded before without a word
    ("megatron_config", {"tensor_model_parallel_size": 2}),
])
def test_other_variant_fields_are_refused_by_name(tmp_path, field, value):
    _trained_peft(peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw | {field: value}))
    with pytest.raises(ValueError, match=f"{field}=.*not supported by alignlab for LoRA"):
        load_adapter(make_tiny_llama(), tmp_path)


def test_empty_variant_fields_are_plain_lora(tmp_path):
    theirs = _trained_peft(peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw | {"layer_replication": [], "alora_invocation_tokens": None,
                                                                    "use_qalora": False}))
    torch.testing.assert_close(_logits(load_adapter(make_tiny_llama(), tmp_path)), _logits(theirs))


@pytest.mark.parametrize("init", ["orthogonal", "eva"])
def test_inits_that_keep_the_base_load_as_plain_lora(tmp_path, init):
    theirs = _trained_peft(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw | {"init_lora_weights": init}))
    want = _logits(theirs)
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path))), want)
    torch.testing.assert_close(_logits(load_adapter(make_tiny_llama(), tmp_path)), want)


def test_a_nora_file_loads_as_plain_lora(tmp_path):
    """PEFT 0.22's init_lora_weights="nora" (A's columns normalised, B zero; the base untouched) was refused."""
    theirs = _trained_peft(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw | {"init_lora_weights": "nora"}))
    torch.testing.assert_close(_logits(load_adapter(make_tiny_llama(), tmp_path)), _logits(theirs))


@pytest.mark.parametrize("init", ["loftq", "corda", "lora_ga", "mica"])
def test_inits_that_rewrite_the_base_or_freeze_b_stay_refused(tmp_path, init):
    _trained_peft(peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw | {"init_lora_weights": init}))
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}' is not supported"):
        load_adapter(make_tiny_llama(), tmp_path)


def test_adalora_file_with_a_variant_field_is_refused(tmp_path):
    theirs = peft.get_peft_model(make_tiny_llama(), peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                                       target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw | {"layer_replication": [[0, 2]]}))
    with pytest.raises(ValueError, match="layer_replication=.*not supported by alignlab for AdaLoRA"):
        load_adapter(make_tiny_llama(), tmp_path)
