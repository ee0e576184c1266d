"""PEFT-format save/load: files, atomic writes and every error path."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama

from alignlab.adapters import LoRAConfig, adapter_layers, inject, load_adapter, merge, save_adapter
from alignlab.adapters.io import peft_field, refuse_unsupported

IDS = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))


def _trained(use_dora=False):
    model = inject(make_tiny_llama(), LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], use_dora=use_dora))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g))
    return model


def test_roundtrip_and_key_names(tmp_path):
    model = _trained(use_dora=True)
    save_adapter(model, tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    assert len(keys) == 4 * 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    fresh = load_adapter(make_tiny_llama(), tmp_path)
    torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits)


def test_missing_key_is_named(tmp_path):
    save_adapter(_trained(), tmp_path)
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    del state["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    model = make_tiny_llama()
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj\.lora_B"):
        load_adapter(model, tmp_path)
    assert not list(adapter_layers(model))  # a failed load leaves no half-loaded adapter behind


def test_shape_mismatch_and_unexpected_keys_are_named(tmp_path):
    save_adapter(_trained(), tmp_path)
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    state[key] = torch.zeros(5, 32)
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight: shape \(5, 32\)"):
        load_adapter(make_tiny_llama(), tmp_path)
    state[key] = torch.zeros(2, 32)
    state["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(2, 32)
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"k_proj\.lora_A"):
        load_adapter(make_tiny_llama(), tmp_path)


def test_config_errors(tmp_path):
    save_adapter(_trained(), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type must be 'LORA'"):
        load_adapter(make_tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "lora_bias": True}))
    with pytest.raises(ValueError, match="lora_bias"):
        load_adapter(make_tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(make_tiny_llama(), tmp_path / "nowhere")


@pytest.mark.parametrize("field,value,match", [
    ("use_rslora", "false", "use_rslora must be true or false, got 'false'"),  # bool("false") is True
    ("use_dora", 0, "use_dora must be true or false"),
    ("r", 2.7, "r must be an integer, got 2.7"),  # int(2.7) would load a rank-2 adapter
    ("r", "2", "r must be an integer"),
    ("lora_alpha", "4", "lora_alpha must be a number"),
    ("lora_dropout", True, "lora_dropout must be a number"),
    ("lora_alpha", float("nan"), "lora_alpha must be a finite number, got nan"),
    ("lora_alpha", None, "lora_alpha must be a number, got None"),
    # list(5) stopped on "'int' object is not iterable", naming no field; a mapping was read as its keys
    ("target_modules", 5, "target_modules must be a regex string or a list of module names, got 5"),
    ("target_modules", {"q_proj": 1}, "target_modules must be a regex string or a list of module names"),
    ("target_parameters", 5, "target_parameters must be a regex string or a list of module names, got 5"),
])
def test_config_fields_of_the_wrong_type_are_refused(tmp_path, field, value, match):
    save_adapter(_trained(), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, field: value}))
    model = make_tiny_llama()
    with pytest.raises(ValueError, match=match):
        load_adapter(model, tmp_path)
    assert not list(adapter_layers(model))


@pytest.mark.parametrize("key,ok,value", [("lora_bias", False, 0), ("use_dora", False, 0.0), ("flag", True, 1),
                                          ("rank_dropout", 0.0, False), ("module_dropout", 0, False)])
def test_refuse_unsupported_tells_a_bool_from_a_number(key, ok, value):
    """`!=` let 0 pass for false and false for 0.0 (0 == False, 1 == True in Python): a bool matches only a bool."""
    with pytest.raises(ValueError, match=f"adapter_config.json: {key}={value!r} is not supported by alignlab for X"):
        refuse_unsupported({key: value}, "X", ((key, ok),))
    refuse_unsupported({key: ok}, "X", ((key, ok),))
    refuse_unsupported({}, "X", ((key, ok),))


def test_refuse_unsupported_takes_an_int_for_a_float_and_null_only_for_null():
    refuse_unsupported({"rank_dropout": 0, "layers_to_transform": None, "bias": "none"}, "X",
                       (("rank_dropout", 0.0), ("layers_to_transform", None), ("bias", "none")))
    for key, ok, value in (("layers_to_transform", None, 0), ("layers_to_transform", None, False),
                           ("bias", "none", None)):
        with pytest.raises(ValueError, match=f"{key}="):
            refuse_unsupported({key: value}, "X", ((key, ok),))


def test_lora_bias_zero_is_refused_on_load(tmp_path):
    save_adapter(_trained(), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "lora_bias": 0}))
    with pytest.raises(ValueError, match="lora_bias=0 is not supported by alignlab for LoRA"):
        load_adapter(make_tiny_llama(), tmp_path)


def test_peft_field_returns_json_values_unconverted_or_names_the_field():
    raw = {"r": 4, "alpha": 6, "flag": False, "opt": None, "big": 2**40}
    assert peft_field(raw, "r", "int") == 4 and type(peft_field(raw, "r", "int")) is int
    assert peft_field(raw, "big", "int") == 2**40
    assert peft_field(raw, "alpha", "number") == 6.0 and type(peft_field(raw, "alpha", "number")) is float
    assert peft_field(raw, "flag", "bool", True) is False
    assert peft_field(raw, "absent", "number", 0.5) == 0.5
    assert peft_field(raw, "opt", "int", None) is None  # null is "unset" for an optional field
    with pytest.raises(ValueError, match="adapter_config.json: opt must be an integer, got None"):
        peft_field(raw, "opt", "int", 3)
    with pytest.raises(ValueError, match="adapter_config.json: absent is missing"):
        peft_field(raw, "absent", "int")
    for kind, bad in (("int", True), ("int", 4.0), ("number", False), ("number", "1e-3"), ("number", float("inf")),
                      ("bool", 1), ("bool", "true")):
        with pytest.raises(ValueError, match="adapter_config.json: x must be"):
            peft_field({"x": bad}, "x", kind)


def test_unreadable_config_names_the_file(tmp_path):
    save_adapter(_trained(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{")
    with pytest.raises(ValueError, match=r"adapter_config\.json: not valid JSON"):
        load_adapter(make_tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"adapter_config\.json: expected a JSON object"):
        load_adapter(make_tiny_llama(), tmp_path)


def test_fan_in_fan_out_follows_the_layer_type_as_in_peft(tmp_path):
    """PEFT sets fan_in_fan_out per layer from its type (False for nn.Linear, with a warning): a file
    that says True loads on a Llama exactly as one that says False."""
    model = _trained()
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is False
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "fan_in_fan_out": True}))
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(load_adapter(make_tiny_llama(), tmp_path)(ids).logits, model(ids).logits)


def test_save_errors(tmp_path):
    model = _trained()
    with pytest.raises(ValueError, match="not found"):
        save_adapter(model, tmp_path, adapter_name="other")
    merge(model)
    with pytest.raises(ValueError, match="merged"):
        save_adapter(model, tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_argument_types_are_named(tmp_path):
    model = _trained()
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        save_adapter(model, None)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        save_adapter("model", tmp_path)
    save_adapter(model, tmp_path)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        load_adapter(make_tiny_llama(), 5)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        load_adapter("model", tmp_path)


def test_failed_write_leaves_previous_files_intact(tmp_path, monkeypatch):
    model = _trained()
    save_adapter(model, tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    import alignlab.adapters.io as io

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_failed_config_write_keeps_the_previous_weights_and_config_together(tmp_path, monkeypatch):
    """Both files are written before either is renamed: a config write that fails must not leave the new
    weights (rank 4) beside the old config (rank 2), a pair that no longer loads."""
    old = _trained()
    save_adapter(old, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("adapter_model.safetensors", "adapter_config.json")}
    new = inject(make_tiny_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    write_text = type(tmp_path).write_text

    def full_disk(self, *args, **kwargs):
        if self.name.startswith(".adapter_config.json."):
            raise OSError("disk full")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "write_text", full_disk)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(new, tmp_path)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # no temp file left
    torch.testing.assert_close(load_adapter(make_tiny_llama(), tmp_path)(IDS).logits, old(IDS).logits)


def test_saved_config_names_the_base_model_so_auto_peft_loads_it(tmp_path):
    """A model from `from_pretrained` writes its path and task type, so PEFT's Auto class can rebuild it alone."""
    peft = pytest.importorskip("peft")
    import transformers

    make_tiny_llama().save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = inject(base, LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.5)
    save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "base")
    assert cfg["task_type"] == "CAUSAL_LM"
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    # a model built from a config alone has no path to name: the field stays empty
    save_adapter(_trained(), tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["base_model_name_or_path"] is None


def test_decoder_only_conditional_generation_models_are_not_written_as_seq2seq(tmp_path):
    """``…ForConditionalGeneration`` is also the class name of decoder-only vision-language models (LLaVA, Gemma 3,
    Qwen2-VL): their files said ``SEQ_2_SEQ_LM``, so PEFT built a ``PeftModelForSeq2SeqLM`` and
    ``AutoPeftModelForCausalLM`` refused them. Only an encoder-decoder model names that task now."""
    peft = pytest.importorskip("peft")
    import transformers

    torch.manual_seed(0)
    text = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=28, patch_size=14)
    llava = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(text_config=text, vision_config=vision,
                                                                                image_token_index=127)).eval()
    model = inject(copy.deepcopy(llava), LoRAConfig(r=2, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    save_adapter(model, tmp_path / "llava")
    assert json.loads((tmp_path / "llava" / "adapter_config.json").read_text())["task_type"] is None
    theirs = peft.PeftModel.from_pretrained(llava, tmp_path / "llava")
    assert not isinstance(theirs, peft.PeftModelForSeq2SeqLM)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64,
                                                                       num_layers=1, num_heads=4))
    save_adapter(inject(t5, LoRAConfig(r=2, target_modules=["q"])), tmp_path / "t5")
    assert json.loads((tmp_path / "t5" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"


def test_peft_seq_cls_adapter_loads_although_it_names_both_task_heads(tmp_path):
    """PEFT's SEQ_CLS adapters list modules_to_save=["classifier", "score"]; a Llama has only `score`."""
    peft = pytest.importorskip("peft")
    import transformers

    def classifier(seed):
        torch.manual_seed(seed)
        cfg = make_tiny_llama().config
        cfg.num_labels, cfg.pad_token_id = 3, 0
        return transformers.LlamaForSequenceClassification(cfg).eval()

    theirs = peft.get_peft_model(classifier(0), peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4,
                                                                target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.normal_(0, 0.3)
    theirs.save_pretrained(tmp_path)
    assert set(json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]) >= {"classifier", "score"}
    ours = load_adapter(classifier(0), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_modules_to_save_match_a_plain_suffix_as_in_peft(tmp_path):
    """PEFT matches modules_to_save by `key.endswith(name)`: SEQ_CLS's "classifier" wraps DistilBERT's
    `pre_classifier` too and saves its weights, which we refused as keys matching no module (we wanted a '.'
    before the name). Both ways: PEFT's file loads here, ours loads in PEFT."""
    peft = pytest.importorskip("peft")
    import transformers

    def classifier():
        torch.manual_seed(0)
        cfg = transformers.DistilBertConfig(vocab_size=128, dim=32, hidden_dim=64, n_layers=1, n_heads=2,
                                            num_labels=3, max_position_embeddings=16)
        return transformers.DistilBertForSequenceClassification(cfg).eval()

    theirs = peft.get_peft_model(classifier(), peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4,
                                                               target_modules=["q_lin"]))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.normal_(0, 0.3)
    theirs.save_pretrained(tmp_path / "peft")
    assert any(k.startswith("base_model.model.pre_classifier.")
               for k in load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    ours = load_adapter(classifier(), tmp_path / "peft")
    assert {type(m).__name__ for n, m in ours.named_modules() if n in ("pre_classifier", "classifier")} == {"SavedModule"}
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(classifier(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_failed_load_leaves_requires_grad_as_it_was(tmp_path):
    save_adapter(_trained(), tmp_path)
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = next(k for k in state if "lora_A" in k)
    state[key] = torch.zeros(3, *state[key].shape[1:])  # wrong rank
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    model = make_tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)  # a mix of flags, as a user may have set them
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="shape"):
        load_adapter(model, tmp_path)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_numpy_scalars_in_lora_config_save_as_python_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    # A sweep over np.linspace / np.float32 values: accepted, stored (and saved) as Python numbers.
    cfg = LoRAConfig(r=np.int64(2), alpha=np.float32(16), dropout=np.float32(0.0), target_modules=["q_proj"],
                     rank_pattern={"q_proj": np.int32(4)}, alpha_pattern={"q_proj": np.float64(8.0)})
    ref = LoRAConfig(r=2, alpha=16.0, dropout=0.0, target_modules=["q_proj"], rank_pattern={"q_proj": 4},
                     alpha_pattern={"q_proj": 8.0})
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.rank_pattern, cfg.alpha_pattern) == (
        ref.r, ref.alpha, ref.dropout, ref.rank_pattern, ref.alpha_pattern)
    assert type(cfg.r) is int and type(cfg.alpha) is float and type(cfg.rank_pattern["q_proj"]) is int
    save_adapter(inject(make_tiny_llama(), cfg), tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["lora_alpha"] == 16.0 and saved["r"] == 2


@pytest.mark.parametrize("kw", [{"r": True}, {"alpha": True}, {"alpha": float("nan")}, {"dropout": True},
                                {"dropout": float("nan")}, {"rank_pattern": {"q": True}}, {"alpha_pattern": {"q": False}}])
def test_lora_config_refuses_bools_and_nan(kw):
    with pytest.raises(ValueError):
        LoRAConfig(**kw)


def test_saved_files_get_the_permissions_their_writers_give(tmp_path):
    """The atomic write lets the writer create the file: the config gets the umask's permissions, as PEFT's does
    (a mkstemp temporary made it 0600, unreadable to the others of a shared machine); the weights get what
    safetensors' own save_file gives under that umask."""
    import os

    old = os.umask(0o022)
    try:
        save_adapter(_trained(), tmp_path / "a")
        save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "adapter_config.json").stat().st_mode & 0o777 == 0o644
    want = (tmp_path / "plain.safetensors").stat().st_mode & 0o777
    assert (tmp_path / "a" / "adapter_model.safetensors").stat().st_mode & 0o777 == want


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, OSError])
def test_a_rename_failing_after_the_first_puts_the_previous_pair_back(tmp_path, monkeypatch, interrupt):
    """Ctrl-C (or an error) between the two renames left the new weights (rank 4) beside the old config
    (rank 2): a pair that no longer loads ("4 key(s) that match no adapted module")."""
    old = _trained()
    save_adapter(old, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    new = inject(make_tiny_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    import alignlab.adapters.io as io

    replace, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise interrupt("between the renames")
        return replace(src, dst)

    monkeypatch.setattr(io.os, "replace", second_fails)
    with pytest.raises(interrupt, match="between the renames"):
        save_adapter(new, tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp or backup file left
    torch.testing.assert_close(load_adapter(make_tiny_llama(), tmp_path)(IDS).logits, old(IDS).logits)


def test_a_failed_first_save_leaves_no_lone_weights(tmp_path):
    """No previous adapter, and the config cannot be renamed into place (a directory of that name): the new
    weights were left alone in the folder, a file with no config."""
    (tmp_path / "adapter_config.json").mkdir()
    with pytest.raises(IsADirectoryError, match="adapter_config.json"):
        save_adapter(_trained(), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter_config.json"]
    assert (tmp_path / "adapter_config.json").is_dir()



@pytest.mark.parametrize("keep", [0, 100, -10])
def test_a_truncated_weights_file_is_named(tmp_path, keep):
    """A half-copied adapter_model.safetensors raised safetensors' own error ("incomplete metadata, file not
    fully covered"), which named no file."""
    save_adapter(_trained(), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep])
    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: not a readable safetensors file"):
        load_adapter(model, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model as it was


def test_an_adapter_on_the_meta_device_is_named_and_nothing_is_written(tmp_path):
    """A model made under torch.device("meta") and never filled: save_adapter raised NotImplementedError
    "Cannot copy out of meta tensor; no data!", with no tensor named."""
    with torch.device("meta"):
        model = make_tiny_llama()
    inject(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"adapter 'default' has 4 tensor\(s\) on the meta device.*"
                                         r"'base_model\.model\.model\.layers\.\d\.self_attn\.q_proj\.lora_"):
        save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_path_that_is_a_file_is_refused_by_name(tmp_path):
    """save_adapter(model, "run/adapter_model.safetensors") over an existing file: FileExistsError "[Errno 17] File
    exists", which did not say a directory was wanted (PEFT: ValueError "should be a directory, not a file")."""
    target = tmp_path / "adapter_model.safetensors"
    target.write_bytes(b"keep")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors' is a file; save_adapter writes a directory"):
        save_adapter(_trained(), target)
    assert target.read_bytes() == b"keep" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_leading_tilde_is_the_home_folder_and_replaced_files_keep_their_mode(tmp_path, monkeypatch):
    """``save_adapter(model, "~/ad")`` made a folder named ``~`` in the current one (and ``load_adapter`` looked
    there); saving again over a private 0600 ``adapter_config.json`` made it 0644 (the rename took the umask's)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    model = _trained()
    assert save_adapter(model, "~/ad") == tmp_path / "home" / "ad"
    assert not (tmp_path / "~").exists()
    files = [tmp_path / "home" / "ad" / name for name in ("adapter_config.json", "adapter_model.safetensors")]
    for f, mode in zip(files, (0o600, 0o640)):
        os.chmod(f, mode)
    save_adapter(model, "~/ad")
    assert [f.stat().st_mode & 0o777 for f in files] == [0o600, 0o640]
    fresh = load_adapter(make_tiny_llama(), "~/ad")
    torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits)


def test_a_failed_first_save_leaves_no_empty_folders(tmp_path, monkeypatch):
    """The folders made for a new adapter path stayed behind, empty, when the write failed (a full disk)."""
    import alignlab.adapters.io as io

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(_trained(), tmp_path / "runs" / "step-100")
    assert list(tmp_path.iterdir()) == []


def test_ia3_feedforward_modules_of_the_wrong_kind_are_named():
    from alignlab.adapters import IA3Config

    with pytest.raises(TypeError, match="adapter_config.json: feedforward_modules must be a regex string or a list"):
        IA3Config.from_peft({"target_modules": ["k_proj", "down_proj"], "feedforward_modules": 5})
    assert IA3Config.from_peft({"target_modules": ["k_proj"], "feedforward_modules": None}).feedforward_modules == []
