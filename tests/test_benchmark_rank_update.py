"""benchmarks/rank_update.py: both forms it times add the rank-r product into ``y`` in place (checked on CPU, the
kernel under the interpreter, against the formula in float64; the timing itself needs a GPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import load_script


@pytest.mark.parametrize("transposed", [False, True], ids=["d", "B_T"])
def test_forms_add_the_rank_product_in_place(transposed, triton_mode):
    bench = load_script("benchmarks/rank_update.py")
    torch.manual_seed(0)
    M, N, R = 19, 40, 5
    c = torch.randn(M, R)
    d = torch.randn(N, R).T if transposed else torch.randn(R, N)
    for name in ("addmm_", "rank_update_"):
        y = torch.randn(M, N)
        want = y.double() + c.double() @ d.double()
        bench.forms(y, c, d)[name]()
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5, msg=name)


def test_the_error_check_sees_a_wrong_update(triton_mode, monkeypatch):
    """The benchmark's correctness column measures the added product: near 0 for the kernel, 1 for an update that
    adds nothing."""
    bench = load_script("benchmarks/rank_update.py")
    torch.manual_seed(0)
    y, c, d = torch.randn(19, 40), torch.randn(19, 5), torch.randn(5, 40)
    assert bench._error(y, c, d) < 1e-5
    monkeypatch.setattr(bench, "rank_update_", lambda y, c, d, config=None: y)
    assert bench._error(y, c, d) == 1.0
