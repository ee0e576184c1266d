"""torch.func.grad / jacrev through an NF4Linear (its autograd Function has a separate setup_context, which
functorch transforms require), against the dense dequantized weight."""

import pytest
import torch
from torch import nn
from torch.func import grad, jacrev

from alignlab.quant import NF4Linear


def test_func_grad_and_jacrev_match_the_dense_formula():
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(16, 8), compute_dtype=torch.float32)
    w = layer.dequantize(torch.float32)
    x = torch.randn(4, 16)
    g = grad(lambda v: layer(v).pow(2).sum())(x)  # raised: the Function must override setup_context
    torch.testing.assert_close(g, 2 * (x @ w.T + layer.bias) @ w)
    j = jacrev(layer)(x[0])
    torch.testing.assert_close(j, w)
    x.requires_grad_(True)
    layer(x).pow(2).sum().backward()  # ordinary autograd unchanged
    torch.testing.assert_close(x.grad, g)


def test_vmap_jacrev_and_grad_on_the_triton_path(triton_mode, kernel_device):
    """Under a torch.func transform nf4_matmul / nf4_matmul_t take the dequantized weight and plain ops: the kernels
    (small-M at 1-2 rows here, dequantize + GEMM above) cannot read a BatchedTensor, and vmap over the layer raised
    ``NotImplementedError: Cannot access storage of BatchedTensorImpl`` on the Triton path."""
    from torch.func import vmap

    from alignlab.kernels.nf4_matmul import nf4_matmul_t

    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(64, 32), blocksize=32, compute_dtype=torch.float32).to(kernel_device)
    w = layer.dequantize(torch.float32)
    for rows in (1, 2, 40):
        x = torch.randn(3, rows, 64, device=kernel_device)
        torch.testing.assert_close(vmap(layer)(x), x @ w.T + layer.bias, rtol=1e-5, atol=1e-5)
    x = torch.randn(64, device=kernel_device)
    torch.testing.assert_close(jacrev(layer)(x), w, rtol=1e-6, atol=1e-6)
    xs = torch.randn(5, 2, 64, device=kernel_device)  # per-sample gradients
    g = vmap(grad(lambda v: layer(v).pow(2).sum()))(xs)
    torch.testing.assert_close(g, 2 * (xs @ w.T + layer.bias) @ w, rtol=1e-5, atol=1e-5)
    dy = torch.randn(3, 2, 32, device=kernel_device)
    torch.testing.assert_close(vmap(lambda d: nf4_matmul_t(d, layer.quant_weight))(dy), dy @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_vmap_over_the_decode_path_cuda():
    """bf16 rows small enough for the decode launchers (no grad): under vmap the layer takes torch ops, not a kept
    launcher fed a BatchedTensor."""
    from torch.func import vmap

    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(256, 128), compute_dtype=torch.bfloat16).cuda()
    x = torch.randn(3, 1, 256, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):  # the second call would find a launcher kept by the first
        layer(x[0])
    w = layer.dequantize(torch.float32)
    want = x.float() @ w.T + layer.bias.float()
    torch.testing.assert_close(vmap(layer)(x).float(), want, rtol=2e-2, atol=2e-2)
