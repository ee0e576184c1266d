"""Files saved from an HF classifier: PEFT reads task_type SEQ_CLS as "the classifier is a trained module in this
file" and failed on the missing key when the adapter left the head frozen; such files carry no task type now."""

import json

import pytest
import torch

from alignlab.adapters import IA3Config, LoRAConfig, VeRAConfig, inject, load_adapter, save_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _tiny_bert_classifier():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


@pytest.mark.parametrize("config, task", [
    (IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]), None),
    (VeRAConfig(r=4, target_modules=["query", "value"]), None),
    (LoRAConfig(r=2, target_modules=["query", "value"]), None),
    (LoRAConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]), "SEQ_CLS"),
], ids=["ia3", "vera", "lora", "lora_with_head"])
def test_classifier_adapter_files_load_in_peft_with_the_same_logits(config, task, tmp_path):
    model = inject(_tiny_bert_classifier(), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        want = model(input_ids=IDS).logits
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == task
    theirs = peft.PeftModel.from_pretrained(_tiny_bert_classifier(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=IDS).logits, want)
        torch.testing.assert_close(load_adapter(_tiny_bert_classifier(), tmp_path)(input_ids=IDS).logits, want)
