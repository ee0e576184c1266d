"""A module in ``modules_to_save`` (and everything inside it) is no adapter target, as in PEFT. alignlab wrapped LoRA
around the head and the saved copy around that: ``"all-linear"`` with ``modules_to_save=["classifier"]`` on a BERT
classifier failed in ``save_adapter`` (safetensors: "Some tensors share memory"), PEFT's ``SEQ_CLS`` files with
``all-linear`` failed to load for RoBERTa (its ``target_modules`` list ``classifier.dense`` / ``classifier.out_proj``,
which PEFT leaves out: "adapter file lacks 16 key(s)"), and a file naming the head in both lists was refused."""

import pytest
import torch
import transformers

from conftest import logits_of, randomise_trainable

from alignlab.adapters import LoRAConfig, SavedModule, adapter_layers, inject, load_adapter, save_adapter

peft = pytest.importorskip("peft")

IDS = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))


def _classifier(kind):
    torch.manual_seed(0)
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=40, num_labels=3)
    if kind == "bert":
        return transformers.BertForSequenceClassification(transformers.BertConfig(**kw)).eval()
    return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**kw)).eval()


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("targets", ["all-linear", ["query", "value", "classifier"]], ids=["all-linear", "named"])
def test_the_saved_head_gets_no_lora_and_the_file_loads_in_peft(kind, targets, tmp_path):
    model = randomise_trainable(inject(_classifier(kind), LoRAConfig(r=4, target_modules=targets, modules_to_save=["classifier"])))
    assert isinstance(model.classifier, SavedModule)
    assert not [n for n, _ in adapter_layers(model) if n.startswith("classifier")]
    want = logits_of(model, IDS)
    save_adapter(model, tmp_path)
    torch.testing.assert_close(logits_of(peft.PeftModel.from_pretrained(_classifier(kind), str(tmp_path)), IDS), want)
    torch.testing.assert_close(logits_of(load_adapter(_classifier(kind), tmp_path), IDS), want)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("config", [dict(target_modules="all-linear", task_type="SEQ_CLS"),
                                    dict(target_modules=["query", "classifier"], modules_to_save=["classifier"])],
                         ids=["all-linear SEQ_CLS", "head in both lists"])
def test_peft_classifier_files_load_with_peft_outputs(kind, config, tmp_path):
    theirs = randomise_trainable(peft.get_peft_model(_classifier(kind), peft.LoraConfig(r=4, **config))).eval()
    theirs.save_pretrained(tmp_path)
    torch.testing.assert_close(logits_of(load_adapter(_classifier(kind), tmp_path), IDS), logits_of(theirs, IDS))
