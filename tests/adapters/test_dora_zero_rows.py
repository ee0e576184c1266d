"""DoRA over a base with an all-zero row (a pruned or padding row): ``‖W + s·B A‖`` is 0 there and
``m / ‖·‖`` was 0/0 (m starts at ``‖W‖`` = 0): the output row, every gradient through ``∂L/∂x`` and the
merged weight were NaN (as PEFT's are). The rule now: such a row has ``g = 0`` and gives the bias alone."""

import pytest
import torch
from torch import nn

from conftest import make_experts

from alignlab.adapters import LoRALinear
from alignlab.adapters.dora import dora_gain, dora_merged_weight, dora_unmerged_weight
from alignlab.quant import NF4Linear

ZERO = 2  # the zero row


def _layer(base_kind: str, dropout: float = 0.0) -> LoRALinear:
    torch.manual_seed(0)
    lin = nn.Linear(64, 6, bias=True)
    with torch.no_grad():
        lin.weight[ZERO] = 0
    if base_kind == "nf4":
        lin = NF4Linear.from_linear(lin, blocksize=32, compute_dtype=torch.float32)
    layer = LoRALinear(lin.requires_grad_(False), r=2, alpha=4, use_dora=True, dropout=dropout)
    with torch.no_grad():  # B non-zero except on the zero row: its W + sBA stays 0 (as training keeps it: g = 0)
        layer.lora_B["default"].weight.normal_(0, 0.3)
        layer.lora_B["default"].weight[ZERO] = 0
    return layer


def _oracle(x, w, bias, a, b, s, m):
    """float64: ``y = g ⊙ (x (W + sBA)ᵀ) + bias`` with ``g = m / ‖W + sBA‖`` (norm detached) and 0 on zero rows."""
    v = w.double() + s * b.double() @ a.double()
    norm = v.norm(dim=1).detach()
    inv = torch.where(norm > 0, 1 / norm.clamp_min(1e-300), torch.zeros_like(norm))
    return (m.double() * inv) * (x.double() @ v.T) + bias.double()


@pytest.mark.parametrize("base_kind", ["dense", "nf4"])
@pytest.mark.parametrize("path", ["fused", "plain"])
def test_zero_row_gives_the_bias_and_finite_gradients(kernel_mode, base_kind, path):
    layer = _layer(base_kind, dropout=0.1 if path == "plain" else 0.0)  # active dropout: the plain path
    if path == "plain":
        layer.lora_dropout["default"].p = 0.0  # still a Dropout module (plain path), but deterministic
    base = layer.base_layer
    w = base.quant_weight.dequantize(torch.float32) if base_kind == "nf4" else base.weight
    a, b, m = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"]
    assert m[ZERO] == 0
    x = torch.randn(2, 3, 64, requires_grad=True)
    y = layer(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    leaves = [x, a, b, m]
    grads = torch.autograd.grad(y, leaves, gy)
    refs = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = _oracle(refs[0], w, base.bias, refs[1], refs[2], layer.scaling["default"], refs[3])
    ref_grads = torch.autograd.grad(y_ref, refs, gy.double())
    torch.testing.assert_close(y[..., ZERO], base.bias[ZERO].expand(2, 3))
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_merge_and_unmerge_with_a_zero_row():
    layer = _layer("dense").eval()
    x = torch.randn(5, 64)
    before, w0 = layer(x), layer.base_layer.weight.detach().clone()
    layer.merge()
    assert torch.isfinite(layer.base_layer.weight).all() and (layer.base_layer.weight[ZERO] == 0).all()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)


def test_unmerge_refuses_rows_the_merge_zeroed_and_keeps_the_layer_merged():
    layer = _layer("dense").eval()
    with torch.no_grad():
        layer.lora_magnitude_vector["default"][0] = 0  # a non-zero row with m = 0: merged to 0, base row lost
    layer.merge()
    merged = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"rows \[0\] have magnitude 0"):
        layer.unmerge()
    assert layer.merged_adapters == ["default"] and torch.equal(layer.base_layer.weight, merged)


