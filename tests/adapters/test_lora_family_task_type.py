"""``task_type`` on the LoRA-family configs (LoRA, (IA)³, VeRA, LoKr, AdaLoRA), with PEFT's meaning.

PEFT's ``LoraConfig(task_type="SEQ_CLS", ...)`` (``TOKEN_CLS``, ``QUESTION_ANS`` alike) trains a copy of the model's
freshly initialised head (``classifier`` / ``score``, ``qa_outputs``) next to the adapter; the LoRA family here had no
such field, so a ported recipe either failed on the keyword or, with the keyword dropped, trained in front of a random,
frozen head. The field now adds the head to ``modules_to_save`` as PEFT does (never an adapter target then, also under
``"all-linear"``), is written to ``adapter_config.json`` and read back from it; ``None`` keeps the old behaviour, which
is also PEFT's without a task type.
"""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import TINY_HEAD_CONFIG, make_tiny_bert, make_tiny_llama_classifier, randomise_trainable

from alignlab.adapters import (AdaLoRAConfig, IA3Config, LoKrConfig, LoRAConfig, SavedModule, VeRAConfig,
                               adapter_configs, disabled, inject, load_adapter, save_adapter)
from alignlab.adapters.config import PEFT_TASK_TYPES

peft = pytest.importorskip("peft")

IDS = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))  # no pad id (0): Llama pools the end


MODELS = {  # name -> (maker, PEFT task type, the head PEFT trains for it, a further module to save, attention, FFN out)
    "llama_seq_cls": (make_tiny_llama_classifier, "SEQ_CLS", "score", "model.norm", ["q_proj", "v_proj"], "down_proj"),
    "bert_seq_cls": (make_tiny_bert, "SEQ_CLS", "classifier", "pooler", ["query", "value"], "output.dense"),
    "bert_token_cls": (lambda: make_tiny_bert("ForTokenClassification"), "TOKEN_CLS", "classifier",
                       "bert.encoder.layer.1.output.LayerNorm", ["query", "value"], "output.dense"),
    "bert_qa": (lambda: make_tiny_bert("ForQuestionAnswering"), "QUESTION_ANS", "qa_outputs",
                "bert.encoder.layer.1.output.LayerNorm", ["query", "value"], "output.dense"),
}


def _family(name, attention, ffn):
    """(our config class, PEFT's, keyword arguments of ours, of PEFT's) for one family on one model."""
    if name == "lora":
        return LoRAConfig, peft.LoraConfig, dict(r=2, alpha=4, target_modules=attention), \
            dict(r=2, lora_alpha=4, target_modules=attention)
    if name == "ia3":
        kw = dict(target_modules=[*attention, ffn], feedforward_modules=[ffn])
        return IA3Config, peft.IA3Config, kw, kw
    if name == "vera":
        return VeRAConfig, peft.VeraConfig, dict(r=8, target_modules=attention), dict(r=8, target_modules=attention)
    if name == "lokr":
        return LoKrConfig, peft.LoKrConfig, dict(r=2, target_modules=attention), dict(r=2, target_modules=attention)
    kw = dict(init_r=4, target_r=2, total_step=10, target_modules=attention)
    return AdaLoRAConfig, peft.AdaLoraConfig, kw, kw


FAMILIES = ["lora", "ia3", "vera", "lokr", "adalora"]


def _pair(model_key, family, extra=False, task_type="model's", **ours_kw):
    """Our model and PEFT's, each adapted by ``family`` with the same settings (``task_type``: the model's by
    default)."""
    make, task, _, more, attention, ffn = MODELS[model_key]
    ours_cls, theirs_cls, kw, theirs_kw = _family(family, attention, ffn)
    task = task if task_type == "model's" else task_type
    saved = [more] if extra else None
    ours = inject(make(), ours_cls(**kw, **ours_kw, task_type=task, modules_to_save=saved))
    theirs = peft.get_peft_model(make(), theirs_cls(**theirs_kw, task_type=task, modules_to_save=saved))
    return ours, theirs


