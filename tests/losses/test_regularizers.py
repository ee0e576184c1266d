"""EWC and L2-SP against hand-derived gradients and penalties."""

import pytest
import torch
from torch import nn

from alignlab.losses.regularizers import EWC, L2SP, estimate_fisher, ewc_penalty, l2sp_penalty


def _softmax_regression(seed=0, d=3, c=4):
    torch.manual_seed(seed)
    model = nn.Linear(d, c).double()
    x = torch.randn(6, d, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1, -100])  # last example has no target
    return model, x, y


def _forward(model, batch):
    x, y = batch
    return model(x), y


def _hand_grads(model, x, y):
    """d log softmax(Wx+b)[y] / d(W, b) = (e_y - p) x^T, (e_y - p): per example, by hand."""
    W, b = model.weight.detach(), model.bias.detach()
    p = torch.softmax(x @ W.T + b, -1)
    e = torch.nn.functional.one_hot(y.clamp(min=0), W.shape[0]).double()
    r = e - p
    return torch.einsum("nc,nd->ncd", r, x), r, p


def test_empirical_fisher_matches_hand_computation():
    model, x, y = _softmax_regression()
    data = [(x[:4], y[:4]), (x[4:], y[4:])]  # two batches
    fisher = estimate_fisher(model, data, _forward, mode="empirical")
    gw, gb, _ = _hand_grads(model, x, y)
    valid = (y != -100).double()
    n = x.shape[0]  # the example without a target still counts as an example (zero gradient)
    want_w = (gw.square() * valid[:, None, None]).sum(0) / n
    want_b = (gb.square() * valid[:, None]).sum(0) / n
    torch.testing.assert_close(fisher["weight"], want_w)
    torch.testing.assert_close(fisher["bias"], want_b)


def test_batch_fisher_squares_summed_gradients():
    model, x, y = _softmax_regression()
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    fisher = estimate_fisher(model, data, _forward, per_example=False)
    gw, _, _ = _hand_grads(model, x, y)
    valid = (y != -100).double()[:, None, None]
    g1 = (gw[:4] * valid[:4]).sum(0)
    g2 = (gw[4:] * valid[4:]).sum(0)
    torch.testing.assert_close(fisher["weight"], (g1.square() + g2.square()) / 2)


def test_true_fisher_converges_to_expectation_over_model_labels():
    model, x, y = _softmax_regression(seed=1)
    x, y = x[:2], y[:2]
    gen = torch.Generator().manual_seed(0)
    fisher = estimate_fisher(model, [(x, y)], _forward, mode="true", samples=1000, generator=gen)
    # Exact: E_x sum_c p_c ((e_c - p) x^T)^2
    W, b = model.weight.detach(), model.bias.detach()
    p = torch.softmax(x @ W.T + b, -1)
    want = torch.zeros_like(W)
    for i in range(2):
        for c in range(W.shape[0]):
            r = torch.nn.functional.one_hot(torch.tensor(c), W.shape[0]).double() - p[i]
            want += p[i, c] * torch.outer(r, x[i]).square()
    want /= 2
    assert ((fisher["weight"] - want).norm() / want.norm()).item() < 0.1
    empirical = estimate_fisher(model, [(x, y)], _forward, mode="empirical")
    assert ((empirical["weight"] - want).norm() / want.norm()).item() > 0.3  # the two really differ here
    # Reproducible with the same seed.
    again = estimate_fisher(model, [(x, y)], _forward, mode="true", samples=50, generator=torch.Generator().manual_seed(3))
    again2 = estimate_fisher(model, [(x, y)], _forward, mode="true", samples=50, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again["weight"], again2["weight"])


def test_fisher_dict_batches_num_batches_and_errors():
    model, x, y = _softmax_regression()
    data = [{"x": x[:3], "y": y[:3]}, {"x": x[3:], "y": y[3:]}]
    f = estimate_fisher(model, data, lambda m, b: (m(b["x"]), b["y"]), num_batches=1, params=["weight"])
    assert set(f) == {"weight"}
    gw, _, _ = _hand_grads(model, x[:3], y[:3])
    torch.testing.assert_close(f["weight"], gw.square().mean(0))
    with pytest.raises(ValueError, match="mode"):
        estimate_fisher(model, data, _forward, mode="exact")
    with pytest.raises(ValueError, match="no batches"):
        estimate_fisher(model, [], _forward)
    with pytest.raises(ValueError, match="params"):
        estimate_fisher(model, data, _forward, params=["nope"])
    with pytest.raises(ValueError, match="logits"):
        estimate_fisher(model, [(x, y[:2])], _forward, per_example=False)


