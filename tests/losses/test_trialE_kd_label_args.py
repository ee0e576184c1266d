"""Argument checks of sequence_kd_labels / sequence_kd_loss / count_tokens that used to pass silently:
ignore_index=1.5 was written into the long labels as 1 (every prompt and pad position a target of token 1) and
counted every label; a float pad id matched no token, so padding stayed a target; float prompt lengths were
truncated. A list of EOS ids (generation_config.eos_token_id of Llama 3) is taken: the first of any ends a row."""

import pytest
import torch

from alignlab.losses import count_tokens
from alignlab.losses.distill import sequence_kd_labels, sequence_kd_loss

SEQ = torch.tensor([[5, 6, 7, 2, 9, 0], [5, 8, 3, 7, 0, 0]])


@pytest.mark.parametrize("bad", [1.5, -100.0, "x", None, True])
def test_ignore_index_must_be_an_int(bad):
    with pytest.raises(TypeError, match="ignore_index"):
        sequence_kd_labels(SEQ, [2, 2], pad_token_id=0, ignore_index=bad)
    with pytest.raises(TypeError, match="ignore_index"):
        sequence_kd_loss(torch.randn(2, 6, 10), SEQ, ignore_index=bad)
    with pytest.raises(TypeError, match="ignore_index"):
        count_tokens(SEQ, ignore_index=bad)


@pytest.mark.parametrize("arg", ["pad_token_id", "eos_token_id"])
@pytest.mark.parametrize("bad", [1.5, -1, True, "0"])
def test_token_ids_must_be_non_negative_ints(arg, bad):
    with pytest.raises(ValueError, match=arg):
        sequence_kd_labels(SEQ, [2, 2], **{arg: bad})


def test_prompt_lengths_must_be_integers():
    with pytest.raises(ValueError, match="prompt_lengths"):
        sequence_kd_labels(SEQ, [2.5, 2.0])


def test_several_eos_ids_first_of_any_ends_the_row():
    labels = sequence_kd_labels(SEQ, [1, 1], pad_token_id=0, eos_token_id=[3, 2])
    want = torch.tensor([[-100, 6, 7, 2, -100, -100], [-100, 8, 3, -100, -100, -100]])
    assert torch.equal(labels, want)
    # one id in a list is the same as the id
    assert torch.equal(sequence_kd_labels(SEQ, [1, 1], pad_token_id=0, eos_token_id=[2]),
                       sequence_kd_labels(SEQ, [1, 1], pad_token_id=0, eos_token_id=2))
    # pad equal to one of the EOS ids: the first generated EOS stays a target
    labels = sequence_kd_labels(torch.tensor([[5, 6, 0, 0, 0]]), [1], pad_token_id=0, eos_token_id=[7, 0])
    assert torch.equal(labels, torch.tensor([[-100, 6, 0, -100, -100]]))
    with pytest.raises(ValueError, match="eos_token_id"):
        sequence_kd_labels(SEQ, [1, 1], eos_token_id=[])