def _trainable(model, strip=""):
    """(the trained copies of saved modules by name and shape, the sizes of everything else trainable): the adapter
    tensors of some families are named and shaped otherwise in PEFT ((IA)³'s ``(1, n)`` vectors), so those are compared
    by size."""
    params = {n.removeprefix(strip): p for n, p in model.named_parameters() if p.requires_grad}
    copies = {n: tuple(p.shape) for n, p in params.items() if ".modules_to_save." in n}
    return copies, sorted(p.numel() for n, p in params.items() if n not in copies)


@pytest.mark.parametrize("extra", [False, True], ids=["head", "head+more"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("model_key", list(MODELS))
def test_trainable_parameters_are_peft_s(model_key, family, extra):
    ours, theirs = _pair(model_key, family, extra)
    assert _trainable(ours) == _trainable(theirs, strip="base_model.model.")
    head = MODELS[model_key][2]
    assert isinstance(ours.get_submodule(head), SavedModule)
    assert all(p.requires_grad for p in ours.get_submodule(head).modules_to_save["default"].parameters())
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".original_module." in n)


@pytest.mark.parametrize("model_key", list(MODELS))
def test_lora_parameter_names_are_peft_s(model_key):
    ours, theirs = _pair(model_key, "lora", extra=True)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n.removeprefix("base_model.model.") for n, p in theirs.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("task_type", [None, "FEATURE_EXTRACTION"])
@pytest.mark.parametrize("family", FAMILIES)
def test_no_head_task_leaves_the_head_frozen_as_peft_does(family, task_type, tmp_path):
    # None is the old behaviour and PEFT's plain PeftModel; FEATURE_EXTRACTION's wrapper adds no head either
    ours, theirs = _pair("bert_seq_cls", family, task_type=task_type)
    assert _trainable(ours) == _trainable(theirs, strip="base_model.model.")
    assert _trainable(ours)[0] == {} and not isinstance(ours.classifier, SavedModule)
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == task_type


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
@pytest.mark.parametrize("model_key", ["llama_seq_cls", "bert_seq_cls"])
def test_all_linear_targets_what_peft_targets(model_key, task_type):
    # with SEQ_CLS the head is a saved copy and no LoRA target (PEFT leaves modules_to_save out of its matches);
    # without a task type PEFT puts LoRA on the head under "all-linear" (it is no output embedding), and so do we
    make, _, head, *_ = MODELS[model_key]
    ours = inject(make(), LoRAConfig(r=2, target_modules="all-linear", task_type=task_type))
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=2, target_modules="all-linear", task_type=task_type))
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n.removeprefix("base_model.model.") for n, p in theirs.named_parameters() if p.requires_grad}
    assert isinstance(ours.get_submodule(head), SavedModule) == (task_type is not None)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("model_key", list(MODELS))
def test_files_load_both_ways_with_the_same_outputs(model_key, family, tmp_path):
    make, task, head, *_ = MODELS[model_key]
    out = "start_logits" if model_key == "bert_qa" else "logits"
    ours, theirs = _pair(model_key, family)
    randomise_trainable(ours, seed=3)
    randomise_trainable(theirs, seed=4)
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    raw = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (raw["task_type"], raw["modules_to_save"]) == (task, [head])
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == \
        set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    with torch.no_grad():
        want = ours(input_ids=IDS)[out]
        back = peft.PeftModel.from_pretrained(make(), str(tmp_path / "ours")).eval()
        assert type(back).__name__ == type(theirs).__name__  # PEFT's task wrapper, chosen by the file's task type
        torch.testing.assert_close(back(input_ids=IDS)[out], want)
        torch.testing.assert_close(load_adapter(make(), tmp_path / "ours")(input_ids=IDS)[out], want)
        loaded = load_adapter(make(), tmp_path / "theirs")
        torch.testing.assert_close(loaded(input_ids=IDS)[out], theirs.eval()(input_ids=IDS)[out])
    assert adapter_configs(loaded)["default"].task_type == task
    assert _trainable(loaded) == _trainable(ours)
    save_adapter(loaded, tmp_path / "again")  # the task type goes round
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["task_type"] == task


