"""Arguments of the wrong kind that failed inside torch or Python without naming the argument, where the
library's convention is a TypeError (an ArgumentTypeError where it was a ValueError before) naming it:

* ``dpo_loss`` / ``simpo_loss`` lengths that are no token counts (a str, a list holding None) raised torch's
  "new(): invalid data type 'str'" / RuntimeError "Could not infer dtype of NoneType" (``orpo_loss`` named them);
* ``fused_linear_orpo`` / ``fused_linear_cpo`` / ``fused_linear_simpo`` with list labels raised
  AttributeError "'bool' object has no attribute 'sum'" (``fused_linear_dpo`` / ``fused_linear_kto`` named them);
* ``packed_to_padded`` with list values: AttributeError "'list' object has no attribute 'dim'";
* ``sequence_kd_labels`` with ``prompt_lengths=None``: RuntimeError "Could not infer dtype of NoneType";
* ``dpo_loss(loss_weights=0.5)``: "object of type 'float' has no len()";
* ``count_tokens(5)``: "'int' object is not iterable".
"""

import pytest
import torch

from alignlab import ArgumentTypeError
from alignlab.losses import (
    count_tokens,
    dpo_loss,
    fused_linear_cpo,
    fused_linear_orpo,
    fused_linear_simpo,
    packed_to_padded,
    sequence_kd_labels,
    simpo_loss,
)

T = torch.randn(4, dtype=torch.float64)


@pytest.mark.parametrize("bad", ["ab", [1, None, 2, 3], object()])
def test_lengths_that_are_no_counts_are_named(bad):
    with pytest.raises(ArgumentTypeError, match="chosen_lengths"):
        dpo_loss(T, T, T, T, loss_type="ipo", chosen_lengths=bad, rejected_lengths=[1, 2, 3, 4])
    with pytest.raises(ArgumentTypeError, match="rejected_lengths"):
        simpo_loss(T, T, chosen_lengths=[1, 2, 3, 4], rejected_lengths=bad)


def test_lengths_as_sequences_still_work():
    want, _ = dpo_loss(T, T - 1, T, T, loss_type="ipo", chosen_lengths=torch.tensor([1, 2, 3, 4]),
                       rejected_lengths=torch.tensor([2, 2, 2, 2]))
    got, _ = dpo_loss(T, T - 1, T, T, loss_type="ipo", chosen_lengths=[1, 2, 3, 4], rejected_lengths=(2, 2, 2, 2))
    assert torch.equal(got, want)


@pytest.mark.parametrize("fn", [fused_linear_orpo, fused_linear_cpo, fused_linear_simpo])
def test_fused_reference_free_losses_name_list_labels(fn):
    hidden, weight = torch.randn(2, 3, 4), torch.randn(5, 4)
    with pytest.raises(TypeError, match="labels"):
        fn(hidden, weight, [[1, 2, 3], [1, 2, 3]])


def test_packed_to_padded_names_list_values():
    with pytest.raises(ArgumentTypeError, match="values"):
        packed_to_padded([1.0, 2.0], torch.tensor([0, 2]))


@pytest.mark.parametrize("bad", [None, "ab", object()])
def test_sequence_kd_labels_names_prompt_lengths(bad):
    with pytest.raises(ArgumentTypeError, match="prompt_lengths"):
        sequence_kd_labels(torch.tensor([[5, 6, 7], [5, 8, 3]]), bad)


@pytest.mark.parametrize("bad", [0.5, 2, "sigmoid"])
def test_dpo_loss_weights_that_are_no_sequence_are_named(bad):
    with pytest.raises(ArgumentTypeError, match="loss_weights"):
        dpo_loss(T, T, T, T, loss_weights=bad)


@pytest.mark.parametrize("bad", [5, None, 1.5])
def test_count_tokens_names_labels(bad):
    with pytest.raises(TypeError, match="labels"):
        count_tokens(bad)
    # a generator of tensors is still a valid sequence of micro-batches
    assert int(count_tokens(t for t in (torch.tensor([1, -100]), torch.tensor([2])))) == 2
