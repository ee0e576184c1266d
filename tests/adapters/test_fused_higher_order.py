"""LoRA / DoRA layers under second derivatives (``create_graph=True``) and ``torch.func`` transforms.

The fused autograd functions saved detached casts of ``A``, ``B`` and the input, so a backward with
``create_graph=True`` gave gradients that were constants in them: a Hessian-vector product through an adapted model
came back finite and silently wrong (LoRA: 2.2 off on a scale of 3 on a tiny Llama in float64). ``torch.func.grad`` /
``vmap`` (per-sample gradients) raised ``RuntimeError`` (the functions have no ``setup_context``). The oracle is
the layer's formula written out here with plain differentiable ops, and PEFT on a tiny Llama.
"""

import copy

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama

from alignlab.adapters import LoRAConfig, LoRALinear, adapter_layers, inject
from alignlab.adapters.fused import dora_linear, lora_linear
from alignlab.quant.linear import NF4Linear, quantize_model


def _net(dora: bool, dtype=torch.float64, quant: bool = False, seed: int = 0):
    """Two adapted linears with a tanh between them, adapters randomised (B != 0, m != ‖W‖)."""
    torch.manual_seed(seed)
    lins = [nn.Linear(16, 12).to(dtype), nn.Linear(12, 10).to(dtype)]
    if quant:
        lins = [NF4Linear.from_linear(lin.float(), compute_dtype=torch.float32) for lin in lins]
    layers = [LoRALinear(lin, r=3, alpha=6, use_dora=dora) for lin in lins]
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.3)
    return nn.Sequential(layers[0], nn.Tanh(), layers[1])


def _formula_layer(layer: LoRALinear, x: torch.Tensor, params: dict) -> torch.Tensor:
    """The layer's output by plain float64 ops on ``params`` (DoRA's row norm a constant, as in the paper)."""
    base = layer.base_layer
    w = (base.dequantize(torch.float32) if isinstance(base, NF4Linear) else base.weight).double()
    a, b = params["a"].double(), params["b"].double()
    s = layer.scaling["default"]
    z = x @ w.T + s * (x @ a.T) @ b.T
    if "m" in params:
        norm = (w + s * b @ a).norm(dim=1).detach()
        z = z * (params["m"].double() / norm)
    return z + base.bias.double()


def _params(layer: LoRALinear) -> dict:
    out = {"a": layer.lora_A["default"].weight, "b": layer.lora_B["default"].weight}
    if layer.is_dora("default"):
        out["m"] = layer.lora_magnitude_vector["default"]
    return out


def _loss(y: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(y) ** 2).sum()


def _hvp(loss_fn, leaves: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vs = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in leaves]
    grads = torch.autograd.grad(loss_fn(), leaves, create_graph=True)
    dot = sum((gi * v).sum() for gi, v in zip(grads, vs))
    return [h.double() for h in torch.autograd.grad(dot, leaves)]


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("quant", [False, True])
def test_hessian_vector_product_matches_formula(dora, quant):
    """d/dθ (∇L · v) through two fused LoRA / DoRA layers (dense float64, or NF4 at fp32 compute) equals the
    same product through the written-out formula, for the factors, the magnitude and the input."""
    net = _net(dora, torch.float32 if quant else torch.float64, quant)
    dtype = torch.float32 if quant else torch.float64
    x = torch.randn(5, 16, dtype=dtype, generator=torch.Generator().manual_seed(2)).requires_grad_()
    p0, p1 = _params(net[0]), _params(net[2])
    leaves = [x, *p0.values(), *p1.values()]

    def ours():
        return _loss(net(x))

    def formula():
        h = torch.tanh(_formula_layer(net[0], x.double(), p0))
        return _loss(_formula_layer(net[2], h, p1))

    got, want = _hvp(ours, leaves), _hvp(formula, leaves)
    tol = dict(rtol=2e-4, atol=2e-4) if quant else dict(rtol=1e-9, atol=1e-9)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("dora", [False, True])
def test_hessian_vector_product_matches_peft_on_llama(dora):
    """The same Hessian-vector product over every adapter tensor of a tiny float64 Llama as PEFT's."""
    peft = pytest.importorskip("peft")
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    ours = make_tiny_llama().double()
    ours.set_attn_implementation("eager")  # sdpa on CPU has no double backward
    theirs = peft.get_peft_model(copy.deepcopy(ours), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                       use_dora=dora))
    inject(ours, LoRAConfig(r=4, alpha=8, target_modules="all-linear", use_dora=dora))
    mine = [p for p in ours.parameters() if p.requires_grad]
    peers = [p for p in theirs.parameters() if p.requires_grad]
    assert len(mine) == len(peers)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p, q in zip(mine, peers):
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
            q.copy_(p.reshape(q.shape))
    got = _hvp(lambda: ours(input_ids=ids, labels=ids).loss, mine)
    want = _hvp(lambda: theirs(input_ids=ids, labels=ids).loss, peers)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.reshape(b.shape), b, rtol=1e-9, atol=1e-10)