@pytest.mark.parametrize("model_key", ["llama_seq_cls", "bert_seq_cls"])
def test_the_head_trains_and_disabled_runs_the_original(model_key):
    make, task, head, *_ = MODELS[model_key]
    model = inject(make(), LoRAConfig(r=2, target_modules=MODELS[model_key][4], task_type=task))
    base = make()
    torch.nn.functional.cross_entropy(model(input_ids=IDS).logits, torch.tensor([0, 2])).backward()
    wrapper = model.get_submodule(head)
    copy_weight = wrapper.modules_to_save["default"].weight
    assert copy_weight.grad is not None and copy_weight.grad.abs().sum() > 0
    assert wrapper.original_module.weight.grad is None
    with torch.no_grad():
        copy_weight.sub_(copy_weight.grad)
        with disabled(model):
            torch.testing.assert_close(model(input_ids=IDS).logits, base(input_ids=IDS).logits)


@pytest.mark.parametrize("bad", ["seq_cls", "SEQ_CLASSIFICATION", 3, ""])
@pytest.mark.parametrize("family", FAMILIES)
def test_an_unknown_task_type_is_refused_naming_the_accepted_ones(family, bad):
    cls, _, kw, _ = _family(family, ["q_proj"], "down_proj")
    with pytest.raises(ValueError, match=r"task_type must be None or one of .*'SEQ_CLS'.*'FEATURE_EXTRACTION'"):
        cls(**kw, task_type=bad)
    for task in PEFT_TASK_TYPES:
        assert cls(**kw, task_type=task).task_type == task


def test_a_file_with_an_unknown_task_type_is_refused_as_peft_refuses_it(tmp_path):
    save_adapter(inject(make_tiny_llama_classifier(), LoRAConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS")), tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw | {"task_type": "CLASSIFY"}))
    with pytest.raises(ValueError, match="adapter_config.json: task_type must be None or one of"):
        load_adapter(make_tiny_llama_classifier(), tmp_path)
    with pytest.raises(ValueError, match="Invalid task type"):
        peft.PeftModel.from_pretrained(make_tiny_llama_classifier(), str(tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_head_task_on_a_model_without_that_head_is_refused(family):
    # PEFT adds the names, matches nothing and trains no head without a word; here it is an error, and the model
    # is left as it was
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_HEAD_CONFIG, num_key_value_heads=2))
    cls, _, kw, _ = _family(family, ["q_proj", "v_proj"], "down_proj")
    with pytest.raises(ValueError, match=r"task_type 'SEQ_CLS'.*classifier, score or pre_classifier.*modules_to_save"):
        inject(model, cls(**kw, task_type="SEQ_CLS"))
    assert not adapter_configs(model) and all(p.requires_grad for p in model.parameters())


def _xlnet():
    # a classifier whose head PEFT's SEQ_CLS names miss (sequence_summary + logits_proj)
    torch.manual_seed(0)
    config = transformers.XLNetConfig(vocab_size=128, d_model=32, n_layer=2, n_head=4, d_inner=64, num_labels=3)
    return transformers.XLNetForSequenceClassification(config).eval()


def test_peft_file_for_a_classifier_without_those_heads_loads_as_in_peft(tmp_path):
    theirs = peft.get_peft_model(_xlnet(), peft.LoraConfig(r=2, target_modules=["layer_1"], task_type="SEQ_CLS"))
    randomise_trainable(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    assert not any(".modules_to_save." in n for n, _ in theirs.named_parameters())  # PEFT trained no head
    ours = load_adapter(_xlnet(), tmp_path / "theirs")
    config = adapter_configs(ours)["default"]
    assert (config.task_type, config.modules_to_save) == ("SEQ_CLS", None)
    with torch.no_grad():
        want = theirs.eval()(input_ids=IDS).logits
        torch.testing.assert_close(ours(input_ids=IDS).logits, want)
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    with torch.no_grad():
        torch.testing.assert_close(peft.PeftModel.from_pretrained(_xlnet(), str(tmp_path / "ours")).eval()(
            input_ids=IDS).logits, want)
