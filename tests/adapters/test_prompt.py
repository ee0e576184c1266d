"""Prompt tuning and prefix tuning: shapes, labels/mask handling, identity when disabled, counts, errors."""

import json
import warnings

import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters import (
    PrefixTuningConfig,
    PromptTuningConfig,
    count_parameters,
    delete_adapter,
    disabled,
    inject,
    merge,
    save_adapter,
    set_adapter,
)

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 7, [0, 0] + [1] * 5])


def test_prompt_tuning_shapes_labels_and_count():
    base = make_tiny_llama()
    ref = base(input_ids=IDS, attention_mask=MASK).logits
    model = inject(base, PromptTuningConfig(num_virtual_tokens=3))
    out = model(input_ids=IDS, attention_mask=MASK, labels=IDS)
    assert out.logits.shape == (2, 10, 128)
    # virtual positions carry label -100; the last virtual position predicts the first real token
    want = torch.nn.functional.cross_entropy(out.logits[:, 2:-1].reshape(-1, 128), IDS.reshape(-1))
    torch.testing.assert_close(out.loss, want)
    assert count_parameters(model).trainable == 3 * model.config.hidden_size
    with disabled(model):
        torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).logits, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot be merged"):
        merge(model)


def test_prompt_init_from_token_ids_and_gradients():
    model = inject(make_tiny_llama(), PromptTuningConfig(num_virtual_tokens=5, init_token_ids=[3, 9]))
    holder = model.get_input_embeddings()
    table = holder.base_layer.weight
    torch.testing.assert_close(holder.prompt_embeddings["default"], table[[3, 9, 3, 9, 3]])
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert holder.prompt_embeddings["default"].grad.abs().sum() > 0
    assert table.grad is None


def test_prompt_equals_explicit_concatenation():
    base = make_tiny_llama()
    model = inject(base, PromptTuningConfig(num_virtual_tokens=2, seed=4))
    holder = model.get_input_embeddings()
    embeds = torch.cat([holder.prompt_embeddings["default"].detach().expand(2, -1, -1), holder.base_layer(IDS)], dim=1)
    with disabled(model):
        want = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(model(input_ids=IDS).logits, want)


def test_prefix_tuning_shapes_count_and_attention_to_prefix():
    base = make_tiny_llama()
    ref = base(input_ids=IDS, attention_mask=MASK).logits
    model = inject(base, PrefixTuningConfig(num_virtual_tokens=4))
    out = model(input_ids=IDS, attention_mask=MASK, labels=IDS)
    assert out.logits.shape == ref.shape
    assert not torch.allclose(out.logits, ref)
    cfg = model.config
    d_kv = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    assert count_parameters(model).trainable == 4 * 2 * cfg.num_hidden_layers * d_kv
    with disabled(model):
        torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).logits, ref, rtol=0, atol=0)
    out.loss.backward()
    assert model.get_input_embeddings().prefix_encoder["default"].embedding.grad.abs().sum() > 0


def test_prefix_projection_count():
    model = inject(make_tiny_llama(), PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8))
    cfg = model.config
    d_kv = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    width = 2 * cfg.num_hidden_layers * d_kv
    assert count_parameters(model).trainable == 3 * d_kv + (d_kv + 1) * 8 + (8 + 1) * width


def test_two_prompts_switch_and_delete():
    base = make_tiny_llama()
    ref = base(input_ids=IDS).logits
    model = inject(base, PromptTuningConfig(num_virtual_tokens=2))
    inject(model, PromptTuningConfig(num_virtual_tokens=3, seed=1), adapter_name="b")
    assert model(input_ids=IDS).logits.shape[1] == 9
    set_adapter(model, "b")
    assert model(input_ids=IDS).logits.shape[1] == 10
    delete_adapter(model, "b")
    delete_adapter(model, "default")
    torch.testing.assert_close(model(input_ids=IDS).logits, ref)


def test_config_errors():
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PrefixTuningConfig(num_virtual_tokens=-1)
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        PrefixTuningConfig(encoder_hidden_size=0)
    with pytest.raises(ValueError, match="init_token_ids"):
        inject(make_tiny_llama(), PromptTuningConfig(num_virtual_tokens=2, init_token_ids=[500]))
    with pytest.raises(ValueError, match="embedding_module"):
        inject(make_tiny_llama(), PromptTuningConfig(embedding_module="model.nope"))


