"""Review of the tied-weight maps that follow the adapter wrappers (``alignlab.adapters.tied_keys``).

transformers reads the names of ``_tied_weights_keys`` as regular expressions (``get_expanded_tied_weights_keys``
searches ``"^" + name`` over the parameters; ``save_pretrained`` searches them in the state dict), while
``all_tied_weights_keys`` holds literal parameter names. An adapter name may hold regex characters (``"a+b"``,
``"v(1)"``), so the trained rows' entries must match themselves as patterns. A model that ties nothing
(``tie_word_embeddings=False``) keeps its maps as they are: transformers ignores them there."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tied_llama, make_tiny_llama, randomise_trainable

from alignlab.adapters import LoRAConfig, delete_adapter, inject, merge, merge_and_unload, unmerge

transformers = pytest.importorskip("transformers")

IDS = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("name", ["a+b", "v(1)", "x[0]"])
def test_rows_under_an_adapter_name_with_regex_characters_tie_and_save(name, tmp_path):
    model = randomise_trainable(inject(make_tied_llama(), LoRAConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                                     trainable_token_indices=[3, 5]), name), scale=1.0)
    want = _logits(model)
    model.tie_weights()  # recomputes the map from _tied_weights_keys: ValueError before
    model.tie_weights(recompute_mapping=False)
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    rows = [k for k in load_file(tmp_path / "model.safetensors") if "trainable_tokens_delta" in k]
    assert rows == [f"model.embed_tokens.trainable_tokens_delta.{name}"]  # the head's share of them written once


def test_a_model_that_ties_nothing_keeps_its_maps():
    model = make_tiny_llama()
    assert not model.config.tie_word_embeddings
    before = {k: v for k, v in vars(model).items() if "tied" in k}
    inject(model, LoRAConfig(r=4, target_modules=["q_proj", "lm_head", "embed_tokens"]))
    assert {k: v for k, v in vars(model).items() if "tied" in k} == before
    delete_adapter(model, "default")
    assert {k: v for k, v in vars(model).items() if "tied" in k} == before


@pytest.mark.parametrize("how", ["merge", "merge_and_unload"])
def test_a_head_untied_by_a_merge_stays_untied_under_the_kept_map(how):
    # merging into the tied head gives it its own weight (config.tie_word_embeddings=False); tie_weights with the
    # kept map (init_weights(), a distributed checkpoint load) put the input table back over the merged head
    model = randomise_trainable(inject(make_tied_llama(), LoRAConfig(r=4, target_modules=["q_proj", "lm_head"])),
                                scale=1.0)
    want = _logits(model)
    with pytest.warns(UserWarning, match="tied"):
        (merge if how == "merge" else merge_and_unload)(model)
    assert not model.config.tie_word_embeddings
    model.tie_weights(recompute_mapping=False)
    # merged fp32 weights round otherwise than the adapter's two products (scale-1 factors here): 1.5e-5 apart at one
    # logit on an AMD EPYC's fp32 GEMMs; the input table back over the head would move them by O(1)
    torch.testing.assert_close(_logits(model), want, rtol=1e-4, atol=1e-4)
    if how == "merge":
        unmerge(model)
        delete_adapter(model, "default")
        model.tie_weights(recompute_mapping=False)
        torch.testing.assert_close(_logits(model), _logits(make_tied_llama()), rtol=1e-5, atol=1e-5)


def test_a_trained_saved_head_stays_in_place_under_the_kept_map():
    model = randomise_trainable(inject(make_tied_llama(), LoRAConfig(r=4, target_modules=["q_proj"],
                                                                     modules_to_save=["lm_head"])), scale=1.0)
    want = _logits(model)
    with pytest.warns(UserWarning, match="tie"):
        merge_and_unload(model)
    model.tie_weights(recompute_mapping=False)
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5)