def test_gain_rule_and_its_gradient():
    m = torch.tensor([2.0, 0.0, 3.0], requires_grad=True)
    norm = torch.tensor([4.0, 0.0, 0.0])
    g = dora_gain(m, norm)
    assert g.tolist() == [0.5, 0.0, 0.0]
    (dm,) = torch.autograd.grad(g.sum(), [m])
    assert dm.tolist() == [0.25, 0.0, 0.0]  # no 0 * inf on the zero rows


def test_functional_merge_round_trip_with_zero_rows():
    torch.manual_seed(0)
    w = torch.randn(5, 16)
    w[1] = 0
    a, b = torch.randn(2, 16), torch.randn(5, 2)
    b[1] = 0
    m = w.norm(dim=1)
    merged, norm = dora_merged_weight(w, a, b, 0.5, m)
    assert torch.isfinite(merged).all() and norm[1] == 0
    torch.testing.assert_close(dora_unmerged_weight(merged, a, b, 0.5, m, norm), w, rtol=1e-5, atol=1e-5)


def test_expert_dora_with_a_zero_row():
    """ExpertLoRA's DoRA takes the same rule: an all-zero row of one expert (m = 0 there) gives no NaN, in the
    output, the gradients or a merge / unmerge round trip."""
    from alignlab.adapters import ExpertLoRA

    experts = make_experts(hidden=16, intermediate=12, std=0.2)
    with torch.no_grad():
        experts.down_proj[1, 5] = 0  # expert 1's output row 5 (down_proj is (E, hidden, intermediate))
    layer = ExpertLoRA(experts, {"down_proj": 2}, alpha=4.0, use_dora=True)
    assert layer.lora_magnitude_vector["default"]["down_proj"][1, 5] == 0
    x = torch.randn(6, 16, requires_grad=True)
    idx = torch.tensor([[0, 1], [1, 2], [2, 0], [1, 0], [1, 2], [0, 1]])
    w = torch.rand(6, 2)
    out = layer(x, idx, w)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    before = layer.base_layer.down_proj.detach().clone()
    layer.eval()
    with torch.no_grad():
        ref = layer(x, idx, w)
        layer.merge()
        assert torch.isfinite(layer.base_layer.down_proj).all()
        torch.testing.assert_close(layer(x, idx, w), ref, rtol=1e-4, atol=1e-5)
        layer.unmerge()
    torch.testing.assert_close(layer.base_layer.down_proj, before, rtol=0, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("base_kind", ["dense", "nf4"])
def test_unmerge_after_the_model_moved(base_kind):
    """The row norms a DoRA merge keeps for its unmerge are plain tensors that ``.to(device)`` does not move:
    merge on the CPU, move to the GPU, unmerge failed ("Tensor on device cpu is not on the expected device")."""
    layer = _layer(base_kind).eval()
    x = torch.randn(5, 64)
    before = layer(x)
    layer.merge()
    layer.cuda()
    layer.unmerge()
    torch.testing.assert_close(layer(x.cuda()).cpu(), before, rtol=2e-2 if base_kind == "nf4" else 1e-5, atol=2e-3)


@pytest.mark.cuda
def test_second_dora_merge_after_the_model_moved():
    """A quantized base keeps its packed weight from the first merge (a plain attribute, not moved by ``.cuda()``);
    a second DoRA merge takes its row norm on that weight: merge one adapter on the CPU, move to the GPU, merging
    another one mixed devices. The result matches the same merges done on the CPU."""
    layers = []
    for device in ("cpu", "cuda"):
        layer = _layer("nf4").eval()
        torch.manual_seed(1)
        layer.add_adapter("second", r=2, alpha=4, use_dora=True)
        with torch.no_grad():
            layer.lora_B["second"].weight.normal_(0, 0.3)
        layer.merge(["default"])
        layer.to(device)
        layer.merge(["second"])
        layers.append(layer)
    x = torch.randn(5, 64)
    torch.testing.assert_close(layers[1](x.cuda()).cpu(), layers[0](x), rtol=2e-2, atol=2e-3)
    layers[1].unmerge()
    layers[0].unmerge()
    torch.testing.assert_close(layers[1](x.cuda()).cpu(), layers[0](x), rtol=1e-4, atol=1e-5)
