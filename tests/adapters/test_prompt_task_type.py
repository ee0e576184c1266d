"""A prompt- or prefix-tuning file names the PEFT task type of the model it came from. It always said CAUSAL_LM:
PEFT then wrapped a BERT classifier in PeftModelForCausalLM and failed ('prepare_inputs_for_generation'); a bare
backbone likewise. PEFT's classifier/QA wrappers also read the head from the file, so it is saved there."""

import json

import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters import PrefixTuningConfig, PromptTuningConfig, adapter_configs, inject, load_adapter, save_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 7, [1] * 5 + [0, 0]])

BERTS = {  # head class -> (task type, the output compared, the head PEFT reads from the file)
    "BertForSequenceClassification": ("SEQ_CLS", "logits", ["classifier"]),
    "BertForTokenClassification": ("TOKEN_CLS", "logits", ["classifier"]),
    "BertForQuestionAnswering": ("QUESTION_ANS", "start_logits", ["qa_outputs"]),
    "BertModel": ("FEATURE_EXTRACTION", "last_hidden_state", None),
}


def _bert(cls_name):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64,
                                     num_labels=2 if "Question" in cls_name else 3)
    return getattr(transformers, cls_name)(config).eval()


def _outputs(model, key):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK)[key]


@pytest.mark.parametrize("cls_name", list(BERTS))
def test_saved_prompt_loads_in_peft_and_back_with_the_same_outputs(cls_name, tmp_path):
    task, key, heads = BERTS[cls_name]
    model = inject(_bert(cls_name), PromptTuningConfig(num_virtual_tokens=3, seed=1))
    want = _outputs(model, key)
    save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (raw["task_type"], raw["modules_to_save"]) == (task, heads)
    theirs = peft.PeftModel.from_pretrained(_bert(cls_name), str(tmp_path)).eval()
    torch.testing.assert_close(_outputs(theirs, key), want)
    torch.testing.assert_close(_outputs(load_adapter(_bert(cls_name), tmp_path), key), want)


def test_peft_classifier_prompt_with_its_trained_head_loads_into_ours(tmp_path):
    """PEFT trains the classifier next to the prompt (SEQ_CLS); its file failed to load ('no adapted module')."""
    theirs = peft.get_peft_model(_bert("BertForSequenceClassification"),
                                 peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(_bert("BertForSequenceClassification"), tmp_path)
    assert adapter_configs(ours)["default"].task_type == "SEQ_CLS"
    torch.testing.assert_close(_outputs(ours, "logits"), _outputs(theirs.eval(), "logits"))


def test_causal_lm_keeps_its_task_type_and_a_given_task_type_is_written(tmp_path):
    model = inject(make_tiny_llama(), PromptTuningConfig(num_virtual_tokens=2))
    save_adapter(model, tmp_path / "lm")
    assert json.loads((tmp_path / "lm" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    model = inject(_bert("BertForSequenceClassification"),
                   PromptTuningConfig(num_virtual_tokens=2, task_type="FEATURE_EXTRACTION"))
    save_adapter(model, tmp_path / "fe")
    raw = json.loads((tmp_path / "fe" / "adapter_config.json").read_text())
    assert (raw["task_type"], raw["modules_to_save"]) == ("FEATURE_EXTRACTION", None)
    with pytest.raises(ValueError, match="task_type must be None .* or one of"):
        PromptTuningConfig(task_type="SEQ_2_SEQ_LM")
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="task_type 'SEQ_CLS': PEFT trains the model's classifier, score or pre_classifier head"):
        inject(model, PromptTuningConfig(num_virtual_tokens=2, task_type="SEQ_CLS"))
    assert adapter_configs(model) == {}  # refused before the model changed


def _llama_classifier():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, num_labels=3, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(config).eval()


@pytest.mark.parametrize("make, head", [(_llama_classifier, "score"),
                                        (lambda: _bert("BertForSequenceClassification"), "classifier")],
                         ids=["llama", "bert"])
def test_saved_prefix_on_a_classifier_names_seq_cls_and_loads_back(make, head, tmp_path):
    model = inject(make(), PrefixTuningConfig(num_virtual_tokens=3))
    want = _outputs(model, "logits")
    save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (raw["task_type"], raw["modules_to_save"]) == ("SEQ_CLS", [head])
    torch.testing.assert_close(_outputs(load_adapter(make(), tmp_path), "logits"), want)
    theirs = peft.PeftModel.from_pretrained(make(), str(tmp_path)).eval()
    assert type(theirs).__name__ == "PeftModelForSequenceClassification"
    try:
        got = _outputs(theirs, "logits")
    except ValueError as e:  # PEFT 0.21 looks for a past_key_values keyword, which transformers 5.24 renamed
        if "does not support past key values" not in str(e):
            raise
        pytest.skip(f"peft {peft.__version__} with transformers {transformers.__version__}: {e}")
    torch.testing.assert_close(got, want)


def _xlnet():
    # a classifier whose head PEFT's SEQ_CLS wrapper does not find (sequence_summary + logits_proj)
    torch.manual_seed(0)
    config = transformers.XLNetConfig(vocab_size=128, d_model=32, n_layer=2, n_head=4, d_inner=64, num_labels=3)
    return transformers.XLNetForSequenceClassification(config).eval()


def test_peft_prompt_file_for_a_classifier_without_those_heads_loads_as_in_peft(tmp_path):
    """PEFT lists classifier/score in the file, finds neither and trains the prompt alone; loading its file raised
    ('has no classifier or score head'), where the LoRA family's loaded."""
    theirs = peft.get_peft_model(_xlnet(), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    assert [n for n, p in theirs.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.normal_(generator=torch.Generator().manual_seed(3))
    theirs.save_pretrained(tmp_path / "theirs")
    want = _outputs(theirs.eval(), "logits")
    ours = load_adapter(_xlnet(), tmp_path / "theirs")
    config = adapter_configs(ours)["default"]
    assert (config.task_type, config.modules_to_save) == ("SEQ_CLS", None)
    torch.testing.assert_close(_outputs(ours, "logits"), want)
    save_adapter(ours, tmp_path / "ours")
    raw = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (raw["task_type"], raw["modules_to_save"]) == ("SEQ_CLS", None)
    torch.testing.assert_close(_outputs(peft.PeftModel.from_pretrained(_xlnet(), str(tmp_path / "ours")).eval(),
                                        "logits"), want)
    # a config of the user's still needs the head its task trains
    with pytest.raises(ValueError, match="task_type 'SEQ_CLS'.*classifier, score or pre_classifier"):
        inject(_xlnet(), PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))
