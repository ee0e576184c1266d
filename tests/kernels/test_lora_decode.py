"""The decode-sized LoRA update kernel (alignlab.kernels.lora_decode) vs the formula in float64."""

import pytest
import torch

pytest.importorskip("triton")
from alignlab.kernels.lora_decode import lora_update_, lora_update_reference_  # noqa: E402


def _oracle(y, x, a, b, s):
    """y + s · (x Aᵀ) Bᵀ, written out in float64."""
    return y.double() + s * (x.double() @ a.double().T) @ b.double().T


def _case(M, N, K, R, dtype, fdtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(M, N, generator=g).to(dtype)
    x = torch.randn(M, K, generator=g).to(dtype)
    a = (torch.randn(R, K, generator=g) / K ** 0.5).to(fdtype)
    b = torch.randn(N, R, generator=g).to(fdtype)
    return y, x, a, b


# M = 1 / odd / 17 (next row tile) / 64 (the limit); N, K, r not multiples of the tiles
SHAPES = [(1, 37, 100, 7), (3, 130, 64, 16), (17, 65, 5, 1), (64, 64, 129, 33), (2, 1, 64, 64)]


@pytest.mark.parametrize("M,N,K,R", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_update_matches_formula(M, N, K, R, dtype, triton_mode):
    y, x, a, b = _case(M, N, K, R, dtype)
    want = _oracle(y, x, a, b, 1.75)
    got = lora_update_(y.clone(), x, a, b, 1.75)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert got.dtype == dtype and ((got.double() - want).norm() / want.norm()).item() < tol


def test_in_place_strided_rows_and_16bit_factors(triton_mode):
    """y and x as row slices of wider buffers (stride > width), fp16 factors; only y's rows change."""
    buf_y = torch.randn(4, 50)
    buf_x = torch.randn(4, 90)
    y, x = buf_y[:, 3:40], buf_x[:, 10:74]
    _, _, a, b = _case(4, 37, 64, 8, torch.float32, fdtype=torch.float16)
    want = _oracle(y, x, a, b, 0.5)
    before = buf_y.clone()
    out = lora_update_(y, x, a, b, 0.5)
    assert out.data_ptr() == y.data_ptr()
    assert ((y.double() - want).norm() / want.norm()).item() < 1e-5
    assert torch.equal(buf_y[:, :3], before[:, :3]) and torch.equal(buf_y[:, 40:], before[:, 40:])


def test_reference_and_fallbacks(torch_mode):
    """The reference (taken also above 64 rows or rank 64, and for fp64) is the formula; empty batches are a no-op."""
    for M, R, dtype in ((3, 7, torch.float32), (80, 4, torch.float32), (2, 70, torch.float32), (2, 4, torch.float64)):
        y, x, a, b = _case(M, 20, 30, R, dtype, fdtype=dtype)
        want = _oracle(y, x, a, b, 2.0)
        got = lora_update_(y.clone(), x, a, b, 2.0)
        assert ((got.double() - want).norm() / want.norm()).item() < (1e-12 if dtype == torch.float64 else 1e-5)
    y, x, a, b = _case(0, 20, 30, 4, torch.float32)
    assert lora_update_(y, x, a, b, 2.0).shape == (0, 20)
    y, x, a, b = _case(2, 20, 30, 4, torch.float32)
    assert torch.equal(lora_update_reference_(y.clone(), x, a, b, 0.0), y)


def test_bad_arguments():
    y, x, a, b = _case(2, 20, 30, 4, torch.float32)
    with pytest.raises(ValueError, match="shapes"):
        lora_update_(y, x, a.T.contiguous(), b, 1.0)
    with pytest.raises(ValueError, match="shapes"):
        lora_update_(y[:1], x, a, b, 1.0)
    with pytest.raises(TypeError, match="x must be"):
        lora_update_(y, x[0], a, b, 1.0)
    with pytest.raises(TypeError, match="scale"):
        lora_update_(y, x, a, b, True)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 5, 64])
def test_update_cuda_bf16_and_qlora_layer(M):
    """GPU: bf16 rows with fp32 factors vs the formula; a QLoRA layer (NF4 base, bf16) with decode_kernel on
    gives what its default path gives (the same base output plus the update, rounded once)."""
    from torch import nn

    from alignlab.adapters import LoRALinear
    from alignlab.quant import NF4Linear

    y, x, a, b = (t.cuda() for t in _case(M, 1000, 320, 16, torch.bfloat16))
    want = _oracle(y, x, a, b, 2.0)
    got = lora_update_(y.clone(), x, a, b, 2.0)
    assert ((got.double() - want).norm() / want.norm()).item() < 5e-3
    torch.manual_seed(0)
    layer = LoRALinear(NF4Linear.from_linear(nn.Linear(320, 1000, device="cuda", dtype=torch.bfloat16)), r=16,
                       alpha=32).eval()
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        xx = torch.randn(M, 320, device="cuda", dtype=torch.bfloat16)
        plain = layer(xx)
        layer.decode_kernel = True
        fast = layer(xx)
        ref = layer.base_layer(xx).double() + 2.0 * (xx.double() @ layer.lora_A["default"].weight.double().T) \
            @ layer.lora_B["default"].weight.double().T
    err_fast = ((fast.double() - ref).norm() / ref.norm()).item()
    err_plain = ((plain.double() - ref).norm() / ref.norm()).item()
    # the default path rounds x Aᵀ to bf16 (autocast semantics), the kernel keeps it in fp32: elementwise the two
    # differ by more than a bf16 step where the update cancels the base, so they are compared by their errors
    assert err_fast < 5e-3 and err_fast <= err_plain * 1.05 + 1e-4, (err_fast, err_plain)
    assert ((fast.double() - plain.double()).norm() / ref.norm()).item() < 1e-2
