"""Bad arguments to alignlab.context fail where they are given, naming the argument."""

import pytest
import torch
from torch import nn

from alignlab.context import RopeScaling, TokenSparse, apply_token_sparsity


@pytest.mark.parametrize("field", ["long_factor", "short_factor"])
def test_a_bare_number_as_longrope_factors_is_refused_by_name(field):
    # iterating the float raised "'float' object is not iterable", naming neither field
    kwargs = {"long_factor": [2.0] * 4, field: 3.0}
    with pytest.raises(TypeError, match=field):
        RopeScaling("longrope", 2.0, **kwargs)


def test_a_scorer_that_is_not_callable_is_refused_before_anything_is_wrapped():
    # accepted before, it failed at the first training forward with "'str' object is not callable"
    model = nn.Sequential()
    model.add_module("mlp", nn.Linear(4, 4))
    with pytest.raises(TypeError, match="scorer"):
        apply_token_sparsity(model, 0.5, scorer="norm")
    assert type(model.mlp) is nn.Linear
    with pytest.raises(TypeError, match="scorer"):
        TokenSparse(nn.Linear(4, 4), 0.5, scorer=torch.ones(3))
    wrapped = TokenSparse(nn.Linear(4, 4), 0.5, scorer=lambda h: h.sum(-1))  # a callable is fine
    assert wrapped.train()(torch.randn(1, 4, 4, requires_grad=True)).shape == (1, 4, 4)