def test_ewc_penalty_value_and_gradient():
    model, _, _ = _softmax_regression()
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    fisher = {n: torch.rand(p.shape, generator=g, dtype=torch.float64) for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    params = dict(model.named_parameters())
    pen = ewc_penalty(params, anchor, fisher, lam=3.0)
    want = sum(1.5 * (fisher[n] * (params[n] - anchor[n]) ** 2).sum() for n in fisher)
    torch.testing.assert_close(pen, want)
    pen.backward()
    for n, p in params.items():  # d/dtheta = lam F (theta - theta*)
        torch.testing.assert_close(p.grad, 3.0 * fisher[n] * (p.detach() - anchor[n]))


def test_ewc_class_and_online_consolidation():
    model, _, _ = _softmax_regression()
    f1 = {"weight": torch.full((4, 3), 2.0, dtype=torch.float64)}
    ewc = EWC(model, f1, lam=1.0)
    assert ewc.penalty(model).item() == 0.0
    theta1 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert ewc.penalty(model).item() == pytest.approx(0.5 * 2.0 * 12)
    f2 = {"weight": torch.ones(4, 3, dtype=torch.float64)}
    ewc.consolidate(model, f2, gamma=0.5)  # F = 0.5 * 2 + 1 = 2, anchor = theta1 + 1
    torch.testing.assert_close(ewc.fisher["weight"], torch.full((4, 3), 2.0, dtype=torch.float64))
    torch.testing.assert_close(ewc.anchor["weight"], theta1 + 1.0)
    assert ewc.penalty(model).item() == 0.0
    state = ewc.state_dict()
    other = EWC(model, f2)
    other.load_state_dict(state)
    torch.testing.assert_close(other.fisher["weight"], ewc.fisher["weight"])
    with pytest.raises(ValueError, match="gamma"):
        ewc.consolidate(model, f2, gamma=2.0)
    with pytest.raises(ValueError, match="same parameter names"):
        ewc.consolidate(model, {"bias": torch.ones(4)})
    with pytest.raises(ValueError, match="shape"):
        EWC(model, {"weight": torch.ones(3, 3)})
    with pytest.raises(ValueError, match="lam"):
        EWC(model, f1, lam=-1)


def test_l2sp_layerwise_elementwise_and_new_params():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    reg = L2SP(net, alpha=2.0, beta=0.5, weights={"0.*": 3.0, "1.weight": torch.tensor([1.0, 0.0]).view(2, 1)},
               exclude=["1.bias"])
    assert reg(net).item() == pytest.approx(0.5 * 0.5 * net[1].bias.detach().square().sum().item())
    w0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3)
    pen = reg(net)
    p = dict(net.named_parameters())
    d = {n: p[n].detach() - w0[n] for n in p}
    want = 0.5 * 2.0 * (
        3.0 * (d["0.weight"].square().sum() + d["0.bias"].square().sum())
        + (d["1.weight"][0].square().sum())  # row weight 1, row 1 weight 0
    ) + 0.5 * 0.5 * p["1.bias"].detach().square().sum()
    assert pen.item() == pytest.approx(want.item(), rel=1e-6)
    pen.backward()
    torch.testing.assert_close(net[0].weight.grad, 2.0 * 3.0 * d["0.weight"])
    torch.testing.assert_close(net[1].weight.grad[1], torch.zeros(3))
    torch.testing.assert_close(net[1].bias.grad, 0.5 * p["1.bias"].detach())


def test_l2sp_callable_weights_unmatched_and_errors():
    torch.manual_seed(0)
    params = {"a": torch.ones(2, requires_grad=True), "b": torch.ones(3, requires_grad=True)}
    w0 = {"a": torch.zeros(2), "b": torch.zeros(3)}
    assert l2sp_penalty(params, w0, alpha=1.0, weights=lambda n, p: 2.0 if n == "a" else 0.0).item() == pytest.approx(2.0)
    assert l2sp_penalty(params, w0, weights={"a": 1.0}).item() == pytest.approx(1.0)  # "b" matches no pattern
    assert l2sp_penalty(params, w0).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="alpha"):
        l2sp_penalty(params, w0, alpha=-1.0)
    with pytest.raises(ValueError, match="shape"):
        l2sp_penalty(params, {"a": torch.zeros(3)})
    with pytest.raises(ValueError, match="broadcast"):
        l2sp_penalty(params, w0, weights={"a": torch.ones(5)})
    with pytest.raises(TypeError, match="weights"):
        l2sp_penalty(params, w0, weights="all")


