"""token_losses on a packed row: a sample's first token is not scored from the previous sample's last."""

import math

import torch

from alignlab.data.token_cleaning import token_losses


def test_packed_row_with_unmasked_boundaries_equals_the_samples_alone():
    from conftest import make_tiny_llama

    model = make_tiny_llama(seed=0, vocab_size=32, hidden_size=32, num_layers=1)
    g = torch.Generator().manual_seed(4)
    samples = [torch.randint(0, 32, (n,), generator=g) for n in (5, 1, 4)]
    ids = torch.cat(samples)[None]
    pos = torch.cat([torch.arange(len(s)) for s in samples])[None]
    got = token_losses(model, ids, ids.clone(), position_ids=pos)  # labels = input_ids, boundaries not -100
    want = torch.cat([token_losses(model, s[None], s[None])[0] for s in samples])
    for t in (0, 5, 6):  # each sample's first token has no context inside its sample
        assert math.isnan(got[0, t].item())
    torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-5, equal_nan=True)
