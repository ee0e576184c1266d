"""Prompt and prefix tuning on a classifier train its head, as PEFT's task wrappers do.

The head of an HF classifier or QA model (``score`` / ``classifier``, ``qa_outputs``) used to be saved with the prompt
but left frozen at its random init, where PEFT (``task_type="SEQ_CLS"`` etc.) trains a copy of it: a PEFT recipe ported
here trained a prompt in front of a random, fixed head. And a decoder classifier (Llama, GPT-2, ...) pooled its logits
``n`` positions short of the last real token: transformers finds that position in ``input_ids``, which do not count the
virtual tokens.
"""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import TINY_HEAD_CONFIG, make_tiny_bert, make_tiny_llama_classifier, randomise_trainable

from alignlab.adapters import (PrefixTuningConfig, PromptTuningConfig, SavedModule, adapter_configs, disabled, inject,
                               load_adapter, save_adapter)
from alignlab.adapters.prompt import SoftPromptEmbedding

peft = pytest.importorskip("peft")

N = 3
IDS = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))  # no pad id (0) among them


MODELS = {  # name -> (maker, PEFT task type, the module PEFT trains for it, a further module to save)
    "llama_seq_cls": (make_tiny_llama_classifier, "SEQ_CLS", "score", "model.norm"),
    "bert_seq_cls": (make_tiny_bert, "SEQ_CLS", "classifier", "pooler"),
    "bert_token_cls": (lambda: make_tiny_bert("ForTokenClassification"), "TOKEN_CLS", "classifier", "bert.encoder.layer.1.output.LayerNorm"),
    "bert_qa": (lambda: make_tiny_bert("ForQuestionAnswering"), "QUESTION_ANS", "qa_outputs", "bert.encoder.layer.1.output.LayerNorm"),
}
METHODS = {  # name -> (ours, PEFT's), keyword arguments shared
    "prompt": (PromptTuningConfig, peft.PromptTuningConfig, {}),
    "prefix": (PrefixTuningConfig, peft.PrefixTuningConfig, {}),
    "prefix_projection": (PrefixTuningConfig, peft.PrefixTuningConfig, {"prefix_projection": True, "encoder_hidden_size": 16}),
}


def _pair(model_key, method_key, extra: bool, task_type=None):
    make, task, _, more = MODELS[model_key]
    ours_cls, theirs_cls, kw = METHODS[method_key]
    saved = [more] if extra else None
    ours = inject(make(), ours_cls(num_virtual_tokens=N, modules_to_save=saved, task_type=task_type, **kw))
    theirs = peft.get_peft_model(make(), theirs_cls(task_type=task_type or task, num_virtual_tokens=N,
                                                    modules_to_save=saved, **kw))
    return ours, theirs


def _trainable(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def _split(trainable: dict, strip: str = ""):
    """(the trained copies of saved modules by name, the shapes of everything else): PEFT names its prompt encoder
    differently, so those tensors are compared by shape."""
    copies = {n.removeprefix(strip): s for n, s in trainable.items() if ".modules_to_save." in n}
    return copies, sorted(s for n, s in trainable.items() if ".modules_to_save." not in n)


@pytest.mark.parametrize("extra", [False, True], ids=["head", "head+more"])
@pytest.mark.parametrize("method_key", list(METHODS))
@pytest.mark.parametrize("model_key", list(MODELS))
def test_trainable_parameters_are_peft_s(model_key, method_key, extra):
    ours, theirs = _pair(model_key, method_key, extra)
    assert _split(_trainable(ours)) == _split(_trainable(theirs), strip="base_model.")
    head = MODELS[model_key][2]
    assert isinstance(ours.get_submodule(head), SavedModule)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".original_module." in n)


