"""DoRA on float64 expert weights (the precision a gradient check or a reference run uses): the row norm was asked
for in fp32, which torch.linalg.vector_norm refuses for an fp64 input (RuntimeError at construction), and the
magnitude was cast to fp32 in the forward (3e-8 relative error). Checked against the block's own eager loop run on
the formed weight m_e ⊙ (W_e + s·B_e A_e)/‖·‖_row (norm detached), for outputs and gradients; the merge too."""

import copy

import pytest
import torch

from conftest import make_experts

from alignlab.adapters import ExpertLoRA


def _experts(kind):
    return make_experts(kind, hidden=16, intermediate=12, std=0.2).double()


def _formed(layer: ExpertLoRA):
    """The experts module with the DoRA weight formed per expert (differentiable in A, B, m)."""
    ref = copy.deepcopy(layer.base_layer)
    for p in ("gate_up_proj", "down_proj"):
        w = getattr(layer.base_layer, p).detach()
        w = w.transpose(1, 2) if ref.is_transposed else w
        a, b = layer.factors("default", p)
        upd = w + layer.scaling["default"][p] * b @ a
        upd = layer.lora_magnitude_vector["default"][p].unsqueeze(-1) * upd / upd.detach().norm(dim=2, keepdim=True)
        del ref._parameters[p]
        setattr(ref, p, upd.transpose(1, 2) if ref.is_transposed else upd)
    return lambda *args: type(ref).forward.__wrapped__(ref, *args)


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_dora_on_float64_experts_equals_the_formed_weight(kind):
    layer = ExpertLoRA(_experts(kind), {"gate_up_proj": 2, "down_proj": 2}, alpha=4.0, use_dora=True)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.float64}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable:
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.randn(5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0]])
    w = torch.rand(5, 2, generator=g, dtype=torch.float64, requires_grad=True)

    out = layer(x, idx, w)
    out.square().sum().backward()
    ours = [out.detach(), x.grad, w.grad] + [p.grad for p in trainable]
    x.grad = w.grad = None
    layer.zero_grad()
    ref = _formed(layer)(x, idx, w)
    ref.square().sum().backward()
    theirs = [ref.detach(), x.grad, w.grad] + [p.grad for p in trainable]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    with torch.no_grad():  # the fold runs in fp32 (dora_merged_weight), so fp32 agreement here
        layer.merge()
        torch.testing.assert_close(layer(x, idx, w), out.detach(), rtol=1e-5, atol=1e-6)
