"""benchmarks/adapter_epilogue.py: every form it times computes the LoRA product it stands for (checked on CPU
against the formula in float64; the timing itself needs a GPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/adapter_epilogue.py")


@pytest.mark.parametrize("n_tok, n_in, n_out", [(1, 40, 24), (7, 24, 40), (0, 16, 16)])
def test_forms_compute_the_lora_products(bench, n_tok, n_in, n_out):
    torch.manual_seed(0)
    r, s = 3, 1.5
    x, g = torch.randn(n_tok, n_in), torch.randn(n_tok, n_out)
    w, a, b = torch.randn(n_out, n_in), torch.randn(r, n_in), torch.randn(n_out, r)
    d = torch.float64
    y = x.to(d) @ w.to(d).T + s * (x.to(d) @ a.to(d).T) @ b.to(d).T
    dx = g.to(d) @ w.to(d) + s * (g.to(d) @ b.to(d)) @ a.to(d)
    fwd, bwd = bench.forward_forms(x, w, a, b, s, pads=(r, 8)), bench.backward_forms(g, w, a, b, s, pads=(r, 8))
    assert sorted(fwd) == sorted(bwd) == ["base", "concat3", "concat8", "epilogue"]
    for name in ("epilogue", "concat3", "concat8"):
        torch.testing.assert_close(fwd[name]().to(d), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bwd[name]().to(d), dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fwd["base"]().to(d), x.to(d) @ w.to(d).T, rtol=1e-5, atol=1e-5)


def test_dequant_forms_write_the_same_weight(bench, triton_mode):
    """The three dequantizations it times (fresh, into the widened buffer's columns, into its rows) give the same
    weight (interpreter on CPU)."""
    from alignlab.quant.nf4 import nf4_quantize

    t = nf4_quantize(torch.randn(6, 128, generator=torch.Generator().manual_seed(0)), blocksize=64)
    forms = bench.dequant_forms(t, torch.float32, 16)
    ref = forms["dequant"]()
    assert torch.equal(forms["dequant_cols"](), ref) and torch.equal(forms["dequant_rows"](), ref)
