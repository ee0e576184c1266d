"""Which modules a ``modules_to_save`` entry names: the module of that name, or one whose dotted name ends with
``"." + entry`` (PEFT 0.22's rule; up to 0.21 PEFT took any suffix, so ``"norm"`` also wrapped every
``input_layernorm``). Files written under the old rule still load, their extra copies included."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama_classifier, randomise_trainable

from alignlab.adapters import LoRAConfig, adapter_configs, inject, load_adapter, save_adapter
from alignlab.adapters.config import saved_module_matches


def test_an_entry_names_whole_modules():
    assert saved_module_matches(["norm"], "model.norm") and saved_module_matches(["norm"], "norm")
    assert not saved_module_matches(["norm"], "model.layers.0.input_layernorm")
    assert saved_module_matches(["model.layers.0.input_layernorm"], "model.layers.0.input_layernorm")
    assert not saved_module_matches(["layers.0.input_layernorm"], "model.layers.10.input_layernorm")


def _wrapped(model):
    return sorted(n.removeprefix("base_model.model.").removesuffix(".modules_to_save")
                  for n, _ in model.named_modules() if n.endswith(".modules_to_save"))


def test_norm_wraps_what_peft_0_22_wraps():
    peft = pytest.importorskip("peft")
    from packaging.version import Version

    ours = inject(make_tiny_llama_classifier(), LoRAConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS",
                                                          modules_to_save=["norm"]))
    assert _wrapped(ours) == ["model.norm", "score"]
    if Version(peft.__version__) < Version("0.22"):
        pytest.skip(f"PEFT {peft.__version__} wraps every module whose name ends with 'norm' (its rule until 0.22)")
    theirs = peft.get_peft_model(make_tiny_llama_classifier(), peft.LoraConfig(
        r=4, target_modules=["q_proj"], task_type="SEQ_CLS", modules_to_save=["norm"]))
    assert _wrapped(theirs) == _wrapped(ours)


def test_a_file_written_under_the_suffix_rule_loads_its_extra_copies(tmp_path):
    """A PEFT <= 0.21 file with modules_to_save=["norm"] holds copies of every *_layernorm too: load_adapter wraps
    those modules (by their full names) and loads the copies, as the file was trained."""
    model = inject(make_tiny_llama_classifier(), LoRAConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS",
                                                           modules_to_save=["norm"]))
    randomise_trainable(model, seed=3)
    save_adapter(model, tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    g = torch.Generator().manual_seed(4)
    extra = {}
    for i in range(2):  # what the suffix rule also saved (PEFT's file keys)
        for ln in ("input_layernorm", "post_attention_layernorm"):
            key = f"base_model.model.model.layers.{i}.{ln}.weight"
            extra[key] = torch.randn(32, generator=g)
    save_file({**state, **extra}, tmp_path / "adapter_model.safetensors")
    loaded = load_adapter(make_tiny_llama_classifier(), tmp_path)
    names = adapter_configs(loaded)["default"].modules_to_save
    assert names[0] == "norm" and "model.layers.1.post_attention_layernorm" in names
    assert "model.layers.0.input_layernorm" in _wrapped(loaded) and "model.norm" in _wrapped(loaded)
    got = loaded.model.layers[1].post_attention_layernorm.modules_to_save["default"].weight
    torch.testing.assert_close(got, extra["base_model.model.model.layers.1.post_attention_layernorm.weight"])