def test_first_order_unchanged_and_input_saved_once():
    """A plain backward still gives the formula's gradients, and forward saves the input once (the caller's
    tensor, not a second reference to it) in the common case of an input already in the compute dtype."""
    for dora in (False, True):
        net = _net(dora)
        layer = net[0]
        x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = layer(x)
        assert sum(t.numel() == x.numel() for t in saved) == 1
        params = _params(layer)
        gy = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, *params.values()], gy)
        want = torch.autograd.grad(_formula_layer(layer, x, params), [x, *params.values()], gy)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dora", [False, True])
def test_create_graph_refused_when_only_a_cast_copy_of_the_input_is_kept(dora):
    """An fp32 input to an NF4 layer computing in bf16 is kept as its bf16 copy only (memory): a second derivative
    through it raises instead of coming back wrong; ``exact_fp32`` (the plain path) gives one."""
    torch.manual_seed(0)
    layer = LoRALinear(NF4Linear.from_linear(nn.Linear(16, 12)), r=3, alpha=6, use_dora=dora)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    x = torch.randn(5, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="create_graph=True"):  # the backward that would build the graph
        torch.autograd.grad(_loss(layer(x)), x, create_graph=True)
    (g,) = torch.autograd.grad(_loss(layer(x)), x)  # a plain backward is unaffected
    layer.exact_fp32 = True
    (g,) = torch.autograd.grad(_loss(layer(x)), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    assert torch.isfinite(h).all() and h.abs().sum() > 0


@pytest.mark.parametrize("dora", [False, True])
def test_torch_func_per_sample_gradients(dora):
    """``vmap(grad(...))`` over ``functional_call`` (per-sample gradients) runs and equals a loop of backward calls;
    it raised 'must override the setup_context staticmethod' before."""
    from torch.func import functional_call, grad, vmap

    net = _net(dora, torch.float32)
    params = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}
    xs = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(5))

    def loss(p, x):
        return _loss(functional_call(net, p, (x,)))

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for i in range(xs.shape[0]):
        net.zero_grad()
        _loss(net(xs[i])).backward()
        for n, p in net.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(per_sample[n][i], p.grad, rtol=1e-5, atol=1e-5)


def test_torch_func_grad_over_nf4_base_and_the_fused_functions():
    """``torch.func.grad`` through a QLoRA layer, and through ``lora_linear`` / ``dora_linear`` called directly,
    equals autograd's gradient."""
    from torch.func import grad

    torch.manual_seed(0)
    x = torch.randn(6, 16)
    layer = LoRALinear(NF4Linear.from_linear(nn.Linear(16, 12), compute_dtype=torch.float32), r=3, alpha=6)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    got = grad(lambda a_: _loss(torch.func.functional_call(layer, {"lora_A.default.weight": a_}, (x,))))(a.detach())
    (want,) = torch.autograd.grad(_loss(layer(x)), a)
    torch.testing.assert_close(got, want)

    w, bias, m = torch.randn(12, 16), torch.randn(12), torch.rand(12) + 1
    for fn, extra in ((lora_linear, ()), (dora_linear, (m,))):
        got = grad(lambda a_: _loss(fn(x, w, bias, a_, b.detach(), 2.0, *extra)))(a.detach())
        a_leaf = a.detach().requires_grad_()
        (want,) = torch.autograd.grad(_loss(fn(x, w, bias, a_leaf, b.detach(), 2.0, *extra)), a_leaf)
        torch.testing.assert_close(got, want)


def test_qlora_model_hessian_vector_product_matches_dequantized_copy():
    """On a tiny QLoRA Llama (NF4 at fp32 compute) the Hessian-vector product over the adapters equals the one of
    the same model with the NF4 layers replaced by dense linears holding the dequantized weights."""
    model = make_tiny_llama()
    model.set_attn_implementation("eager")
    quantize_model(model, compute_dtype=torch.float32)
    inject(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    dense = copy.deepcopy(model)
    for _, layer in adapter_layers(dense):
        q = layer.base_layer
        lin = nn.Linear(q.in_features, q.out_features, bias=False)
        lin.weight = nn.Parameter(q.dequantize(torch.float32), requires_grad=False)
        layer.base_layer = lin
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    got = _hvp(lambda: model(input_ids=ids, labels=ids).loss, [p for p in model.parameters() if p.requires_grad])
    want = _hvp(lambda: dense(input_ids=ids, labels=ids).loss, [p for p in dense.parameters() if p.requires_grad])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
