"""Routing edge cases of the expert loop (ExpertLoRA on dense and NF4 experts, NF4Experts alone): an empty batch,
one token, every token on the same experts, top-k = E, against a plain-torch loop over tokens and slots; and
routing tensors that do not fit together, refused naming the argument."""

import copy

import pytest
import torch

from alignlab.adapters import ExpertLoRA
from alignlab.quant import NF4Experts

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.modeling_mixtral import MixtralExperts  # noqa: E402

E, H, I = 4, 32, 48


def _experts(seed=0):
    torch.manual_seed(seed)
    config = transformers.MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2)
    experts = MixtralExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.1)
        experts.down_proj.normal_(0, 0.1)
    return experts


def _lora(base, dora=False):
    layer = ExpertLoRA(base, {"gate_up_proj": 4, "down_proj": 4}, alpha=8.0, use_dora=dora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return layer


def _loop(layer: ExpertLoRA, x, idx, w):
    """y_t = Σ_slots w_{t,k} (W^d_e + s B^d_e A^d_e) (silu(g) ⊙ u),  [g; u] = (W^gu_e + s B^gu_e A^gu_e) x_t, in fp64."""
    weights = {}
    for p in ("gate_up_proj", "down_proj"):
        a, b = layer.factors("default", p)
        weights[p] = getattr(layer.base_layer, p).double() + layer.scaling["default"][p] * b.double() @ a.double()
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(H, dtype=torch.float64)
        for slot in range(idx.shape[1]):
            e = int(idx[t, slot])
            gate, up = (weights["gate_up_proj"][e] @ x[t].double()).chunk(2)
            y = y + w[t, slot].double() * (weights["down_proj"][e] @ (torch.nn.functional.silu(gate) * up))
        rows.append(y)
    return torch.stack(rows)


ROUTES = {
    "one_token": torch.tensor([[3, 1]]),
    "all_tokens_on_two_experts": torch.tensor([[2, 0]] * 5),  # experts 1 and 3 get no rows
    "top_k_is_num_experts": torch.tensor([[3, 0, 2, 1], [0, 1, 2, 3], [1, 3, 0, 2]]),
    "top_1_one_expert_has_one_row": torch.tensor([[0], [0], [3], [0]]),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_routing_edge_cases_equal_a_loop_over_tokens_and_slots(route):
    idx = ROUTES[route]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(idx.shape[0], H, generator=g, requires_grad=True)
    w = torch.rand(idx.shape, generator=g, requires_grad=True)
    layer = _lora(_experts())
    out = layer(x, idx, w)
    out.square().sum().backward()
    ours = [x.grad, w.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
    x.grad = w.grad = None
    layer.zero_grad()
    ref = _loop(layer, x, idx, w)
    ref.square().sum().backward()
    theirs = [x.grad, w.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
    torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.float(), rtol=1e-3, atol=1e-4 * float(b.abs().max()))


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("quantized", [False, True])
def test_an_empty_batch_gives_an_empty_output_and_zero_gradients(dora, quantized):
    """No tokens at all (a rank or micro-batch without MoE tokens): the reshape back to (tokens, k, H) had a
    -1 that zero rows cannot resolve, so ExpertLoRA raised RuntimeError where the plain block returns (0, H)."""
    base = _experts()
    if quantized:
        base = NF4Experts.from_experts(base, compute_dtype=torch.float32)
    layer = _lora(base, dora)
    x = torch.randn(0, H, requires_grad=True)
    out = layer(x, torch.zeros(0, 2, dtype=torch.long), torch.rand(0, 2))
    assert out.shape == (0, H) and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad.shape == (0, H)
    for p in layer.parameters():
        if p.requires_grad and p.grad is not None:
            assert not p.grad.any()


def _modules():
    base = _experts()
    quantized = NF4Experts.from_experts(copy.deepcopy(base), compute_dtype=torch.float32)
    return {"lora": _lora(copy.deepcopy(base)), "nf4": quantized, "qlora": _lora(copy.deepcopy(quantized))}


BAD = {  # (hidden_states, top_k_index, top_k_weights) -> error, message
    "index_1d": (lambda x, i, w: (x[:1], i[0], w[0]), ValueError, "top_k_index must be \\(tokens, k\\)"),
    "index_rows": (lambda x, i, w: (x[:5], i, w), ValueError, "top_k_index must be \\(tokens, k\\) with tokens = 5"),
    "weights_shape": (lambda x, i, w: (x, i, w[:, :1]), ValueError, "top_k_weights must have top_k_index's shape"),
    "hidden_3d": (lambda x, i, w: (x.view(2, 3, H), i.view(2, 3, 2), w.view(2, 3, 2)), ValueError, "hidden_states must be"),
    "hidden_width": (lambda x, i, w: (torch.randn(6, H + 1), i, w), ValueError, f"hidden_states must be \\(tokens, {H}\\)"),
    "hidden_int": (lambda x, i, w: (x.long(), i, w), TypeError, "hidden_states must be a floating-point"),
    "index_float": (lambda x, i, w: (x, i.float(), w), TypeError, "top_k_index must hold int64 or int32"),
    "index_uint8": (lambda x, i, w: (x, i.to(torch.uint8), w), TypeError, "top_k_index must hold int64 or int32"),
    "weights_int": (lambda x, i, w: (x, i, i), TypeError, "top_k_weights must be a floating-point"),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_routing_tensors_that_do_not_fit_are_refused_naming_the_argument(bad):
    """Before: a 1-D index gave ExpertLoRA an output of shape (k,) instead of (1, H); a float index was read by
    NF4Experts' bincount, a uint8 one would index as a mask; mismatched rows and widths were IndexErrors or
    matmul errors from deep in the loop."""
    x, idx, w = torch.randn(6, H), torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]]), torch.rand(6, 2)
    make, error, message = BAD[bad]
    for name, module in _modules().items():
        with pytest.raises(error, match=message):
            module(*make(x, idx, w))


@pytest.mark.parametrize("bad_id", [-1, -E - 1, E, E + 2])
def test_expert_ids_out_of_range_are_refused_on_cpu_naming_the_argument(bad_id):
    """Before: ExpertLoRA raised IndexError from its padded matmul or bias gather (or, with -1, could take the
    rows for another expert's); NF4Experts' bincount raised RuntimeError on a negative id. NF4Experts reads ids
    >= E as expert-parallel sentinels (routed nowhere), so only negative ids are refused there; ExpertLoRA
    refuses expert-parallel modules, so every id must name one of its experts."""
    x, idx, w = torch.randn(3, H), torch.tensor([[0, 1], [2, 3], [1, 0]]), torch.rand(3, 2)
    idx[1, 1] = bad_id
    for name, module in _modules().items():
        if name == "nf4" and bad_id >= E:
            torch.testing.assert_close(module(x, idx, w), module(x, idx, w * (idx < E)), rtol=0, atol=0)
            continue
        want = ">= 0" if name == "nf4" else f"in \\[0, {E}\\)"
        with pytest.raises(ValueError, match=f"top_k_index must hold expert ids {want}, got {bad_id}"):
            module(x, idx, w)
