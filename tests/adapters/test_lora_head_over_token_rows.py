"""LoRA on a tied ``lm_head`` next to trainable token rows on its input embedding, checked against PEFT.

alignlab refused the pair ("cannot yet make its rows follow the trained ones"). PEFT nests the rows under the head's
LoRA: ``logits = x W'ᵀ + s·B A x``, ``W'`` the shared table with the trained rows ``D`` in place, and saves the head's
``lora_A`` / ``lora_B`` and the embedding's rows once. alignlab now builds the same nesting (``lm_head`` a
``LoRALinear`` over a tied ``TrainableTokensLayer``): same logits, gradients, keys and config both ways."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import make_tied_llama, randomise_trainable

from alignlab.adapters import (LoRAConfig, TrainableTokensLayer, delete_adapter, disabled, inject, load_adapter, merge,
                               merge_and_unload, save_adapter, unmerge)
from alignlab.adapters.lora import LoRALinear

peft = pytest.importorskip("peft")

IDS = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
TARGETS, ROWS = ["q_proj", "lm_head"], [3, 5]


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _ours():
    return inject(make_tied_llama(), LoRAConfig(r=4, target_modules=TARGETS, trainable_token_indices=ROWS))


@pytest.fixture(scope="module")
def peft_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's note that a tied layer is adapted without ensure_weight_tying
        model = peft.get_peft_model(make_tied_llama(), peft.LoraConfig(r=4, target_modules=TARGETS,
                                                                      trainable_token_indices=ROWS))
    return randomise_trainable(model, scale=1.0).eval()


def test_peft_file_loads_with_peft_logits_and_gradients(peft_model, tmp_path):
    peft_model.save_pretrained(tmp_path)
    ours = load_adapter(make_tied_llama(), tmp_path)
    assert isinstance(ours.lm_head, LoRALinear) and isinstance(ours.lm_head.base_layer, TrainableTokensLayer)
    rows = ours.model.embed_tokens.trainable_tokens_delta["default"]
    assert ours.lm_head.base_layer.trainable_tokens_delta["default"] is rows
    torch.testing.assert_close(_logits(ours), _logits(peft_model))

    ours.zero_grad()
    peft_model.zero_grad()
    ours(input_ids=IDS).logits.square().mean().backward()
    peft_model(input_ids=IDS).logits.square().mean().backward()
    theirs = peft_model.base_model.model
    pairs = [(ours.lm_head.lora_A["default"].weight, theirs.lm_head.lora_A["default"].weight),
             (ours.lm_head.lora_B["default"].weight, theirs.lm_head.lora_B["default"].weight),
             (rows, theirs.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]),
             (ours.model.layers[0].self_attn.q_proj.lora_A["default"].weight,
              theirs.model.layers[0].self_attn.q_proj.lora_A["default"].weight)]
    for mine, want in pairs:
        torch.testing.assert_close(mine.grad, want.grad)
    trained = [sorted(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, peft_model)]
    assert trained[0] == trained[1]


def test_our_file_has_peft_keys_and_config_and_loads_in_peft(peft_model, tmp_path):
    peft_model.save_pretrained(tmp_path / "peft")
    ours = randomise_trainable(_ours(), scale=1.0)
    save_adapter(ours, tmp_path / "ours")
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == sorted(
        load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    mine, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    for key in ("trainable_token_indices", "ensure_weight_tying", "modules_to_save"):
        assert mine[key] == theirs[key], key
    assert "lm_head" in mine["target_modules"]  # (ours lists the exact module names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(make_tied_llama(), str(tmp_path / "ours"))
    torch.testing.assert_close(_logits(back), _logits(ours))
    torch.testing.assert_close(_logits(load_adapter(make_tied_llama(), tmp_path / "ours")), _logits(ours))


def test_merge_unmerge_unload_and_delete_keep_the_nesting_right():
    base = _logits(make_tied_llama())
    model = randomise_trainable(_ours(), scale=1.0)
    want = _logits(model)
    with disabled(model):
        torch.testing.assert_close(_logits(model), base, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="lm_head.weight is tied"):  # the head's ΔW must not reach the embedding
        merge(model)
    torch.testing.assert_close(_logits(model), want, rtol=1e-4, atol=1e-4)  # rows in before ΔW (else ΔW lost there)
    unmerge(model)
    torch.testing.assert_close(_logits(model), want, rtol=1e-4, atol=1e-4)

    model = randomise_trainable(_ours(), scale=1.0)
    want = _logits(model)
    with pytest.warns(UserWarning, match="lm_head.weight is tied"):
        merge_and_unload(model)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    torch.testing.assert_close(_logits(model), want, rtol=1e-4, atol=1e-4)

    model = _ours()
    delete_adapter(model, "default")
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(_logits(model), base, rtol=0, atol=0)


def test_rows_added_after_a_lora_head_reach_the_head():
    # the head's LoRA wrapper hid it from the tie: it kept scoring the new rows with the frozen table
    model = inject(make_tied_llama(), LoRAConfig(r=2, target_modules=["lm_head"]), adapter_name="a")
    inject(model, LoRAConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[7]), adapter_name="b")
    assert isinstance(model.lm_head.base_layer, TrainableTokensLayer)
    rows = model.model.embed_tokens.trainable_tokens_delta["b"]
    assert model.lm_head.base_layer.trainable_tokens_delta["b"] is rows
    h = torch.randn(3, 32)
    model.lm_head.set_active(["a"])
    model.lm_head.base_layer.set_active(["b"])
    with torch.no_grad():
        rows.add_(1.0)
        got = model.lm_head(h)[:, 7]
        want = h @ rows[0] + model.lm_head.delta_weight("a")[7] @ h.T
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("option, message", [
    ({"use_dora": True}, "'lm_head' tied to 'model.embed_tokens' also gets a LoRA adapter, and with use_dora=True"),
    ({"ensure_weight_tying": True}, "'lm_head' tied to 'model.embed_tokens' also gets a LoRA adapter, and with "
                                    "ensure_weight_tying=True"),
    ({"init": "pissa"}, "init='pissa' rewrites the base weight of 'lm_head'"),  # refused on any tied head
], ids=["dora", "ensure_weight_tying", "pissa"])
def test_options_that_would_read_the_frozen_table_are_refused_before_any_change(option, message):
    model = make_tied_llama()
    with pytest.raises(ValueError, match=message):
        inject(model, LoRAConfig(r=4, target_modules=TARGETS, trainable_token_indices=ROWS, **option))
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