def test_init_from_text_with_a_tokenizer():
    def tokenizer(text, add_special_tokens=True):  # a stand-in with the HF call signature; 1 and 2 are its specials
        ids = [ord(c) % 128 for c in text]
        return {"input_ids": [1, *ids, 2] if add_special_tokens and ids else ids}

    # tokenized as PEFT's TEXT init tokenizes it: the specials the tokenizer adds by default are kept, and repeated
    cfg = PromptTuningConfig.from_text("abc", tokenizer, num_virtual_tokens=7)
    assert cfg.init_token_ids == [1, 97, 98, 99, 2]
    model = inject(make_tiny_llama(), cfg)
    holder = model.get_input_embeddings()
    torch.testing.assert_close(holder.prompt_embeddings["default"], holder.base_layer.weight[[1, 97, 98, 99, 2, 1, 97]])
    with pytest.raises(ValueError, match="no tokens"):
        PromptTuningConfig.from_text("", tokenizer)
    with pytest.raises(TypeError, match="text must be a string"):
        PromptTuningConfig.from_text(["abc"], tokenizer)
    with pytest.raises(TypeError, match="tokenizer must be callable"):
        PromptTuningConfig.from_text("abc", "gpt2")


SOFT_PROMPTS = [PromptTuningConfig(num_virtual_tokens=3), PrefixTuningConfig(num_virtual_tokens=3, init_std=0.5)]


def _greedy_by_recompute(model, ids, mask, steps):
    """Greedy scores from a full no-cache recompute of the whole sequence at every step (the oracle)."""
    seq, msk, scores = ids, mask, []
    for _ in range(steps):
        pos = (msk.cumsum(-1) - 1).clamp_min(0)  # generate's positions for left-padded rows
        logits = model(input_ids=seq, attention_mask=msk, position_ids=pos, use_cache=False).logits[:, -1]
        scores.append(logits)
        nxt = logits.argmax(-1, keepdim=True)
        seq, msk = torch.cat([seq, nxt], 1), torch.cat([msk, torch.ones_like(nxt)], 1)
    return seq, scores


def _left_padded_batch():
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("cfg", SOFT_PROMPTS)
def test_generate_equals_full_recompute(cfg, use_cache):
    """HF generate (incremental with a KV cache, or recomputing) scores equal a recompute of the whole sequence."""
    model = inject(make_tiny_llama(), cfg)
    ids, mask = _left_padded_batch()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True, use_cache=use_cache)
    seq, scores = _greedy_by_recompute(model, ids, mask, 4)
    for step in range(4):
        torch.testing.assert_close(out.scores[step], scores[step], rtol=1e-4, atol=1e-4)
    assert torch.equal(out.sequences, seq)


def _cache_keywords():
    """Both spellings where this transformers' models take both; the old one alone on releases before the rename."""
    import inspect

    import transformers

    params = inspect.signature(transformers.LlamaForCausalLM.forward).parameters
    new = pytest.param("cache", marks=pytest.mark.skipif(
        "cache" not in params, reason=f"transformers {transformers.__version__} has no `cache` keyword (renamed in 5.24)"))
    return ["past_key_values", new]


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
@pytest.mark.parametrize("keyword", _cache_keywords())
@pytest.mark.parametrize("cfg", SOFT_PROMPTS)
def test_incremental_decoding_with_either_cache_keyword(cfg, keyword):
    """A hand-written decoding loop passing the cache as `past_key_values=` or `cache=` equals the recompute."""
    from alignlab.hf_cache import output_cache

    model = inject(make_tiny_llama(), cfg)
    ids, mask = _left_padded_batch()
    seq, scores = _greedy_by_recompute(model, ids, mask, 4)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    msk = mask
    for step in range(4):
        logits = out.logits[:, -1]
        torch.testing.assert_close(logits, scores[step], rtol=1e-4, atol=1e-4)
        nxt = seq[:, ids.shape[1] + step, None]
        msk = torch.cat([msk, torch.ones_like(nxt)], 1)
        pos = msk.sum(-1, keepdim=True) - 1
        out = model(input_ids=nxt, attention_mask=msk, position_ids=pos, use_cache=True,
                    **{keyword: output_cache(out)})


def test_prefix_config_refuses_a_non_finite_init_std_and_non_bool_flags():
    # init_std=NaN used to give NaN prefixes, hence NaN logits
    for bad in (float("nan"), float("inf"), -1.0, "1", None, True):
        with pytest.raises((ValueError, TypeError), match="init_std"):
            PrefixTuningConfig(init_std=bad)
    with pytest.raises(TypeError, match="prefix_projection"):
        PrefixTuningConfig(prefix_projection="no")
    for bad in (0, 1):
        with pytest.raises(TypeError, match="prefix_projection must be a bool"):
            PrefixTuningConfig(prefix_projection=bad)


