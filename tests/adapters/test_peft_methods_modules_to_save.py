"""(IA)³, VeRA, LoKr and AdaLoRA take ``modules_to_save`` as LoRA does. PEFT writes the task head into
``modules_to_save`` for every ``SEQ_CLS`` adapter (``["classifier", "score"]``), so each of its files for a sequence
classifier was refused ("modules_to_save=['classifier', 'score'] is not supported by alignlab for IA3"), and a
classifier adapted here could not keep its trained head in the file."""

import json

import pytest
import torch
import transformers

from conftest import logits_of, randomise_trainable

from alignlab.adapters import (AdaLoRAConfig, IA3Config, LoKrConfig, SavedModule, VeRAConfig, inject, load_adapter,
                               save_adapter)

peft = pytest.importorskip("peft")

IDS = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=40, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


FAMILIES = {
    "ia3": (lambda **kw: IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"], **kw),
            lambda: peft.IA3Config(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                                   feedforward_modules=["output.dense"])),
    "vera": (lambda **kw: VeRAConfig(r=8, target_modules=["query", "value"], **kw),
             lambda: peft.VeraConfig(task_type="SEQ_CLS", r=8, target_modules=["query", "value"])),
    "lokr": (lambda **kw: LoKrConfig(r=2, target_modules=["query", "value"], **kw),
             lambda: peft.LoKrConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"])),
    "adalora": (lambda **kw: AdaLoRAConfig(init_r=4, target_r=2, total_step=10, target_modules=["query", "value"], **kw),
                lambda: peft.AdaLoraConfig(task_type="SEQ_CLS", init_r=4, target_r=2, total_step=10,
                                           target_modules=["query", "value"])),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_peft_seq_cls_file_loads_with_its_head(family, tmp_path):
    theirs = randomise_trainable(peft.get_peft_model(_bert(), FAMILIES[family][1]())).eval()
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    ours = load_adapter(_bert(), tmp_path)
    assert isinstance(ours.classifier, SavedModule)
    torch.testing.assert_close(logits_of(ours, IDS), logits_of(theirs, IDS))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_our_head_trains_and_loads_in_peft(family, tmp_path):
    ours = inject(_bert(), FAMILIES[family][0](modules_to_save=["classifier"]))
    head = ours.classifier.modules_to_save["default"]
    assert all(p.requires_grad for p in head.parameters())
    assert not any(p.requires_grad for p in ours.classifier.original_module.parameters())
    randomise_trainable(ours)
    want = logits_of(ours, IDS)
    save_adapter(ours, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["modules_to_save"] == ["classifier"] and raw["task_type"] == "SEQ_CLS"
    torch.testing.assert_close(logits_of(peft.PeftModel.from_pretrained(_bert(), str(tmp_path)), IDS), want)
    torch.testing.assert_close(logits_of(load_adapter(_bert(), tmp_path), IDS), want)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_modules_to_save_must_be_a_list_of_names(family):
    with pytest.raises(TypeError, match="modules_to_save must be a list of module names"):
        FAMILIES[family][0](modules_to_save="classifier")
