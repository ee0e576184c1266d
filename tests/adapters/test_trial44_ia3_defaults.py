"""IA3Config's default targets are Llama's names; on a model that lacks one (OPT's FFN output is fc2) inject
raised nothing and adapted keys and values only, without the paper's FFN vectors."""

import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters import IA3Config, IA3Linear, inject

transformers = pytest.importorskip("transformers")


def _tiny_opt():
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=4, word_embed_proj_dim=32)
    return transformers.OPTForCausalLM(config).eval()


def _adapted(model):
    return sorted({(n.split(".")[-1], m.feedforward) for n, m in model.named_modules() if isinstance(m, IA3Linear)})


def test_default_targets_missing_from_the_model_are_named():
    model = _tiny_opt()
    with pytest.raises(ValueError, match=r"has no \['down_proj'\]: pass target_modules="):
        inject(model, IA3Config())
    assert not _adapted(model)
    inject(model, IA3Config(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"]))
    assert _adapted(model) == [("fc2", True), ("k_proj", False), ("v_proj", False)]


def test_default_targets_on_llama_and_an_exclusion_still_work():
    assert _adapted(inject(make_tiny_llama(), IA3Config())) == [("down_proj", True), ("k_proj", False), ("v_proj", False)]
    model = inject(make_tiny_llama(), IA3Config(exclude_modules=["down_proj"]))
    assert _adapted(model) == [("k_proj", False), ("v_proj", False)]
