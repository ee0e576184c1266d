"""LoRA on T5's ``shared`` embedding trains nothing: transformers 5 keeps ``encoder.embed_tokens`` and
``decoder.embed_tokens`` as modules of their own over ``shared.weight``, and only they run in forward. PEFT builds the
same dead adapter (so files stay as they are); ``inject`` / ``load_adapter`` now say so with a ``RuntimeWarning``
instead of letting a run train an adapter that changes no output."""

import warnings

import pytest
import torch
import transformers

from alignlab.adapters import LoRAConfig, inject

IDS = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))


def _t5():
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config).eval()


def test_lora_on_t5_shared_warns_and_is_indeed_dead():
    with pytest.warns(RuntimeWarning, match=r"'shared': its table is also held by \['encoder.embed_tokens', "
                                            r"'decoder.embed_tokens'\]"):
        model = inject(_t5(), LoRAConfig(r=4, target_modules=["shared"]))
    with torch.no_grad():
        model.shared.lora_embedding_A["default"].normal_()
        out = model(input_ids=IDS, decoder_input_ids=IDS[:, :4]).logits
    torch.testing.assert_close(out, _t5()(input_ids=IDS, decoder_input_ids=IDS[:, :4]).logits.detach())


@pytest.mark.parametrize("targets", [["embed_tokens"], ["shared", "embed_tokens"]])
def test_lora_on_the_embeddings_that_run_does_not_warn(targets):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        inject(_t5(), LoRAConfig(r=4, target_modules=targets))
