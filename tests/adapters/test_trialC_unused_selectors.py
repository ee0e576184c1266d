"""A typo in ``rank_pattern`` / ``alpha_pattern`` / ``exclude_modules`` was silently ignored: the adapter trained at
the default rank or alpha, or on the modules meant to be left out. ``inject`` (and so ``load_adapter``) now warns
with a ``RuntimeWarning`` naming the keys, as PEFT 0.21 does; keys that do match stay silent."""

import warnings

import pytest
import torch
from torch import nn

from alignlab.adapters import LoRAConfig, inject


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj, self.down_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.down_proj(self.q_proj(x) + self.v_proj(x))


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block())


@pytest.mark.parametrize("field, value, key", [
    ("rank_pattern", {"q_porj": 2}, "q_porj"),
    ("alpha_pattern", {"v_porj": 4.0}, "v_porj"),
    ("rank_pattern", {"down_proj": 2}, "down_proj"),  # a module that exists but is not adapted
])
def test_unmatched_pattern_key_warns(field, value, key):
    with pytest.warns(RuntimeWarning, match=rf"{field}.*{key}"):
        inject(tiny(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], **{field: value}))


def test_exclude_that_excludes_nothing_warns():
    with pytest.warns(RuntimeWarning, match=r"exclude_modules.*down_porj"):
        model = inject(tiny(), LoRAConfig(r=4, target_modules="all-linear", exclude_modules=["down_porj"]))
    assert hasattr(model[0].down_proj, "lora_A")  # nothing was excluded: the reason for the warning


def test_matching_selectors_stay_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = inject(tiny(), LoRAConfig(r=4, target_modules="all-linear", exclude_modules=["down_proj"],
                                          rank_pattern={r"0\.q_proj": 2}, alpha_pattern={"v_proj": 2.0}))
    assert model[0].q_proj.r["default"] == 2 and model[1].q_proj.r["default"] == 4
    assert not hasattr(model[0].down_proj, "lora_A")