def test_numpy_strengths_match_python_numbers_and_nan_is_refused():
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    p, a, f = ({"w": torch.randn(3, generator=g)} for _ in range(3))
    assert torch.equal(ewc_penalty(p, a, f, lam=np.float32(0.5)), ewc_penalty(p, a, f, lam=0.5))
    assert torch.equal(l2sp_penalty(p, a, alpha=np.float32(0.5), beta=np.int64(1), weights=np.float32(2)),
                       l2sp_penalty(p, a, alpha=0.5, beta=1, weights=2.0))
    for bad in (True, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lam"):
            ewc_penalty(p, a, f, lam=bad)
        with pytest.raises(ValueError, match="alpha"):
            l2sp_penalty(p, a, alpha=bad)
    with pytest.raises(ValueError, match="weights"):
        l2sp_penalty(p, a, weights=float("nan"))
    with pytest.raises(TypeError, match="weights"):
        l2sp_penalty(p, a, weights=True)


def test_fisher_per_example_must_be_a_bool():
    """per_example="no" is truthy: it ran the per-example estimator the caller meant to switch off."""
    model, x, y = _softmax_regression()
    with pytest.raises(TypeError, match="per_example"):
        estimate_fisher(model, [(x, y)], _forward, per_example="no")


def test_fisher_is_estimated_without_dropout_and_the_modes_are_restored():
    """A model still in train mode after the old task (the usual moment to estimate the Fisher) ran its dropout
    in every forward: the "empirical" Fisher came out random (two calls on the same data disagreed) and was the
    Fisher of thinned networks, not of the parameters theta* the penalty anchors to. It is estimated in eval
    mode (as Avalanche's EWC does), and every submodule's mode is put back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 4)).double().train()
    model[2].eval()  # a submodule the caller keeps in eval stays so
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1, 2])
    data = [(x, y)]
    first = estimate_fisher(model, data, _forward)
    second = estimate_fisher(model, data, _forward)
    assert [m.training for m in model] == [True, True, False, True]
    want = estimate_fisher(model.eval(), data, _forward)
    for name in want:
        torch.testing.assert_close(first[name], want[name])
        torch.testing.assert_close(second[name], want[name])


def test_ewc_penalty_sums_in_float32_for_bf16_params_and_integer_fishers():
    """The penalty squared the difference in the parameter's dtype, then cast it to the Fisher's: a bf16 model
    lost bits in every square (about 1e-3 of the penalty here), and an integer Fisher truncated each squared
    difference to an integer, so a step smaller than 1 cost nothing."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g).to(torch.bfloat16).requires_grad_()
    anchor = {"w": (w.detach().float() + 0.05 * torch.randn(64, 64, generator=g)).to(torch.bfloat16)}
    fisher = {"w": torch.rand(64, 64, generator=g)}
    pen = ewc_penalty({"w": w}, anchor, fisher, lam=2.0)
    d = w.detach().double() - anchor["w"].double()
    want = (fisher["w"].double() * d.square()).sum()
    assert pen.dtype == torch.float32
    torch.testing.assert_close(pen.double(), want, rtol=1e-6, atol=0)
    pen.backward()
    assert w.grad.dtype == torch.bfloat16

    model, _, _ = _softmax_regression()
    counts = {"weight": torch.full((4, 3), 3, dtype=torch.long)}  # an importance given as integer counts
    ewc = EWC(model, counts, lam=1.0)
    with torch.no_grad():
        model.weight.add_(0.1)
    assert ewc.penalty(model).item() == pytest.approx(0.5 * 3 * 0.01 * 12)


def test_ewc_refuses_fishers_that_are_not_tensors_of_finite_nonnegative_numbers():
    model, _, _ = _softmax_regression()
    for bad in ({"weight": torch.full((4, 3), float("nan"))}, {"weight": -torch.ones(4, 3)},
                {"weight": torch.full((4, 3), float("inf"))}):
        with pytest.raises(ValueError, match=r"fisher\['weight'\]"):
            EWC(model, bad)
    with pytest.raises(TypeError, match="fisher must be a mapping"):
        EWC(model, "weight")
    with pytest.raises(TypeError, match=r"fisher\['weight'\] must be a torch.Tensor"):
        EWC(model, {"weight": [[1.0] * 3] * 4})
    with pytest.raises(TypeError, match=r"params must be a mapping .*named_parameters"):
        ewc_penalty(model, {}, {})
    ewc = EWC(model, {"weight": torch.ones(4, 3, dtype=torch.float64)})
    state = ewc.state_dict()
    for key, value, match in (("lam", "x", "lam"), ("lam", float("nan"), "lam"),
                              ("anchor", {}, "same parameters"),
                              ("fisher", {"weight": -torch.ones(4, 3)}, "negative")):
        with pytest.raises(ValueError, match=match):
            ewc.load_state_dict({**state, key: value})
    assert ewc.lam == 1.0 and set(ewc.anchor) == {"weight"}  # a refused state leaves the object as it was


def test_one_string_is_one_pattern_for_exclude_and_params():
    """L2SP(exclude="1.bias") iterated the string's characters, matched no parameter and silently anchored the
    fresh head to its random init instead of decaying it; estimate_fisher(params="weight") refused the names
    'w', 'e', 'i', ..."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    one, listed = L2SP(net, alpha=1.0, beta=0.5, exclude="1.*"), L2SP(net, alpha=1.0, beta=0.5, exclude=["1.*"])
    assert set(one.pretrained) == set(listed.pretrained) == {"0.weight", "0.bias"}
    want = 0.25 * (net[1].weight.detach().square().sum() + net[1].bias.detach().square().sum())
    assert one(net).item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(TypeError, match="exclude"):
        L2SP(net, exclude=[0])
    model, x, y = _softmax_regression()
    f = estimate_fisher(model, [(x, y)], _forward, params="weight")
    torch.testing.assert_close(f["weight"], estimate_fisher(model, [(x, y)], _forward, params=["weight"])["weight"])
    assert set(f) == {"weight"}


def test_l2sp_weights_must_be_finite_nonnegative_numbers_or_tensors():
    """A negative factor a (from a mapping or a callable) turned the pull to w0 into a push away from it, and a
    NaN one made the loss NaN; both went through. A string gave "could not convert string to float"."""
    params = {"a": torch.ones(2, requires_grad=True)}
    w0 = {"a": torch.zeros(2)}
    for weights in (-1.0, {"a": -1.0}, {"a": float("nan")}, lambda n, p: -2.0, lambda n, p: float("inf")):
        with pytest.raises(ValueError, match="weights"):
            l2sp_penalty(params, w0, weights=weights)
    for weights in ({"a": "x"}, lambda n, p: "x"):
        with pytest.raises(TypeError, match="weights for 'a'"):
            l2sp_penalty(params, w0, weights=weights)
    with pytest.raises(ValueError, match="weights for 'model.layers.*'"):
        L2SP(nn.Linear(2, 2), weights={"model.layers.*": -0.5})  # refused at construction, matched or not
    with pytest.raises(TypeError, match="pretrained must be a mapping"):
        l2sp_penalty(params, nn.Linear(2, 2))
    assert l2sp_penalty(params, w0, weights=lambda n, p: None).item() == 0.0  # None: not regularised


def test_l2sp_sums_in_float32_for_bf16_params():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g).to(torch.bfloat16).requires_grad_()
    w0 = {"w": (w.detach().float() + 0.05 * torch.randn(64, 64, generator=g)).to(torch.bfloat16)}
    new = torch.randn(64, 64, generator=g).to(torch.bfloat16)
    pen = l2sp_penalty({"w": w, "new": new}, w0, alpha=2.0, beta=0.5)
    want = (w.detach().double() - w0["w"].double()).square().sum() + 0.25 * new.double().square().sum()
    assert pen.dtype == torch.float32
    torch.testing.assert_close(pen.double(), want, rtol=1e-6, atol=0)


def test_fisher_inside_no_grad_and_in_float64():
    """The Fisher is usually taken right after evaluating the old task, inside torch.no_grad(): that was a
    RuntimeError ("element 0 of tensors does not require grad"). And the log-softmax ran in float32 (``.float()``)
    for a float64 model, whose Fisher then held float32 digits only."""
    model, x, y = _softmax_regression()
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    with torch.no_grad():
        inside = estimate_fisher(model, data, _forward)
    gw, gb, _ = _hand_grads(model, x, y)
    valid = (y != -100).double()
    torch.testing.assert_close(inside["weight"], (gw.square() * valid[:, None, None]).sum(0) / 6, rtol=1e-13, atol=0)
    torch.testing.assert_close(inside["bias"], (gb.square() * valid[:, None]).sum(0) / 6, rtol=1e-13, atol=0)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        estimate_fisher(model, data, _forward)


def test_fisher_checks_what_forward_returns_and_splits_around_scalars():
    model, x, y = _softmax_regression()
    cases = [
        (lambda m, b: m(b[0]), TypeError, "pair of tensors"),
        (lambda m, b: (m(b[0]), b[1].double()), TypeError, "labels must be an integer tensor"),
        (lambda m, b: (m(b[0]).argmax(-1, keepdim=True), b[1]), TypeError, "logits must be a floating-point"),
        (lambda m, b: (m(b[0]), b[1].clamp(min=0) + 4), ValueError, r"labels must lie in \[0, 4\)"),
        (lambda m, b: (m(b[0]), torch.where(b[1] < 0, -1, b[1])), ValueError, "ignore_index=-100, got -1"),
    ]
    for forward, exc, match in cases:
        with pytest.raises(exc, match=match):
            estimate_fisher(model, [(x, y)], forward)
    with pytest.raises(TypeError, match="ignore_index"):
        estimate_fisher(model, [(x, y)], _forward, ignore_index=None)
    with pytest.raises(TypeError, match="forward must be a callable"):
        estimate_fisher(model, [(x, y)], "forward")
    with pytest.raises(ValueError, match="no parameters"):
        estimate_fisher(model.requires_grad_(False), [(x, y)], _forward)
    model.requires_grad_(True)
    # a 0-d tensor in a batch (here a temperature) goes to every example instead of failing the split
    scaled = estimate_fisher(model, [{"x": x, "y": y, "t": torch.tensor(2.0)}], lambda m, b: (m(b["x"]) / b["t"], b["y"]))
    want = estimate_fisher(model, [(x, y)], lambda m, b: (m(b[0]) / 2.0, b[1]))
    torch.testing.assert_close(scaled["weight"], want["weight"])


def test_l2sp_state_dict_round_trip_restores_the_starting_point(tmp_path):
    """A resumed run rebuilt L2SP from the reloaded, fine-tuned model: with no state_dict the starting point
    w0 became the fine-tuned weights and the penalty restarted at 0."""
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    reg = L2SP(net, alpha=0.5, beta=0.1, exclude="bias")
    w0 = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(0.2)
    torch.save(reg.state_dict(), tmp_path / "l2sp.pt")
    resumed = L2SP(net, alpha=1.0, exclude="bias")  # built from the fine-tuned weights, as a restart would
    resumed.load_state_dict(torch.load(tmp_path / "l2sp.pt"))
    want = 0.25 * (net.weight.detach() - w0).square().sum() + 0.05 * net.bias.detach().square().sum()
    assert resumed(net).item() == pytest.approx(want.item(), rel=1e-6)
    assert resumed(net).item() == pytest.approx(reg(net).item(), rel=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        resumed.load_state_dict({**reg.state_dict(), "alpha": -1.0})
    with pytest.raises(ValueError, match="keys"):
        resumed.load_state_dict({"pretrained": {}})
    with pytest.raises(TypeError, match="pretrained"):
        resumed.load_state_dict({**reg.state_dict(), "pretrained": {"weight": [0.0]}})


def test_meta_parameters_are_refused_at_construction():
    """L2SP on a model not materialised yet (deferred init) kept meta tensors as w0: the penalty was a meta
    tensor, and on the real model a "Cannot copy out of meta tensor" far from the cause."""
    with torch.device("meta"):
        net = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="meta device"):
        L2SP(net)
    with pytest.raises(ValueError, match="meta device"):
        EWC(net, {"weight": torch.ones(2, 3)})
    assert set(L2SP(net, exclude="*").pretrained) == set()  # excluded parameters have no w0 to take


def test_a_refused_consolidate_leaves_fisher_and_anchor_as_they_were():
    """consolidate checked and stored one parameter at a time: a bad second entry (NaN, or a parameter the model
    lost) came after the first had already taken the new Fisher and the new anchor, a half-consolidated EWC."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    ewc = EWC(model, {"weight": torch.ones(2, 3, dtype=torch.float64), "bias": torch.ones(2, dtype=torch.float64)})
    before_f, before_a = ewc.fisher, ewc.anchor
    with torch.no_grad():
        model.weight.add_(1.0)
    bad = {"weight": torch.ones(2, 3, dtype=torch.float64), "bias": torch.tensor([1.0, float("nan")], dtype=torch.float64)}
    with pytest.raises(ValueError, match="bias"):
        ewc.consolidate(model, bad)
    for name in before_f:
        assert torch.equal(ewc.fisher[name], before_f[name]) and torch.equal(ewc.anchor[name], before_a[name])
    assert ewc.penalty(model).item() == pytest.approx(0.5 * 6.0)


def test_num_batches_takes_no_batch_more_from_the_iterator():
    """estimate_fisher broke out of its loop only after pulling batch num_batches + 1 from the iterator: with an
    iterator shared with the training loop (or a stream), one batch was loaded and lost."""
    model, x, y = _softmax_regression()
    batches = [(x[i : i + 2], y[i : i + 2]) for i in range(0, 6, 2)]
    it = iter(batches)
    f = estimate_fisher(model, it, _forward, num_batches=2)
    assert next(it) is batches[2]
    torch.testing.assert_close(f["weight"], estimate_fisher(model, batches[:2], _forward)["weight"])


def test_one_batch_passed_as_data_is_a_type_error_naming_data():
    """A single dict batch passed as data was iterated over its keys ("per_example=True cannot split a batch of
    type str; pass per_example=False", a wrong hint), and a single tensor over its rows."""
    model, x, y = _softmax_regression()
    with pytest.raises(TypeError, match="data must be an iterable of batches.*dict"):
        estimate_fisher(model, {"x": x, "y": y}, lambda m, b: (m(b["x"]), b["y"]))
    with pytest.raises(TypeError, match="data must be an iterable of batches.*Tensor"):
        estimate_fisher(model, x, lambda m, b: (m(b), y[: b.shape[0]]))
    f = estimate_fisher(model, [{"x": x, "y": y}], lambda m, b: (m(b["x"]), b["y"]))
    torch.testing.assert_close(f["weight"], estimate_fisher(model, [(x, y)], _forward)["weight"])


def test_samples_without_true_mode_is_refused():
    """samples=100 with the default mode="empirical" was ignored: one pass over the data's labels, where the
    caller asked for a Monte-Carlo estimate of the true Fisher."""
    model, x, y = _softmax_regression()
    with pytest.raises(ValueError, match="samples=100 draws labels in mode='true' only"):
        estimate_fisher(model, [(x, y)], _forward, samples=100)
    estimate_fisher(model, [(x, y)], _forward, mode="true", samples=2, generator=torch.Generator().manual_seed(0))


def test_per_example_split_keeps_a_batch_encoding():
    """A collator's BatchEncoding was split into plain dicts, so a forward reading batch.input_ids worked with
    per_example=False and failed with the default per_example=True (AttributeError)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7)).double()
    ids = torch.randint(0, 7, (3, 5))
    batch = transformers.BatchEncoding({"input_ids": ids, "labels": ids})
    f = estimate_fisher(model, [batch], lambda m, b: (m(b.input_ids), b.labels))
    want = estimate_fisher(model, [{"input_ids": ids, "labels": ids}], lambda m, b: (m(b["input_ids"]), b["labels"]))
    for name in want:
        torch.testing.assert_close(f[name], want[name])


@pytest.mark.parametrize("mode", ["empirical", "true"])
@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_non_finite_logits_at_ignored_positions_do_not_reach_the_fisher(mode, fill):
    """Labels were drawn at every position in true mode, so a NaN or inf logit where the label is ignore_index
    (a padded row a forward masks out) stopped the estimate: torch.multinomial refused the row ("probability
    tensor contains either inf, nan or element < 0"). Only positions with a target enter the log-softmax now;
    the empirical mode is checked too."""
    model, x, y = _softmax_regression()

    def masked(m, b):
        logits = m(b[0])
        return logits.masked_fill((b[1] == -100)[:, None], fill), b[1]

    def seeded():
        return torch.Generator().manual_seed(0)

    for per_example in (True, False):
        got = estimate_fisher(model, [(x, y)], masked, mode=mode, per_example=per_example, generator=seeded())
        want = estimate_fisher(model, [(x, y)], _forward, mode=mode, per_example=per_example, generator=seeded())
        for name in want:
            assert torch.isfinite(got[name]).all()
            torch.testing.assert_close(got[name], want[name])


def test_a_resized_vocabulary_is_named_with_both_shapes_and_what_to_do():
    """After ``resize_token_embeddings`` the anchors keep the old shape: the penalty must stop with the parameter,
    both shapes and the likely cause, not broadcast or fail deep in torch."""
    from conftest import make_tiny_llama

    model = make_tiny_llama()
    reg = L2SP(model, alpha=1.0)
    ewc = EWC(model, {n: torch.ones_like(p) for n, p in model.named_parameters()})
    model.resize_token_embeddings(136)
    with pytest.raises(ValueError, match=r"pretrained\['model\.embed_tokens\.weight'\] has shape \(128, 32\), "
                                         r"parameter has \(136, 32\) \(resized .*resize_token_embeddings.*build L2SP"):
        reg(model)
    with pytest.raises(ValueError, match=r"'model\.embed_tokens\.weight': param \(136, 32\), anchor \(128, 32\), "
                                         r"fisher \(128, 32\) \(resized .*resize_token_embeddings.*load_state_dict"):
        ewc.penalty(model)


def _lora_model(init="kaiming", use_dora=False):
    from conftest import make_tiny_llama

    from alignlab.adapters import LoRAConfig, inject

    model = inject(make_tiny_llama().double(), LoRAConfig(r=2, alpha=8, init=init, use_dora=use_dora,
                                                          target_modules=["q_proj", "v_proj"]))
    model.lm_head.weight.requires_grad_(True)  # a plain trainable parameter beside the adapters
    return model


def _step(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("init", ["kaiming", "pissa"])
def test_l2sp_lora_delta_is_the_effective_weight_update_written_out(init):
    """lora_delta=True: alpha/2 * a * s^2 ||B A - B0 A0||_F^2 per adapter (dense, float64, written out here), plus
    the ordinary term of every other trainable parameter; the default stays A and B each against its start."""
    model = _lora_model(init)
    named = dict(model.named_parameters())
    start = {n: p.detach().clone() for n, p in named.items()}
    weights = {"model.layers.0.*": 3.0, "*": 1.0}
    reg = L2SP(model, alpha=0.7, weights=weights, lora_delta=True)
    factors = L2SP(model, alpha=0.7, weights=weights)
    _step(model)
    s = 8 / 2
    want = 0.5 * 0.7 * ((named["lm_head.weight"] - start["lm_head.weight"]) ** 2).sum()
    want_factors = want.clone()
    for layer in [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]:
        a, b = named[f"{layer}.lora_A.default.weight"], named[f"{layer}.lora_B.default.weight"]
        a0, b0 = start[f"{layer}.lora_A.default.weight"], start[f"{layer}.lora_B.default.weight"]
        w = 3.0 if layer.startswith("model.layers.0.") else 1.0
        want = want + 0.5 * 0.7 * w * ((s * b @ a - s * b0 @ a0) ** 2).sum()
        want_factors = want_factors + 0.5 * 0.7 * w * (((a - a0) ** 2).sum() + ((b - b0) ** 2).sum())
    got = reg(model)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(factors(model), want_factors)
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    for n, g, w in zip(trainable, torch.autograd.grad(got, list(trainable.values())),
                       torch.autograd.grad(want, list(trainable.values()))):
        torch.testing.assert_close(g, w, msg=n)
    assert len(reg.lora_pairs) == 4


def test_l2sp_lora_delta_options_and_errors():
    model = _lora_model(use_dora=True)
    with pytest.raises(TypeError, match="lora_delta must be a bool"):
        L2SP(model, lora_delta="yes")
    excluded = L2SP(model, lora_delta=True, exclude="*.lora_B.*")  # a factor treated as new: no pair for it
    assert excluded.lora_pairs == []
    seen = []
    called = L2SP(model, lora_delta=True, weights=lambda n, p: seen.append((n, tuple(p.shape))) or 1.0)
    _step(model)
    called(model)
    assert ("model.layers.1.self_attn.v_proj.base_layer.weight", (16, 32)) in seen
    assert ("model.layers.1.self_attn.v_proj.lora_magnitude_vector.default", (16,)) in seen  # DoRA's m: its own term
    elementwise = L2SP(model, lora_delta=True, weights={"*.q_proj.base_layer.weight": torch.ones(32, 32)})
    with pytest.raises(ValueError, match=r"weights for 'model.layers.0.self_attn.q_proj.base_layer.weight' "
                                         r"\(a lora_delta term\) must be a number"):
        elementwise(model)
    fresh = L2SP(_lora_model(), lora_delta=True)
    state = called.state_dict()
    del state["pretrained"]["model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    with pytest.raises(ValueError, match=r"lacks the LoRA factors .*q_proj\.lora_A\.default\.weight"):
        fresh.load_state_dict(state)


def test_lora_delta_sq_keeps_small_updates_of_a_large_start():
    """PiSSA starts from B0 A0 with the weight's top singular values: ||BA - B0A0||^2 for a tiny step must not be
    lost against ||B0 A0||^2 (float32 inputs, float64 reference)."""
    from alignlab.losses import lora_delta_sq  # with the other losses, as docs/forgetting.md names it

    g = torch.Generator().manual_seed(0)
    a0, b0 = 30 * torch.randn(4, 64, generator=g), 30 * torch.randn(96, 4, generator=g)
    a, b = a0 + 1e-4 * torch.randn(4, 64, generator=g), b0 + 1e-4 * torch.randn(96, 4, generator=g)
    want = ((b.double() @ a.double() - b0.double() @ a0.double()) ** 2).sum()
    torch.testing.assert_close(lora_delta_sq(a, b, a0, b0).double(), want, rtol=1e-5, atol=0)  # dense fp32: 7e-5


def test_ewc_penalty_and_consolidate_name_a_bad_argument():
    """``penalty("x")`` raised AttributeError; ``consolidate(model, "x")`` said the names differ, and a Fisher entry
    that is a list an AttributeError."""
    model = nn.Linear(3, 2)
    fisher = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    ewc = EWC(model, fisher)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        ewc.penalty("x")
    with pytest.raises(TypeError, match=r"fisher must be a mapping \{name: tensor\}, got str"):
        ewc.consolidate(model, "x")
    with pytest.raises(TypeError, match=r"fisher\['weight'\] must be a torch.Tensor, got list"):
        ewc.consolidate(model, {"weight": [1.0], "bias": torch.ones(2)})


def test_l2sp_state_dict_with_numpy_strengths_loads_with_torch_load(tmp_path):
    """alpha / beta from a sweep (NumPy scalars) were kept as they came: the saved state_dict then failed
    ``torch.load``'s default weights_only unpickler."""
    np = pytest.importorskip("numpy")
    reg = L2SP(nn.Linear(3, 2), alpha=np.float64(0.1), beta=np.float32(0.5))
    torch.save(reg.state_dict(), tmp_path / "reg.pt")
    state = torch.load(tmp_path / "reg.pt")
    assert (state["alpha"], state["beta"]) == (0.1, 0.5) and type(state["alpha"]) is float


def test_l2sp_of_a_frozen_model_is_refused():
    """Built before unfreezing, L2SP took no w0 at all: after unfreezing every weight counted as new (the beta
    term, often 0) and nothing was pulled back, without a word."""
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"model has no trainable parameters .* build L2SP after unfreezing"):
        L2SP(model, alpha=1.0)
    assert L2SP(model.requires_grad_(True), exclude="*").pretrained == {}  # all excluded on purpose: allowed


def test_lora_delta_sq_checks_its_factors_by_name():
    """A start ``a0`` of shape ``(1, in)`` broadcast against ``a`` and gave a wrong number without a word; a factor
    that is no tensor was an AttributeError, mismatched ranks a RuntimeError from ``torch.cat``."""
    from alignlab.losses import lora_delta_sq

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g)
    with pytest.raises(ValueError, match=r"a0 must have a's shape \(2, 5\), got \(1, 5\)"):
        lora_delta_sq(a, b, a[:1], b)
    with pytest.raises(ValueError, match=r"b0 must have b's shape \(4, 2\), got \(4, 1\)"):
        lora_delta_sq(a, b, a, b[:, :1])
    with pytest.raises(ValueError, match=r"b must be \(out, r\) with r = 3 .*got \(4, 2\)"):
        lora_delta_sq(torch.randn(3, 5), b, torch.randn(3, 5), b)
    with pytest.raises(ValueError, match=r"a must be \(r, in\), got \(5,\)"):
        lora_delta_sq(a[0], b, a[0], b)
    with pytest.raises(TypeError, match="a must be a torch.Tensor, got list"):
        lora_delta_sq(a.tolist(), b, a, b)
    with pytest.raises(TypeError, match="b0 must be a floating-point tensor, got torch.int64"):
        lora_delta_sq(a, b, a, b.long())
    want = ((b.double() @ a.double() - (b.double() + 1) @ a.double()) ** 2).sum()
    torch.testing.assert_close(lora_delta_sq(a, b, a, b + 1).double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int8, torch.uint8, torch.int32])
def test_empirical_fisher_takes_labels_of_any_integer_dtype(dtype):
    """The labels check admits every integer dtype, but gather takes only int64/int32 indices: int16 labels
    (a compact token store) failed with a raw RuntimeError from inside the loop."""
    model, x, y = _softmax_regression()
    x, y = x[:5], y[:5]  # all with a target: uint8 cannot hold -100
    want = estimate_fisher(model, [(x, y)], _forward)
    got = estimate_fisher(model, [(x, y.to(dtype))], _forward)
    torch.testing.assert_close(got["weight"], want["weight"], rtol=0, atol=0)
