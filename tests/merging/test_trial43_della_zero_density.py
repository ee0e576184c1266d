"""DELLA with a density of 0 for a model (mergekit's della_magprune gives a zero task vector): the model drops
out of the merge instead of the recipe being refused."""

import torch

import alignlab.merging.methods as M


def _models(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(8, 16, generator=g)
    return base, [base + 0.1 * torch.randn(8, 16, generator=g) for _ in range(2)]


def test_density_zero_drops_the_model():
    base, ms = _models()
    for consensus in ("sum", None):
        got = M.della(base, ms, [0.7, 0.4], density=[0.5, 0.0], epsilon=0.1, consensus=consensus,
                      generator=torch.Generator().manual_seed(3))
        alone = M.della(base, ms[:1], [0.7], density=0.5, epsilon=0.1, consensus=consensus,
                        normalize=consensus is not None, generator=torch.Generator().manual_seed(3))
        if consensus is None:  # the linear form divides by every weight: 0.7 + 0.4
            alone = base + (alone - base) / 1.1
        torch.testing.assert_close(got, alone, rtol=1e-6, atol=1e-6)
    everything_dropped = M.della(base, ms, density=0.0, epsilon=0.1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(everything_dropped, base)