@pytest.mark.parametrize("method_key", list(METHODS))
@pytest.mark.parametrize("model_key", ["llama_seq_cls", "bert_seq_cls"])
def test_feature_extraction_keeps_the_head_frozen_and_out_of_the_file_as_peft_does(model_key, method_key, tmp_path):
    ours, theirs = _pair(model_key, method_key, extra=False, task_type="FEATURE_EXTRACTION")
    assert _split(_trainable(ours)) == _split(_trainable(theirs), strip="base_model.") == ({}, _split(_trainable(ours))[1])
    save_adapter(ours, tmp_path)
    theirs.save_pretrained(tmp_path / "peft")
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (raw["task_type"], raw["modules_to_save"]) == ("FEATURE_EXTRACTION", None)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {"prompt_embeddings"} \
        == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))


def test_bert_feature_extraction_file_runs_the_same_in_peft(tmp_path):
    # BERT pools position 0 whatever the ids: PEFT's feature-extraction wrapper, which passes inputs_embeds alone, and
    # ours agree (a decoder classifier would pool at the last position in PEFT, see test_decoder_classifier_pools_...)
    ours = randomise_trainable(inject(make_tiny_bert(), PromptTuningConfig(num_virtual_tokens=N, task_type="FEATURE_EXTRACTION")))
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_tiny_bert(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=IDS).logits, ours(input_ids=IDS).logits)


@pytest.mark.parametrize("method_key", list(METHODS))
@pytest.mark.parametrize("model_key", ["llama_seq_cls", "bert_seq_cls"])
def test_the_head_trains_and_disabled_runs_the_original(model_key, method_key):
    make, _, head, _ = MODELS[model_key]
    ours_cls, _, kw = METHODS[method_key]
    model = inject(make(), ours_cls(num_virtual_tokens=N, **kw))
    base = make()
    loss = torch.nn.functional.cross_entropy(model(input_ids=IDS).logits, torch.tensor([0, 2]))
    loss.backward()
    wrapper = model.get_submodule(head)
    copy_weight = wrapper.modules_to_save["default"].weight
    assert copy_weight.grad is not None and copy_weight.grad.abs().sum() > 0
    assert wrapper.original_module.weight.grad is None
    with torch.no_grad():
        copy_weight.sub_(copy_weight.grad)  # a plain SGD step, lr 1
        torch.testing.assert_close(wrapper.original_module.weight, base.get_submodule(head).weight, rtol=0, atol=0)
        with disabled(model):
            torch.testing.assert_close(model(input_ids=IDS).logits, base(input_ids=IDS).logits)


@pytest.mark.parametrize("extra", [False, True], ids=["head", "head+more"])
@pytest.mark.parametrize("model_key", list(MODELS))
def test_prompt_files_load_both_ways_with_the_same_outputs(model_key, extra, tmp_path):
    ours, theirs = _pair(model_key, "prompt", extra)
    randomise_trainable(ours, seed=3)
    randomise_trainable(theirs, seed=4)
    make = MODELS[model_key][0]
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    keys = {k for k in load_file(tmp_path / "theirs" / "adapter_model.safetensors")}
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == keys
    out = "start_logits" if model_key == "bert_qa" else "logits"
    with torch.no_grad():
        # no padding in IDS: PEFT's decoder classifier pools at the last position, which is then the last real token
        want = ours(input_ids=IDS)[out]
        torch.testing.assert_close(peft.PeftModel.from_pretrained(make(), str(tmp_path / "ours")).eval()(input_ids=IDS)[out], want)
        torch.testing.assert_close(load_adapter(make(), tmp_path / "ours")(input_ids=IDS)[out], want)
        loaded = load_adapter(make(), tmp_path / "theirs")
        torch.testing.assert_close(loaded(input_ids=IDS)[out], theirs.eval()(input_ids=IDS)[out])
    head = MODELS[model_key][2]
    assert isinstance(loaded.get_submodule(head), SavedModule)  # PEFT's trained head went into the copy
    torch.testing.assert_close(loaded.get_submodule(head).original_module.weight, make().get_submodule(head).weight)
    assert _split(_trainable(loaded)) == _split(_trainable(ours))


