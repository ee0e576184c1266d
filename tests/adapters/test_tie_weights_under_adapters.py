"""transformers' ``tie_weights()`` on a model whose tied input embedding / output head is wrapped by adapter layers.

transformers names the tied tables by path (``lm_head.weight`` <- ``model.embed_tokens.weight``) and reads and writes
them by those paths; ``resize_token_embeddings``, ``init_weights``, the Trainer and the loaders call it. With trainable
token rows on a tied embedding it raised ``AttributeError`` ("`model.embed_tokens.weight` is neither a parameter,
buffer, nor extra state"; PEFT 0.21 fails the same way); with a LoRA on the tied head it hung the table on the wrapper
as a stray ``lm_head.weight`` parameter; ``save_pretrained`` of such a model (the Trainer's checkpoint) refused its
shared tensors. ``inject`` now points the model's tied-weight maps through the wrappers, and puts them back when the
wrappers go."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import make_tied_llama, make_tiny_t5, randomise_trainable

from alignlab.adapters import (LoRAConfig, delete_adapter, inject, load_adapter, merge_and_unload, save_adapter,
                               set_adapter)

transformers = pytest.importorskip("transformers")

IDS = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
CASES = {
    "rows": dict(target_modules=["q_proj"], trainable_token_indices=[3, 5]),
    "rows under a head LoRA": dict(target_modules=["q_proj", "lm_head"], trainable_token_indices=[3, 5]),
    "head LoRA": dict(target_modules=["q_proj", "lm_head"]),
    "embedding LoRA": dict(target_modules=["embed_tokens"]),
    "embedding LoRA, tied head": dict(target_modules=["embed_tokens"], ensure_weight_tying=True),
    "head trained in full": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


def _logits(model):
    kw = {"decoder_input_ids": IDS[:, :5]} if isinstance(model.config, transformers.T5Config) else {}
    with torch.no_grad():
        return model(input_ids=IDS, **kw).logits


def _adapted(case, make=make_tied_llama):
    return randomise_trainable(inject(make(), LoRAConfig(r=4, **CASES[case])), scale=1.0)


def _values(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "kept map"])
@pytest.mark.parametrize("case", list(CASES))
def test_tie_weights_keeps_the_adapted_model(case, recompute):
    model = _adapted(case)
    want, before = _logits(model), _values(model)
    model.tie_weights(recompute_mapping=recompute)
    assert _values(model).keys() == before.keys()  # no stray 'lm_head.weight' on a wrapper
    for k, v in _values(model).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)


def test_tie_weights_ties_the_tables_and_rows_again():
    model = _adapted("rows under a head LoRA")
    want = _logits(model)
    rows_layer = model.lm_head.base_layer
    table, rows = model.model.embed_tokens.base_layer.weight, model.model.embed_tokens.trainable_tokens_delta["default"]
    rows_layer.base_layer.weight = nn.Parameter(table.detach().clone())  # ties broken (a device move, assign=True)
    rows_layer.trainable_tokens_delta["default"] = nn.Parameter(rows.detach().clone())
    model.tie_weights()
    assert rows_layer.base_layer.weight is table and rows_layer.trainable_tokens_delta["default"] is rows
    with torch.no_grad():
        kept = rows.clone()
        rows.add_(1.0)  # the trained rows reach the head again
        torch.testing.assert_close(model.lm_head.base_layer(torch.eye(32))[:, [3, 5]], rows.T)
        rows.copy_(kept)
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)


def test_t5_rows_survive_tie_weights_and_save_pretrained(tmp_path):
    model = randomise_trainable(inject(make_tiny_t5(), LoRAConfig(r=4, target_modules=["q"],
                                                                  trainable_token_indices=[3, 5])), scale=1.0)
    want = _logits(model)
    model.tie_weights()
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)
    model.save_pretrained(tmp_path)


@pytest.mark.parametrize("case", ["rows", "rows under a head LoRA", "head LoRA"])
def test_save_pretrained_of_the_adapted_model_round_trips(case, tmp_path):
    # the Trainer's checkpoint of a plain transformers model: save_pretrained, then load_state_dict on resume
    model = _adapted(case)
    want = _logits(model)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    fresh = inject(make_tied_llama(), LoRAConfig(r=4, **CASES[case]))
    missing = fresh.load_state_dict(state, strict=False).missing_keys
    assert all(k in fresh.all_tied_weights_keys for k in missing), missing
    torch.testing.assert_close(_logits(fresh), want, rtol=0, atol=0)


def test_merged_and_unloaded_model_saves_and_loads_with_its_own_maps(tmp_path):
    model = _adapted("rows")
    want = _logits(model)
    merge_and_unload(model)
    assert "_tied_weights_keys" not in model.__dict__ and model.all_tied_weights_keys == {
        "lm_head.weight": "model.embed_tokens.weight"}
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert back.lm_head.weight is back.model.embed_tokens.weight
    torch.testing.assert_close(_logits(back), want, rtol=1e-5, atol=1e-5)


def test_loaded_and_deleted_adapters_keep_the_maps_in_step(tmp_path):
    model = _adapted("rows under a head LoRA")
    want = _logits(model)
    save_adapter(model, tmp_path)
    loaded = load_adapter(make_tied_llama(), tmp_path)
    loaded.tie_weights()
    torch.testing.assert_close(_logits(loaded), want, rtol=0, atol=0)

    inject(loaded, LoRAConfig(r=2, target_modules=["lm_head"]), adapter_name="other")
    set_adapter(loaded, ["default", "other"])
    loaded.tie_weights()
    delete_adapter(loaded, "other")
    delete_adapter(loaded, "default")
    assert type(loaded.lm_head) is nn.Linear and "_tied_weights_keys" not in loaded.__dict__
    loaded.tie_weights()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(_logits(loaded), _logits(make_tied_llama()), rtol=0, atol=0)
