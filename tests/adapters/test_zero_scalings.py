"""Settings that leave an adapter a no-op no gradient can move are refused by name (they were accepted silently).

VeRA: ``b`` starts at 0, so with ``d_initial = 0`` both ``∂L/∂b = gy ⊙ B Λ_d A x`` and ``∂L/∂d = Bᵀ Λ_b gy ⊙ A x`` are
0 and stay 0. A bottleneck adapter or an AdaLoRA layer multiplies its whole output by ``scaling``: with 0, every
gradient of its weights is 0 too. A negative value is a sign like any other and still trains.
"""

import pytest
import torch
from torch import nn

from alignlab.adapters import AdaLoRALinear, BottleneckConfig, BottleneckLayer, VeRAConfig, VeRALinear, VeRAProjections

REFUSED = {
    "vera_config": (lambda: VeRAConfig(r=4, d_initial=0.0), "d_initial must be non-zero"),
    "vera_layer": (lambda: VeRALinear(nn.Linear(16, 12), VeRAProjections(4, 16, 12, 0), r=4, d_initial=0), "d_initial"),
    "vera_peft_file": (lambda: VeRAConfig.from_peft({"peft_type": "VERA", "r": 4, "target_modules": ["q"],
                                                     "d_initial": 0.0}), "d_initial must be non-zero"),
    "bottleneck_config": (lambda: BottleneckConfig(scaling=0), "scaling must be non-zero"),
    "bottleneck_layer": (lambda: BottleneckLayer(nn.Linear(16, 16), hidden=16, bottleneck=4, scaling=0.0), "scaling"),
    "adalora_layer": (lambda: AdaLoRALinear(nn.Linear(16, 12), r=3, scaling=0.0), "scaling must be non-zero"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_zero_that_freezes_the_adapter_is_refused(case):
    build, message = REFUSED[case]
    with pytest.raises(ValueError, match=message):
        build()


def test_negative_values_still_train():
    """The refusal is of 0 alone: a negative ``d_initial`` or ``scaling`` gives gradients."""
    x = torch.randn(3, 16)
    vera = VeRALinear(nn.Linear(16, 12), VeRAProjections(4, 16, 12, 0), r=4, d_initial=-0.1)
    vera(x).square().sum().backward()
    assert vera.vera_lambda_b["default"].grad.abs().sum() > 0
    bottleneck = BottleneckLayer(nn.Linear(16, 16), hidden=16, bottleneck=4, scaling=-2.0)
    bottleneck(x).square().sum().backward()
    assert bottleneck.adapter_up["default"].weight.grad.abs().sum() > 0
