"""LoRA on T5's ``shared`` embedding trains nothing: transformers 5 keeps ``encoder.embed_tokens`` and
``decoder.embed_tokens`` as modules of their own over ``shared.weight``, and only they run in forward. PEFT builds the
same dead adapter (so files stay as they are); ``inject`` / ``load_adapter`` now say so with a ``RuntimeWarning``
instead of letting a run train an adapter that changes no output."""

import warnings

import pytest
import torch

from conftest import make_tiny_t5

from alignlab.adapters import LoRAConfig, inject

IDS = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))


def test_lora_on_t5_shared_warns_and_is_indeed_dead():
    with pytest.warns(RuntimeWarning, match=r"'shared': its table is also held by \['encoder.embed_tokens', "
                                            r"'decoder.embed_tokens'\]"):
        model = inject(make_tiny_t5(), LoRAConfig(r=4, target_modules=["shared"]))
    with torch.no_grad():
        model.shared.lora_embedding_A["default"].normal_()
        out = model(input_ids=IDS, decoder_input_ids=IDS[:, :4]).logits
    torch.testing.assert_close(out, make_tiny_t5()(input_ids=IDS, decoder_input_ids=IDS[:, :4]).logits.detach())


@pytest.mark.parametrize("targets", [["embed_tokens"], ["shared", "embed_tokens"]])
def test_lora_on_the_embeddings_that_run_does_not_warn(targets):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        inject(make_tiny_t5(), LoRAConfig(r=4, target_modules=targets))
