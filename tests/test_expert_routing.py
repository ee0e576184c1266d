"""alignlab.expert_routing: argument checks of the routing shared by the dense and the quantized experts."""

import numpy as np
import pytest
import torch

from alignlab.expert_routing import ExpertGroups


def test_from_routing_counts_rows_per_expert():
    groups = ExpertGroups.from_routing(torch.tensor([[3, 0], [0, 2], [3, 3]]), np.int64(4))
    assert groups.offsets.tolist() == [2, 2, 3, 6]  # expert 1 gets no rows


@pytest.mark.parametrize("bad", [0, -2, True, 4.0, "4", None, torch.tensor(4)],
                         ids=["zero", "negative", "bool", "float", "str", "none", "tensor"])
def test_from_routing_refuses_a_num_experts_that_is_not_a_positive_int(bad):
    """True was read as one expert; 0 and 4.0 failed inside histc with its own words."""
    with pytest.raises(ValueError, match="num_experts must be a positive integer"):
        ExpertGroups.from_routing(torch.tensor([[0, 1]]), bad)
