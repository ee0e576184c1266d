"""A ``target_modules`` list entry that selects a module no adapter can wrap (a norm, a whole attention or MLP block)
was silently dropped as long as another entry matched a linear: ``["q_proj", "input_layernorm"]`` trained q_proj
alone. ``inject`` now raises ``ValueError`` naming the entry, the module and its type, as PEFT does."""

import pytest
import torch
from torch import nn

from alignlab.adapters import IA3Config, LoRAConfig, inject


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.q_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.norm(x)
        return self.q_proj(h) + self.v_proj(h)


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block())


@pytest.mark.parametrize("entry, kind", [("norm", "LayerNorm"), ("0", "Block")])
def test_list_entry_on_a_module_that_cannot_be_adapted_raises(entry, kind):
    model = tiny()
    with pytest.raises(ValueError, match=rf"target_modules.*{entry!r}.*{kind}"):
        inject(model, LoRAConfig(r=4, target_modules=["q_proj", entry]))
    assert isinstance(model[0].q_proj, nn.Linear) and type(model[0].q_proj) is nn.Linear  # nothing injected
    with pytest.raises(ValueError, match=rf"target_modules.*{entry!r}.*{kind}"):
        inject(tiny(), IA3Config(target_modules=["v_proj", entry], feedforward_modules=[]))


def test_excluded_or_linear_entries_still_work():
    model = inject(tiny(), LoRAConfig(r=4, target_modules=["q_proj", "norm"], exclude_modules=["norm"]))
    assert hasattr(model[0].q_proj, "lora_A") and isinstance(model[0].norm, nn.LayerNorm)
    # a second adapter on already adapted layers, and names absent from the model, are fine (PEFT files list
    # names for several architectures)
    inject(model, LoRAConfig(r=2, target_modules=["q_proj", "qkv_proj"]), adapter_name="second")
    assert set(model[1].q_proj.lora_A) == {"default", "second"}


@pytest.mark.parametrize("regex, name, kind", [(r".*\.(norm|q_proj)", "0.norm", "LayerNorm"), (r"0|.*\.q_proj", "0", "Block")])
def test_regex_matching_a_module_that_cannot_be_adapted_raises(regex, name, kind):
    # PEFT 0.21 raises for a regex string too ("Target module LayerNorm(...) is not supported"); alignlab skipped it
    model = tiny()
    with pytest.raises(ValueError, match=rf"target_modules.*{name!r}.*{kind}.*nn\.Linear"):
        inject(model, LoRAConfig(r=4, target_modules=regex))
    assert type(model[0].q_proj) is nn.Linear and not hasattr(model, "alignlab_adapter_configs")
    with pytest.raises(ValueError, match=rf"target_modules.*{name!r}.*{kind}"):
        inject(tiny(), IA3Config(target_modules=regex, feedforward_modules=[]))


def test_regex_excluded_or_inside_adapters_still_works():
    model = inject(tiny(), LoRAConfig(r=4, target_modules=r".*\.(norm|q_proj)", exclude_modules=r".*\.norm"))
    assert hasattr(model[0].q_proj, "lora_A") and isinstance(model[0].norm, nn.LayerNorm)
    # the regex also matches the wrapper's own modules (base_layer, lora_A, ...): those are not looked at
    inject(model, LoRAConfig(r=2, target_modules=r".*\.q_proj(\..*)?"), adapter_name="second")
    assert set(model[1].q_proj.lora_A) == {"default", "second"}