@pytest.mark.filterwarnings("ignore:loading a prefix trained with prefix_projection")
@pytest.mark.parametrize("method_key", ["prefix", "prefix_projection"])
def test_peft_prefix_file_with_its_head_loads_into_ours(method_key, tmp_path):
    # PEFT 0.21 cannot run prefix tuning on a classifier under transformers >= 5.24 (no past_key_values keyword), so
    # the loaded tensors are compared with PEFT's instead of the outputs
    _, theirs = _pair("llama_seq_cls", method_key, extra=True)
    randomise_trainable(theirs, seed=5)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(make_tiny_llama_classifier(), tmp_path)
    # PEFT lists its task heads after the user's module (each twice up to 0.21; 0.22 adds "pre_classifier"): the
    # names this model lacks are dropped, as PEFT does
    written = json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    assert written[0] == "model.norm" and {"classifier", "score"} <= set(written[1:])
    assert adapter_configs(ours)["default"].modules_to_save == ["model.norm", "score"]
    with torch.no_grad():
        torch.testing.assert_close(ours.model.embed_tokens.prefix_encoder["default"](),
                                   theirs.prompt_encoder["default"](torch.arange(N).unsqueeze(0))[0])
    torch.testing.assert_close(ours.score.modules_to_save["default"].weight,
                               theirs.base_model.score.modules_to_save["default"].weight)
    torch.testing.assert_close(ours.model.norm.modules_to_save["default"].weight,
                               theirs.base_model.model.norm.modules_to_save["default"].weight)


def _decoder_classifier(kind):
    torch.manual_seed(0)
    config = {"llama": lambda: transformers.LlamaConfig(**TINY_HEAD_CONFIG, num_key_value_heads=2),
              "qwen2": lambda: transformers.Qwen2Config(**TINY_HEAD_CONFIG, num_key_value_heads=2),
              "gpt2": lambda: transformers.GPT2Config(**TINY_HEAD_CONFIG, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=1),
              "opt": lambda: transformers.OPTConfig(**TINY_HEAD_CONFIG, ffn_dim=64, word_embed_proj_dim=32)}[kind]()
    cls = {"llama": "Llama", "qwen2": "Qwen2", "gpt2": "GPT2", "opt": "OPT"}[kind]
    return getattr(transformers, cls + "ForSequenceClassification")(config).eval()


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "opt"])
def test_decoder_classifier_pools_the_last_real_token(kind, padding):
    """The pooled logits are the head's output at the last real token of the prompted sequence, ``n + (last real
    index)``, written out here from the backbone's hidden states. (PEFT passes only ``inputs_embeds``, so transformers
    pools at the last position: the same without padding or with left padding, a pad token's with right padding.)"""
    model = randomise_trainable(inject(_decoder_classifier(kind), PromptTuningConfig(num_virtual_tokens=N)))
    ids, mask = IDS.clone(), torch.ones_like(IDS)
    if padding == "right":
        ids[1, 4:], mask[1, 4:] = 0, 0
    elif padding == "left":
        ids[1, :3], mask[1, :3] = 0, 0
    last = N + torch.tensor([6, 3 if padding == "right" else 6])
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        backbone = model.base_model.decoder if kind == "opt" else model.base_model
        hidden = backbone(input_ids=ids, attention_mask=mask)[0]
        assert hidden.shape[1] == N + ids.shape[1]
        want = model.score(hidden)[torch.arange(2), last]
    torch.testing.assert_close(got, want)


def test_modules_to_save_holding_the_prompt_embedding_is_refused():
    for saved in (["model"], ["embed_tokens"]):
        model = make_tiny_llama_classifier()
        with pytest.raises(ValueError, match="modules_to_save: .* holds the input embedding 'model.embed_tokens'"):
            inject(model, PromptTuningConfig(num_virtual_tokens=N, modules_to_save=saved))
        assert adapter_configs(model) == {}
        assert not any(isinstance(m, (SavedModule, SoftPromptEmbedding)) for m in model.modules())
    with pytest.raises(TypeError, match="modules_to_save must be a list of module names"):
        PrefixTuningConfig(modules_to_save="score")
