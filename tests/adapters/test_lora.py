"""LoRALinear / DoRALinear against the papers' formulas written out here."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from alignlab.adapters import DoRALinear, LoRALinear, dora_weight_norm, lora_scaling


def _layer(in_f=12, out_f=10, bias=True, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    return LoRALinear(base, **kw)


def _randomise(layer, name="default", seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_A[name].weight, layer.lora_B[name].weight):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
    return layer


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_is_base_plus_scaled_low_rank(use_rslora):
    layer = _randomise(_layer(r=3, alpha=6.0, use_rslora=use_rslora))
    x = torch.randn(4, 5, 12)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    a, bb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = 6.0 / math.sqrt(3) if use_rslora else 6.0 / 3
    expected = x @ w.T + b + s * (x @ a.T @ bb.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.scaling["default"] == pytest.approx(s)
    assert lora_scaling(3, 6.0, use_rslora) == pytest.approx(s)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_zero_b_inits_start_at_the_base(init):
    layer = _layer(r=4, alpha=8, init=init)
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert torch.count_nonzero(layer.lora_A["default"].weight) > 0


def test_gaussian_init_std_is_one_over_r():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(4000, 4), r=8, alpha=8, init="gaussian")
    assert layer.lora_A["default"].weight.std().item() == pytest.approx(1 / 8, rel=0.05)


def test_pissa_keeps_the_principal_part_in_the_adapter():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, r=3, alpha=6, init="pissa")
    s = layer.scaling["default"]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    u, sv, vh = torch.linalg.svd(w0.double())
    principal = (u[:, :3] * sv[:3]) @ vh[:3]
    torch.testing.assert_close((s * b @ a).double(), principal, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight.double(), w0.double() - principal, rtol=1e-4, atol=1e-5)
    # A and B share the singular values evenly: B = U √(S/s), A = √(S/s) Vᵀ
    torch.testing.assert_close(b.norm(dim=0), a.norm(dim=1), rtol=1e-4, atol=1e-5)
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), x @ w0.T + base.bias, rtol=1e-4, atol=1e-5)


def test_pissa_niter_is_close_to_exact_svd():
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, r=4, alpha=4, init="pissa_niter_8")
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), x @ w0.T + base.bias, rtol=1e-4, atol=1e-4)


def test_pissa_niter_residual_is_rebuilt_the_same_on_load(tmp_path):
    """A PiSSA file is loaded by re-running the init on the original base (as PEFT does), so the residual must come
    out as in training: the randomized SVD of ``pissa_niter_K`` drew from the global RNG, and a saved and reloaded
    adapter's logits were 4.4e-2 off the trained model's (tiny Llama)."""
    from conftest import make_tiny_llama

    from alignlab.adapters import LoRAConfig, inject, load_adapter, save_adapter

    base = make_tiny_llama()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    model = inject(make_tiny_llama(), LoRAConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj"], init="pissa_niter_2"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    save_adapter(model, tmp_path)
    torch.randn(3)  # the global RNG is elsewhere now, as in another process
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(base, tmp_path)(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_olora_uses_qr_factors():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, r=3, alpha=3, init="olora")
    b = layer.lora_B["default"].weight
    torch.testing.assert_close(b.T @ b, torch.eye(3), rtol=1e-5, atol=1e-5)  # orthonormal columns
    a = layer.lora_A["default"].weight
    assert torch.allclose(a.tril(-1)[:, :3], torch.zeros(3, 3), atol=1e-6)  # R is upper triangular
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), x @ w0.T + base.bias, rtol=1e-4, atol=1e-5)


def test_gradcheck_lora_float64():
    layer = _randomise(_layer(6, 5, dtype=torch.float64, r=2, alpha=3.0), seed=3)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)

    torch.autograd.gradcheck(lambda x: layer(x), (x,))
    # the module's gradient w.r.t. its own factors equals the autograd gradient of the formula
    x2 = torch.randn(3, 6, dtype=torch.float64)
    layer(x2).square().sum().backward()
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    (layer.base_layer(x2) + layer.scaling["default"] * (x2 @ a_ref.T @ b_ref.T)).square().sum().backward()
    torch.testing.assert_close(a.grad, a_ref.grad)
    torch.testing.assert_close(b.grad, b_ref.grad)


def _dora(in_f=12, out_f=10, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = DoRALinear(nn.Linear(in_f, out_f, dtype=dtype), r=3, alpha=6)
    _randomise(layer, seed=seed + 1)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].mul_(1 + 0.1 * torch.randn(out_f))
    return layer


def test_dora_forward_is_paper_formula():
    layer = _dora()
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m, s = layer.lora_magnitude_vector["default"], layer.scaling["default"]
    v = w + s * b @ a
    w_adapted = m[:, None] * v / v.norm(dim=1, keepdim=True)
    x = torch.randn(4, 3, 12)
    torch.testing.assert_close(layer(x), x @ w_adapted.T + bias, rtol=1e-5, atol=1e-5)


def test_dora_gradient_treats_norm_as_constant():
    layer = _dora(seed=4)
    x = torch.randn(7, 12)
    layer(x).sin().sum().backward()
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    m = layer.lora_magnitude_vector["default"].detach().clone().requires_grad_()
    s = layer.scaling["default"]
    v = w + s * b @ a
    y = x @ (m[:, None] * v / v.norm(dim=1, keepdim=True).detach()).T + bias
    y.sin().sum().backward()
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, a.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, b.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].grad, m.grad, rtol=1e-4, atol=1e-5)


def test_dora_magnitude_starts_at_row_norms_and_output_at_base():
    torch.manual_seed(0)
    base = nn.Linear(9, 7)
    layer = DoRALinear(base, r=2, alpha=2)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"], base.weight.norm(dim=1))
    x = torch.randn(3, 9)
    torch.testing.assert_close(layer(x), base(x))


def test_dora_weight_norm_matches_dense_norm_without_forming_it():
    torch.manual_seed(0)
    w, a, b = torch.randn(33, 17, dtype=torch.float64), torch.randn(5, 17, dtype=torch.float64), torch.randn(33, 5, dtype=torch.float64)
    dense = (w + 0.7 * b @ a).norm(dim=1)
    torch.testing.assert_close(dora_weight_norm(w, a, b, 0.7).double(), dense, rtol=1e-5, atol=1e-5)


def test_dora_dropout_in_training_uses_dropped_input_for_base_term():
    layer = _dora(seed=2)
    layer.lora_dropout["default"] = nn.Dropout(0.5)
    layer.train()
    x = torch.randn(6, 12)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    xd = layer.lora_dropout["default"](x)
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m, s = layer.lora_magnitude_vector["default"], layer.scaling["default"]
    g = m / (w + s * b @ a).norm(dim=1)
    expected = (x @ w.T + bias) + (g - 1) * (xd @ w.T) + g * s * (xd @ a.T @ b.T)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_unmerge_fp32(dora):
    layer = _dora() if dora else _randomise(_layer(r=3, alpha=6))
    x = torch.randn(5, 12)
    w0 = layer.base_layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer.base_layer(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)  # merged adapter is not added twice
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="nothing to unmerge"):
        layer.unmerge()


@pytest.mark.parametrize("first_dora", [False, True])
@pytest.mark.parametrize("one_call", [True, False])
def test_merging_dora_after_another_adapter_keeps_the_forward(first_dora, one_call):
    # Two active adapters on one layer, the second DoRA. Forward takes DoRA's row norm from the
    # unmerged base, ‖W + s·B₂A₂‖, so the merge must too, not from W + ΔW₁ with the first one folded in.
    layer = _randomise(_layer(r=3, alpha=6, use_dora=first_dora))
    layer.add_adapter("b", r=2, alpha=3, use_dora=True)
    _randomise(layer, "b", seed=2)
    with torch.no_grad():
        layer.lora_magnitude_vector["b"].mul_(1.5)
    layer.active_adapters = ["default", "b"]
    x = torch.randn(5, 12)
    w0 = layer.base_layer.weight.detach().clone()
    y = layer(x)
    if one_call:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # merging all the active ones at once keeps the output: no warning
            layer.merge()
    else:
        # the DoRA adapter "b" stays unmerged beside "default": the output differs until "b" is merged too (a
        # helper's find: 4e-2 off a tiny Llama's logits, no word), which a warning says now
        with pytest.warns(UserWarning, match=r"DoRA adapter\(s\) \['b'\] stay active and unmerged"):
            layer.merge(["default"])
        assert not torch.allclose(layer(x), y, rtol=1e-5, atol=1e-5)
        layer.merge(["b"])
    torch.testing.assert_close(layer.base_layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()  # fp32 arithmetic both ways through factors of size ~1: a few ulps of the merged weight
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=5e-5)


def test_merging_into_a_dense_base_does_not_warn():
    import warnings

    layer = LoRALinear(nn.Linear(8, 6), r=2, alpha=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.merge()
        layer.unmerge()


def test_bf16_merge_rounds_once():
    torch.manual_seed(0)
    base = nn.Linear(256, 64, dtype=torch.bfloat16)
    layer = LoRALinear(base, r=8, alpha=16)
    _randomise(layer)
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(1e-3)
    w32 = base.weight.float()
    exact = w32 + layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
    layer.merge()
    merged = base.weight.float()
    assert torch.equal(merged, exact.to(torch.bfloat16).float())  # correctly rounded, once
    naive = (w32.to(torch.bfloat16) + (exact - w32).to(torch.bfloat16)).float()
    assert (merged - exact).abs().sum() <= (naive - exact).abs().sum()


def test_bf16_base_with_fp32_adapter_keeps_base_dtype():
    layer = _layer(dtype=torch.bfloat16, r=2, alpha=2)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    out = layer(torch.randn(3, 12, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"r": 0}, ValueError, "r must be a positive"),
        ({"r": -2}, ValueError, "r must be a positive"),
        ({"r": 2.5}, TypeError, "r must be an int"),
        ({"alpha": 0}, ValueError, "alpha must be a positive"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"init": "xavier"}, ValueError, "init must be one of"),
        ({"dropout": "0.1"}, ValueError, "dropout must be a number"),
        ({"dropout": None}, ValueError, "dropout must be a number"),
        ({"use_rslora": "no"}, TypeError, "use_rslora must be a bool"),
        ({"use_dora": 1}, TypeError, "use_dora must be a bool"),
        ({"use_rslora": 0}, TypeError, "use_rslora must be a bool"),
        ({"use_dora": np.array(False)}, TypeError, "use_dora must be a bool"),
        ({"exact_fp32": "no"}, TypeError, "exact_fp32 must be a bool"),
        ({"exact_fp32": 1}, TypeError, "exact_fp32 must be a bool"),
        ({"adapter_dtype": torch.int64}, TypeError, "adapter_dtype must be None or a floating-point torch.dtype"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _layer(**kwargs)


def test_numpy_bool_flags_act_as_python_bools():
    """np.bool_ from a sweep: the layer computes what the Python bool gives and keeps Python bools."""
    layer = _layer(r=4, alpha=8.0, use_rslora=np.True_, use_dora=np.True_, exact_fp32=np.False_)
    ref = _layer(r=4, alpha=8.0, use_rslora=True, use_dora=True, exact_fp32=False)
    assert layer.exact_fp32 is False and layer.use_rslora["default"] is True and layer.is_dora("default")
    assert layer.scaling["default"] == 8.0 / math.sqrt(4)
    layer.add_adapter("other", r=2, use_rslora=np.False_)
    assert layer.use_rslora["other"] is False and layer.scaling["other"] == 8.0 / 2
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)


def test_base_must_be_linear():
    with pytest.raises(TypeError, match="base must be nn.Linear"):
        LoRALinear(nn.Conv1d(3, 3, 1))


def test_device_mismatch_is_reported():
    layer = _layer(r=2)
    with pytest.raises(ValueError, match="input is on meta"):
        layer(torch.empty(2, 12, device="meta"))


def test_integer_input_is_reported():
    with pytest.raises(TypeError, match="input must be a floating-point tensor, got dtype torch.int64"):
        _layer(r=2)(torch.ones(2, 12, dtype=torch.long))


def test_an_input_that_is_no_tensor_is_reported():
    for x, name in (([[0.0] * 12], "list"), (np.zeros((2, 12), dtype=np.float32), "ndarray")):
        with pytest.raises(TypeError, match=f"input must be a floating-point tensor, got {name}"):
            _layer(r=2)(x)


@pytest.mark.parametrize("second_adapter", [False, True])  # one adapter: fused path; two: the plain one
def test_input_with_the_wrong_last_dimension_is_reported(second_adapter):
    layer = _layer(r=2)
    if second_adapter:
        layer.add_adapter("other", r=2)
        layer.active_adapters = ["default", "other"]
    for x in (torch.randn(2, 13), torch.randn(12, 3), torch.tensor(1.0)):
        for grad in (True, False):  # no_grad calls may take the decode path
            with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="in_features=12, got shape"):
                layer(x)


def test_named_adapters_on_one_layer():
    layer = _randomise(_layer(r=2, alpha=2))
    layer.add_adapter("other", r=3, alpha=3)
    _randomise(layer, "other", seed=5)
    x = torch.randn(4, 12)
    base = layer.base_layer(x)
    d1 = layer(x) - base
    layer.active_adapters = ["other"]
    d2 = layer(x) - base
    layer.active_adapters = ["default", "other"]
    torch.testing.assert_close(layer(x) - base, d1 + d2, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("other")
    layer.delete_adapter("other")
    assert layer.adapter_names() == ["default"]
    assert layer.active_adapters == ["default"]


def test_fused_lora_linear_gradcheck_all_inputs():
    from alignlab.adapters.fused import lora_linear

    g = torch.Generator().manual_seed(0)
    x, w, bias = (torch.randn(s, dtype=torch.float64, generator=g, requires_grad=True) for s in ((2, 3, 7), (5, 7), (5,)))
    a, b = (torch.randn(s, dtype=torch.float64, generator=g, requires_grad=True) for s in ((3, 7), (5, 3)))
    torch.autograd.gradcheck(lambda *t: lora_linear(*t, 0.7), (x, w, bias, a, b))
    torch.autograd.gradcheck(lambda x, w, a, b: lora_linear(x, w, None, a, b, 1.3), (x, w, a, b))


@pytest.mark.parametrize("tokens", [(4, 2), (1, 3)])  # 8 rows >= in (scale W) and 3 rows < in (scale gy)
def test_fused_dora_linear_matches_unfused_expression(tokens):
    from alignlab.adapters.fused import dora_linear

    g = torch.Generator().manual_seed(1)
    make = lambda *s: torch.randn(s, dtype=torch.float64, generator=g).requires_grad_()  # noqa: E731
    x, w, bias, a, b = make(*tokens, 7), make(5, 7), make(5), make(3, 7), make(5, 3)
    m = (1 + 0.1 * torch.randn(5, dtype=torch.float64, generator=g)).requires_grad_()
    y = dora_linear(x, w, bias, a, b, 0.8, m)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    grads = torch.autograd.grad(y, (x, w, bias, a, b, m), gy)
    v = w + 0.8 * b @ a
    y_ref = x @ (m[:, None] * v / v.norm(dim=1, keepdim=True).detach()).T + bias
    refs = torch.autograd.grad(y_ref, (x, w, bias, a, b, m), gy)
    torch.testing.assert_close(y, y_ref)
    for got, ref, name in zip(grads, refs, "x w bias a b m".split()):
        torch.testing.assert_close(got, ref, msg=name)


@pytest.mark.parametrize("dora", [False, True])
def test_layer_takes_fused_path_only_when_safe(dora, monkeypatch):
    import alignlab.adapters.lora as lora_mod

    calls = []
    for fn in ("lora_linear", "dora_linear"):
        orig = getattr(lora_mod, fn)
        monkeypatch.setattr(lora_mod, fn, lambda *a, _o=orig, _n=fn, **k: calls.append(_n) or _o(*a, **k))
    layer = _dora() if dora else _randomise(_layer(r=2, alpha=2))
    x = torch.randn(3, 12)
    layer(x)
    assert calls == ["dora_linear" if dora else "lora_linear"]
    layer.lora_dropout["default"] = nn.Dropout(0.1)
    layer.train()
    layer(x)
    assert len(calls) == 1  # active dropout: the unfused path


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("rows", [0, 1])
def test_empty_batch_and_single_token(dora, rows):
    layer = _dora() if dora else _randomise(_layer(r=2, alpha=2))
    x = torch.randn(rows, 12, requires_grad=True)
    y = layer(x)
    assert y.shape == (rows, 10)
    y.sum().backward()
    assert x.grad.shape == x.shape
    b_grad = layer.lora_B["default"].weight.grad
    assert torch.isfinite(b_grad).all() and (rows > 0 or not b_grad.any())
    if rows:
        w, bias = layer.base_layer.weight, layer.base_layer.bias
        a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        v = w + s * b @ a
        if dora:
            m = layer.lora_magnitude_vector["default"]
            torch.testing.assert_close(y, x @ (m[:, None] * v / v.norm(dim=1, keepdim=True)).T + bias)
        else:
            torch.testing.assert_close(y, x @ v.T + bias)


def test_non_finite_alpha_is_refused_by_configs_and_layers():
    # alpha=NaN (or inf) passed the `alpha <= 0` checks; with B = 0 at the start, s·BAx = NaN·0
    # made every output NaN before the first step
    from alignlab.adapters import AdaLoRAConfig, LoKrConfig, LoRAConfig, SoRAConfig
    from alignlab.adapters.embedding import LoRAEmbedding

    for bad in (float("nan"), float("inf")):
        for make in (lambda: LoRAConfig(alpha=bad), lambda: LoKrConfig(alpha=bad), lambda: SoRAConfig(alpha=bad),
                     lambda: AdaLoRAConfig(alpha=bad)):
            with pytest.raises(ValueError, match="alpha must be a positive"):
                make()
        with pytest.raises(ValueError, match=r"alpha_pattern\['q_proj'\] must be a positive"):
            LoRAConfig(alpha_pattern={"q_proj": bad})
        with pytest.raises(ValueError, match="alpha must be a positive"):
            LoRALinear(nn.Linear(4, 3), r=2, alpha=bad)
        with pytest.raises(ValueError, match="alpha must be a positive"):
            LoRAEmbedding(nn.Embedding(5, 4), 2, bad)


def test_numpy_rank_and_alpha_are_python_numbers_inside():
    """A sweep's np.int64 rank and np.float32 alpha give the same layer as Python numbers (stored as such)."""
    import numpy as np

    torch.manual_seed(0)
    a = LoRALinear(nn.Linear(8, 6), r=np.int64(2), alpha=np.float32(4.0))
    torch.manual_seed(0)
    b = LoRALinear(nn.Linear(8, 6), r=2, alpha=4.0)
    assert type(a.r["default"]) is int and type(a.alpha["default"]) is float
    assert a.scaling == b.scaling
    for bad in (True, np.float32("nan"), float("inf")):
        with pytest.raises((TypeError, ValueError), match="r must|alpha must"):
            LoRALinear(nn.Linear(8, 6), r=2 if bad is not True else bad, alpha=4.0 if bad is True else bad)


@pytest.mark.parametrize("r, alpha, use_rslora, error, match", [
    (0, 8.0, False, ValueError, "r must be a positive integer"),   # was ZeroDivisionError
    (-4, 8.0, False, ValueError, "r must be a positive integer"),  # was -2.0: the update's sign flipped
    (-4, 8.0, True, ValueError, "r must be a positive integer"),   # was 'math domain error'
    (2.5, 8.0, False, ValueError, "r must be a positive integer"),
    (True, 8.0, False, ValueError, "r must be a positive integer"),
    (4, float("nan"), False, ValueError, "alpha must be a finite number"),
    (4, 8.0, "yes", TypeError, "use_rslora"),
])
def test_lora_scaling_refuses_bad_arguments(r, alpha, use_rslora, error, match):
    with pytest.raises(error, match=match):
        lora_scaling(r, alpha, use_rslora)
    assert lora_scaling(np.int64(4), np.float32(8.0), np.bool_(True)) == pytest.approx(4.0)
