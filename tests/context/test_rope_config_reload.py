"""apply_rope_scaling on configs other than Llama's: the written config must save, and reload with the same RoPE.

Phi-3 keeps ``partial_rotary_factor`` in ``rope_parameters`` (its ``validate_rope`` reads it, so ``save_pretrained``
failed with a ``KeyError`` once it was dropped), takes only default / longrope, and carries a top-level
``original_max_position_embeddings`` that replaces the written one on reload. Mixtral declares ``head_dim=None``,
which transformers' yarn / dynamic / longrope read as the head dim (the saved model did not reload).
"""

import pytest
import torch

from alignlab.context import RopeScaling, apply_rope_scaling

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=16)


def _phi3():
    torch.manual_seed(0)
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(pad_token_id=0, eos_token_id=1, bos_token_id=1,
                                                                **COMMON)).eval()


def _mixtral():
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                                                      **COMMON)).eval()


def _reloaded_matches(model, tmp_path):
    model.save_pretrained(tmp_path)
    ref = type(model).from_pretrained(tmp_path).eval()
    for n in (10, 40):  # inside and beyond the window of 16 (8 for the longrope below)
        ids = torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(n))
        ref.model.rotary_emb = type(ref.model.rotary_emb)(ref.config)  # HF's length-dependent RoPE is stateful
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("original", [None, 8])
def test_phi3_longrope_saves_and_reloads_the_same_frequencies(original, tmp_path):
    model = _phi3()  # Phi3Config.original_max_position_embeddings is 4096: it would win on reload
    apply_rope_scaling(model, RopeScaling("longrope", 4.0, original_max_position_embeddings=original,
                                          long_factor=[1.0 + i for i in range(4)]))
    _reloaded_matches(model, tmp_path)


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
def test_phi3_refuses_rope_types_its_config_cannot_save_before_any_change(kind):
    model = _phi3()
    before = dict(model.config.rope_parameters)
    with pytest.raises(ValueError, match=f"rope_type='{kind}'"):
        apply_rope_scaling(model, RopeScaling(kind, 2.0))
    assert model.config.rope_parameters == before
    assert type(model.model.rotary_emb).__name__ == "Phi3RotaryEmbedding"


@pytest.mark.parametrize("scaling", [RopeScaling("yarn", 4.0), RopeScaling("dynamic", 2.0),
                                     RopeScaling("longrope", 4.0, long_factor=[2.0] * 4)], ids=lambda s: s.kind)
def test_mixtral_with_head_dim_none_saves_and_reloads(scaling, tmp_path):
    model = _mixtral()
    assert model.config.head_dim is None
    apply_rope_scaling(model, scaling)
    _reloaded_matches(model, tmp_path)
