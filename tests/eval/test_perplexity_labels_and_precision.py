"""Perplexity / token losses: bool labels are no token ids (True read as id 1); a float64 model is scored in float64
(its logits were cast to float32 and each window summed in float32: 3e-8 off). A helper's finds."""

import pytest
import torch
from torch import nn

from alignlab.data.token_cleaning import token_losses
from alignlab.eval import negative_log_likelihood


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 10)

    def forward(self, input_ids, **kwargs):
        return self.emb(input_ids)


def test_bool_labels_are_refused():
    ids = torch.randint(2, 10, (2, 5))
    labels = torch.ones_like(ids, dtype=torch.bool)
    with pytest.raises(ValueError, match="labels"):
        negative_log_likelihood(TinyLM(), [{"input_ids": ids, "labels": labels}])
    with pytest.raises(ValueError, match="labels"):
        token_losses(TinyLM(), ids, labels)


class TinyLM64(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 32, dtype=torch.float64)

    def forward(self, input_ids, **kwargs):
        return self.emb(input_ids) * 7.3


def test_float64_model_nll_is_float64_exact():
    torch.manual_seed(0)
    model, ids = TinyLM64(), torch.randint(0, 32, (3, 50))
    with torch.no_grad():
        lp = torch.log_softmax(model(ids)[:, :-1], -1)
    oracle = -lp.gather(-1, ids[:, 1:, None]).sum().item()
    total, count = negative_log_likelihood(model, [ids])
    assert count == 3 * 49
    assert abs(total - oracle) <= 1e-12 * abs(oracle)
