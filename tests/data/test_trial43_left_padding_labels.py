"""collate_padded with left padding: the first token of a sample is not scored from the pad before it."""

import pytest
import torch

from alignlab.data import collate_padded, collate_padding_free
from alignlab.data.sft import IGNORE_INDEX

EXAMPLES = [{"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9]},
            {"input_ids": [3, 4, 11], "labels": [3, 4, 11]}]


def _shifted_scored(batch):
    """The (row, position) of every label the usual shifted loss scores (logits[:, :-1] vs labels[:, 1:])."""
    return {(b, t + 1) for b, t in (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero().tolist()}


def test_left_padding_scores_the_tokens_right_padding_scores():
    right = collate_padded(EXAMPLES, 0)
    left = collate_padded(EXAMPLES, 0, padding_side="left")
    width = right["labels"].shape[1]
    # map each left-padded position back to its position within the sample
    lens = [len(e["input_ids"]) for e in EXAMPLES]
    left_in_sample = {(b, t - (width - lens[b])) for b, t in _shifted_scored(left)}
    assert left_in_sample == _shifted_scored(right)
    assert left["labels"][1, width - lens[1]] == IGNORE_INDEX  # predicted from a pad: not scored
    assert left["input_ids"][1, width - lens[1]] == 3  # the token itself stays


def test_left_padded_loss_equals_padding_free_on_a_tiny_llama():
    from conftest import make_tiny_llama

    model = make_tiny_llama(vocab_size=32)
    pf = collate_padding_free(EXAMPLES)
    with torch.no_grad():
        want = model(input_ids=pf["input_ids"], labels=pf["labels"], position_ids=pf["position_ids"],
                     use_cache=False).loss
        for side in ("right", "left"):
            got = model(**collate_padded(EXAMPLES, 0, padding_side=side)).loss
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=side)
