"""Every alignlab Triton launch states its FMA-contraction option instead of leaving it to Triton's default.

Triton 3.9 warns at each compile that leaves ``enable_fp_fusion`` unset and 3.10 turns fusion off by default,
which would change the instruction mix and the rounding of every kernel from what was measured and tested. The
Triton interpreter drops launch options, so the test records what each launch passes to ``JITFunction.run``'s
interpreter counterpart, over one call of every kernel family.
"""

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from alignlab.kernels.distill import distill_rows  # noqa: E402
from alignlab.kernels.dora import column_dot, dora_norm_and_scales, magnitude_grad  # noqa: E402
from alignlab.kernels.linear_logprobs import chunk_softmax_grad_triton_  # noqa: E402
from alignlab.kernels.nf4_dequant import nf4_dequant  # noqa: E402
from alignlab.kernels import nf4_matmul as nf4_matmul_mod  # noqa: E402
from alignlab.kernels.nf4_matmul import nf4_matmul, nf4_matmul_t  # noqa: E402
from alignlab.optim import AdamW8bit  # noqa: E402
from alignlab.quant.nf4 import nf4_quantize  # noqa: E402


@pytest.fixture
def launches(monkeypatch, triton_mode):
    seen = []
    run = InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        seen.append((self.fn.__name__, kwargs.get("enable_fp_fusion")))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    return seen


def test_every_kernel_launch_sets_fp_fusion(launches, monkeypatch):
    monkeypatch.setattr(nf4_matmul_mod, "LARGE_M", 1 << 20)  # the tiled kernels too (off by default)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g)
    t = nf4_quantize(w, blocksize=32)
    for m in (1, 3, 40):  # the GEMV, the small-M tensor-core kernel, the tiled kernel
        nf4_matmul(torch.randn(m, 64, generator=g), t)
    nf4_matmul_t(torch.randn(5, 24, generator=g), t)
    nf4_dequant(t, torch.float32)

    a, b = torch.randn(4, 64, generator=g), torch.randn(24, 4, generator=g)
    dora_norm_and_scales(t, a, b, 0.5, torch.rand(24, generator=g) + 0.5, b, torch.float32)
    u, v = torch.randn(9, 24, generator=g), torch.randn(9, 24, generator=g)
    column_dot(u, v)
    magnitude_grad(u, v, None, torch.rand(24, generator=g) + 0.5)

    logits = torch.randn(6, 50, generator=g)
    chunk_softmax_grad_triton_(logits.clone(), torch.randint(0, 50, (6,), generator=g))
    distill_rows(torch.randn(6, 50, generator=g), torch.randn(6, 50, generator=g), "forward_kl")

    p = torch.nn.Parameter(torch.randn(300, generator=g))
    p.grad = torch.randn(300, generator=g)
    AdamW8bit([p], lr=1e-3, min_8bit_size=1).step()

    names = {name for name, _ in launches}
    assert {"_gemv_kernel", "_dot_kernel", "_fwd", "_bwd", "_nf4_dequant_kernel", "_row_norm_kernel",
            "_column_dot_kernel", "_magnitude_grad_kernel", "_chunk_softmax_grad_kernel", "_distill_rows_kernel",
            "_adamw8bit_kernel"} <= names, names  # each family above really launched its kernel
    unset = sorted({name for name, fusion in launches if fusion is None})
    assert not unset, f"launched without enable_fp_fusion: {unset}"
