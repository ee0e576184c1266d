"""Soft prompts on models whose task head calls the decoder stack directly: ``OPTForCausalLM`` and the BART family's
``…ForCausalLM`` run ``self.model.decoder(...)``, never ``self.model(...)``, so the pre-hook that sat on
``base_model`` never ran. Prompt and prefix tuning then did nothing at all, without a word: the logits were the frozen
base's, the prompt got no gradient, and a PEFT file loaded "fine" with the base model's outputs. The hook now sits on
the innermost module above the embedding whose forward takes ``inputs_embeds`` and ``attention_mask``."""

import pytest
import torch

from alignlab.adapters import PrefixTuningConfig, PromptTuningConfig, disabled, inject, load_adapter, save_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 7, [0, 0] + [1] * 5])


def _opt():
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                                    word_embed_proj_dim=32, max_position_embeddings=32)
    return transformers.OPTForCausalLM(config).eval()


def _bart():
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                                     max_position_embeddings=40)
    return transformers.BartForCausalLM(config).eval()


MODELS = {"opt": _opt, "bart": _bart}
OURS = {"prompt": lambda: PromptTuningConfig(num_virtual_tokens=3, seed=1),
        "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=3, seed=1)}
THEIRS = {"prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
          "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)}


def _run(model, labels=True):
    return model(input_ids=IDS, attention_mask=MASK, labels=IDS if labels else None)


@pytest.mark.parametrize("kind", list(OURS))
@pytest.mark.parametrize("arch", list(MODELS))
def test_soft_prompt_changes_the_output_and_trains(arch, kind):
    make = MODELS[arch]
    with torch.no_grad():
        plain = _run(make()).logits
    model = inject(make(), OURS[kind]())
    out = _run(model)
    n = 3 if kind == "prompt" else 0  # prompt tuning's logits hold the virtual positions first
    assert out.logits.shape == (2, 7 + n, 64)
    assert (out.logits[:, n:] - plain).abs().max() > 1e-3
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    with disabled(model), torch.no_grad():
        torch.testing.assert_close(_run(model).logits, plain, rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(OURS))
@pytest.mark.parametrize("arch", list(MODELS))
def test_peft_file_loads_with_peft_outputs_and_ours_loads_in_peft(arch, kind, tmp_path):
    make = MODELS[arch]
    theirs = peft.get_peft_model(make(), THEIRS[kind]())
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    theirs.eval()
    want = _run(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(make(), tmp_path / "peft")
    got = _run(ours)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)

    save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(make(), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(_run(again).logits, want.logits)


@pytest.mark.parametrize("kind", list(OURS))
def test_generate_matches_a_full_recompute_on_opt(kind):
    model = inject(_opt(), OURS[kind]())
    seq = IDS[:1]
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    generated = model.generate(input_ids=IDS[:1], attention_mask=torch.ones_like(IDS[:1]), max_new_tokens=4,
                               do_sample=False)
    assert generated.tolist() == seq.tolist()