def test_numpy_bool_prefix_projection_is_saved_as_a_json_boolean(tmp_path):
    import json

    np = pytest.importorskip("numpy")
    from alignlab.adapters import save_adapter

    cfg = PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=np.True_, encoder_hidden_size=8)
    assert cfg.prefix_projection is True
    save_adapter(inject(make_tiny_llama(), cfg), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["prefix_projection"] is True


def test_numpy_integers_accepted_bools_refused():
    np = pytest.importorskip("numpy")
    cfg = PromptTuningConfig(num_virtual_tokens=np.int64(4), init_token_ids=[np.int64(1), 2])
    assert cfg.num_virtual_tokens == 4 and type(cfg.num_virtual_tokens) is int and cfg.init_token_ids == [1, 2]
    assert PrefixTuningConfig(num_virtual_tokens=np.int32(3)).num_virtual_tokens == 3
    for bad in (True, 2.0):
        with pytest.raises(ValueError, match="num_virtual_tokens"):
            PromptTuningConfig(num_virtual_tokens=bad)


def _peft_file(tmp_path, cfg) -> dict:
    peft = pytest.importorskip("peft")
    peft.get_peft_model(make_tiny_llama(), cfg(peft)).save_pretrained(str(tmp_path))
    return json.loads((tmp_path / "adapter_config.json").read_text())


def test_peft_prompt_and_prefix_files_load_as_the_same_config(tmp_path):
    """What PEFT writes (and what we write) comes back with the same values and Python types as before."""
    raw = _peft_file(tmp_path / "prompt", lambda peft: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    loaded = PromptTuningConfig.from_peft(raw)
    assert loaded == PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM") and type(loaded.num_virtual_tokens) is int
    raw = _peft_file(tmp_path / "prefix", lambda peft: peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8))
    with pytest.warns(UserWarning, match="prefix_projection"):
        assert PrefixTuningConfig.from_peft(raw) == PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    save_adapter(inject(make_tiny_llama(), PrefixTuningConfig(num_virtual_tokens=3)), tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # prefix_projection false: no warning
        ours = PrefixTuningConfig.from_peft(json.loads((tmp_path / "ours" / "adapter_config.json").read_text()))
    assert ours == PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")


@pytest.mark.parametrize("cls", [PromptTuningConfig, PrefixTuningConfig])
@pytest.mark.parametrize("field, value, match", [
    ("num_virtual_tokens", 4.5, "num_virtual_tokens must be an integer, got 4.5"),  # int(4.5) is 4
    ("num_virtual_tokens", "4", "num_virtual_tokens must be an integer"),
    ("num_transformer_submodules", 1.0, "num_transformer_submodules must be an integer"),
    ("num_transformer_submodules", True, "num_transformer_submodules must be an integer"),  # True == 1
])
def test_config_fields_of_the_wrong_type_are_refused(cls, field, value, match):
    raw = {"peft_type": cls.peft_type, "num_virtual_tokens": 4, "num_transformer_submodules": 1}
    assert cls.from_peft(raw).num_virtual_tokens == 4
    with pytest.raises(ValueError, match=f"adapter_config.json: {match}"):
        cls.from_peft({**raw, field: value})
    with pytest.raises(ValueError, match="adapter_config.json: num_virtual_tokens is missing"):
        cls.from_peft({"peft_type": cls.peft_type})


def test_prefix_projection_must_be_a_json_boolean():
    # "false" is truthy: it used to warn that an MLP had been trained
    for bad in ("false", 0, 1):
        with pytest.raises(ValueError, match="adapter_config.json: prefix_projection must be true or false"):
            PrefixTuningConfig.from_peft({"num_virtual_tokens": 4, "prefix_projection": bad})


@pytest.mark.parametrize("cfg", [PromptTuningConfig(num_virtual_tokens=3, seed=2), PrefixTuningConfig(num_virtual_tokens=3)],
                         ids=["prompt", "prefix"])
def test_left_padded_scoring_needs_position_ids_from_the_mask(cfg):
    """docs/peft-methods.md: without position_ids a left-padded row's real tokens sit after its pads (as in
    PEFT's forward), so its logits are not the text's alone; position_ids from the mask make them so."""
    model = inject(make_tiny_llama(), cfg)
    with torch.no_grad():
        alone = model(input_ids=IDS[1:, 2:]).logits[0, -5:]
        pos = (MASK.cumsum(1) - 1).clamp(min=0)
        fixed = model(input_ids=IDS, attention_mask=MASK, position_ids=pos).logits[1, -5:]
        shifted = model(input_ids=IDS, attention_mask=MASK).logits[1, -5:]
    torch.testing.assert_close(fixed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(shifted, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [PromptTuningConfig(num_virtual_tokens=3), PrefixTuningConfig(num_virtual_tokens=3)])
def test_an_encoder_decoder_model_is_refused(config):
    """On T5 the hook prepended the prompt to the encoder's input alone and the file said CAUSAL_LM, while PEFT's
    SEQ_2_SEQ_LM files (virtual tokens for the encoder and the decoder) were refused at loading: one layout
    half-supported. Both methods now refuse such a model at inject, leaving it untouched."""
    transformers = pytest.importorskip("transformers")
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64,
                                                                       num_layers=1, num_heads=4))
    before = [type(m) for m in t5.modules()]
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        inject(t5, config, "p")
    assert [type(m) for m in t5.modules()] == before
