"""torch.func.grad / jacrev through an NF4Linear (its autograd Function has a separate setup_context, which
functorch transforms require), against the dense dequantized weight."""

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
