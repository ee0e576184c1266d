"""Trainable token rows follow PEFT's tying rule: the model's input embedding shares its rows with every module over
its table, and nothing else is tied.

* transformers 5's T5 keeps ``encoder.embed_tokens`` / ``decoder.embed_tokens`` as modules of their own over
  ``shared.weight``, and they (not ``shared``) run in forward: rows on ``shared`` reached only the tied ``lm_head``, so
  the inputs kept the frozen rows (logits 2.5 off PEFT's, files both ways).
* a dict naming two tied modules (``{"embed_tokens": ids, "lm_head": ids}``) failed with "adapter 'default' already
  exists on this layer"; PEFT ties them (same ids) or trains each apart (other ids; refused with
  ``ensure_weight_tying``).
* rows on an embedding other than the input one (T5's ``encoder.embed_tokens``) were tied to the head, PEFT trains
  them alone (logits 3.3 off)."""

import pytest
import torch
import transformers

from conftest import make_tied_llama, make_tiny_t5, randomise_trainable

from alignlab.adapters import LoRAConfig, inject, load_adapter, save_adapter

peft = pytest.importorskip("peft")

IDS = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model):
    kw = {"decoder_input_ids": IDS[:, :5]} if isinstance(model.config, transformers.T5Config) else {}
    with torch.no_grad():
        return model(input_ids=IDS, **kw).logits


CASES = {
    "t5 ids": (make_tiny_t5, ["q"], [3, 5]),
    "t5 shared": (make_tiny_t5, ["q"], {"shared": [3, 5]}),
    "t5 encoder embedding only": (make_tiny_t5, ["q"], {"encoder.embed_tokens": [3, 5]}),
    "t5 both stack embeddings": (make_tiny_t5, ["q"], {"embed_tokens": [3, 5]}),
    "tied llama, head named too": (make_tied_llama, ["q_proj"], {"embed_tokens": [3, 5], "lm_head": [3, 5]}),
    "tied llama, head with other ids": (make_tied_llama, ["q_proj"], {"embed_tokens": [3, 5], "lm_head": [1, 7, 9]}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_token_rows_match_peft_both_ways(case, tmp_path):
    make, targets, spec = CASES[case]
    from packaging.version import Version

    if case.startswith("tied llama") and Version(peft.__version__) < Version("0.21"):
        pytest.skip(f"peft {peft.__version__} wraps a named tied head apart (its own rows in the file) or not at all")
    config = peft.LoraConfig(r=4, target_modules=targets, trainable_token_indices=spec)
    theirs = randomise_trainable(peft.get_peft_model(make(), config), scale=1.0).eval()
    theirs.save_pretrained(tmp_path / "peft")
    torch.testing.assert_close(_logits(load_adapter(make(), tmp_path / "peft")), _logits(theirs))

    ours = randomise_trainable(inject(make(), LoRAConfig(r=4, target_modules=targets, trainable_token_indices=spec)), scale=1.0)
    want = _logits(ours)
    save_adapter(ours, tmp_path / "ours")
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(make(), str(tmp_path / "ours"))), want)


def test_t5_rows_reach_the_encoder_and_decoder_inputs():
    model = inject(make_tiny_t5(), LoRAConfig(r=4, target_modules=["q"], trainable_token_indices=[3, 5]))
    rows = model.shared.trainable_tokens_delta["default"]
    for name in ("encoder.embed_tokens", "decoder.embed_tokens", "lm_head"):
        assert model.get_submodule(name).trainable_tokens_delta["default"] is rows
    with torch.no_grad():
        rows.add_(1.0)
    ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(model.encoder.embed_tokens(ids)[0, 0], rows[0])
    torch.testing.assert_close(model.decoder.embed_tokens(ids)[0, 2], rows[1])


def test_tied_modules_with_other_ids_are_refused_under_ensure_weight_tying():
    with pytest.raises(ValueError, match="ensure_weight_tying, but 'lm_head'.*same ids"):
        inject(make_tied_llama(), LoRAConfig(r=4, target_modules=["q_proj"], ensure_weight_tying=True,
                                         trainable_token_indices={"embed_tokens": [3, 5], "lm_head": [1, 7]}))
