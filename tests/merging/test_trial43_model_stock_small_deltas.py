"""model_stock: the cosine between task vectors does not depend on their scale (small deltas, filter-wise rows)."""

import pytest
import torch

import alignlab.merging.methods as M


def _oracle(base, models, filter_wise):
    """The paper's formula in float64: t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine."""
    b = base.double()
    rows = (lambda t: t.double().reshape(-1, t.shape[-1])) if filter_wise else (lambda t: t.double().reshape(1, -1))
    ds = [rows(m) - rows(base) for m in models]
    cos = [torch.nn.functional.cosine_similarity(ds[i], ds[j], dim=-1, eps=1e-300)
           for i in range(len(ds)) for j in range(i + 1, len(ds))]
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    n = len(models)
    t = n * c / (1 + (n - 1) * c)
    avg = sum(rows(m) for m in models) / n
    return (t * avg + (1 - t) * rows(base)).reshape(b.shape)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("scale", [1e-2, 3e-5])  # 3e-5: norm products below 1e-6
def test_small_task_vectors_keep_their_cosine(filter_wise, scale):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 40, generator=g) * 0.02
    shared = torch.randn(6, 40, generator=g)
    models = [base + scale * (shared + 0.7 * torch.randn(6, 40, generator=g)) for _ in range(3)]
    got = M.model_stock(base, models, filter_wise=filter_wise)
    want = _oracle(base, models, filter_wise)
    # relative to the size of the task vectors, which is what the merge moves
    err = (got.double() - want).abs().max() / (want - base.double()).abs().max()
    assert err < 1e-3, float(err)  # float32 arithmetic on weights ~0.02: ulp 2e-9 against deltas of 3e-5
