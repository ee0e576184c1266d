"""ExpertLoRA's own arguments, used directly (inject passes checked values): each bad one is refused naming it,
where before it failed with torch's words or was ignored."""

import copy

import pytest
import torch

from conftest import make_experts

from alignlab.adapters import ExpertLoRA


@pytest.fixture(scope="module")
def experts():
    return make_experts(hidden=16, intermediate=24)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(dropout="0.1"), ValueError, "dropout must be a number in \\[0, 1\\), got '0.1'"),  # was: '<=' not supported
    (dict(dropout=None), ValueError, "dropout must be a number"),
    (dict(dropout=torch.tensor(0.1)), ValueError, "dropout must be a number"),  # was accepted
    (dict(adapter_dtype=torch.int8), TypeError, "adapter_dtype must be None or a floating-point"),  # was: requires_grad
    (dict(adapter_dtype="bfloat16"), TypeError, "adapter_dtype must be None or a floating-point"),  # was: empty()'s words
    (dict(alpha={"down_proj": 4.0, "down": 2.0}), ValueError, "alpha must name only parameters in ranks"),  # was ignored
], ids=["dropout_str", "dropout_none", "dropout_tensor", "dtype_int", "dtype_str", "alpha_misspelt_key"])
def test_bad_arguments_are_refused_naming_them(experts, kwargs, error, message):
    with pytest.raises(error, match=message):
        ExpertLoRA(copy.deepcopy(experts), {"down_proj": 2}, **kwargs)


def test_factors_and_delta_weight_of_a_parameter_the_adapter_does_not_adapt(experts):
    """Was AttributeError "'ParameterDict' object has no attribute 'gate_up_proj'"."""
    layer = ExpertLoRA(copy.deepcopy(experts), {"down_proj": 2})
    for call in (lambda: layer.factors("default", "gate_up_proj"), lambda: layer.delta_weight("default", "gate_up_proj")):
        with pytest.raises(ValueError, match="param must be one of the parameters adapter 'default' adapts"):
            call()
    with pytest.raises(ValueError, match="adapter 'other' not found"):  # was KeyError
        layer.factors("other", "down_proj")
    a, b = layer.factors("default", "down_proj")
    assert a.shape == (3, 2, 24) and b.shape == (3, 16, 2)
