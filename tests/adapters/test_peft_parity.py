"""Same numbers and same files as PEFT (installed as a test-only oracle) on a tiny random Llama."""

import copy
import json

import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters import (
    LoRAConfig,
    adapter_layers,
    add_weighted_adapter,
    inject,
    load_adapter,
    save_adapter,
)

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj", "down_proj"]
# fp32: both sides run the same math in a different order; bf16: one bf16 rounding of the activations
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _ours_and_peft(dtype=torch.float32, use_rslora=False, use_dora=False, init="kaiming", r=4, alpha=8, adapter_dtype=None,
                   exact_fp32=False):
    base = make_tiny_llama().to(dtype)
    ours = inject(copy.deepcopy(base), LoRAConfig(r=r, alpha=alpha, target_modules=TARGETS, use_rslora=use_rslora,
                                                  use_dora=use_dora, init=init, adapter_dtype=adapter_dtype,
                                                  exact_fp32=exact_fp32))
    peft_init = {"kaiming": True}.get(init, init)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=TARGETS, use_rslora=use_rslora, use_dora=use_dora, init_lora_weights=peft_init),
        autocast_adapter_dtype=adapter_dtype is None)
    return base, ours, theirs


def _randomise_and_copy(ours, theirs=None, seed=0):
    """Give our adapters non-zero random weights and copy them into PEFT's (same module structure)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, layer in adapter_layers(ours):
        with torch.no_grad():
            for key, p in (("lora_A", layer.lora_A["default"].weight), ("lora_B", layer.lora_B["default"].weight)):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
                state[f"base_model.model.{name}.{key}.default.weight"] = p.detach().clone()
            if layer.is_dora("default"):
                m = layer.lora_magnitude_vector["default"]
                m.mul_(1 + 0.1 * torch.randn(m.shape, generator=g))
                state[f"base_model.model.{name}.lora_magnitude_vector.default.weight"] = m.detach().clone()
    if theirs is not None:
        _, unexpected = theirs.load_state_dict(state, strict=False)
        assert not unexpected
    return state


def _grads(model, peft_names=False):
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            key = n.replace("base_model.model.", "") if peft_names else n
            key = key.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default")
            out[key] = p.grad
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_outputs_and_gradients_match_peft(dtype, variant):
    """fp32 takes the fused path; bf16 with fp32 adapters and ``exact_fp32`` computes the adapter in fp32,
    as PEFT does by default."""
    _, ours, theirs = _ours_and_peft(dtype, use_rslora=variant == "rslora", use_dora=variant == "dora",
                                     exact_fp32=True)
    _randomise_and_copy(ours, theirs)
    y_ours, y_theirs = ours(IDS).logits, theirs(IDS).logits
    torch.testing.assert_close(y_ours, y_theirs, **TOL[dtype])
    y_ours.float().square().mean().backward()
    y_theirs.float().square().mean().backward()
    g_ours, g_theirs = _grads(ours), _grads(theirs, peft_names=True)
    assert set(g_ours) == set(g_theirs) and g_ours
    for k in g_ours:
        scale = g_theirs[k].abs().max().clamp_min(1e-12)
        torch.testing.assert_close(g_ours[k] / scale, g_theirs[k] / scale, **TOL[dtype], msg=k)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_all_bf16_is_as_accurate_as_peft(variant):
    """bf16 base + bf16 adapters (fused path): two bf16 computations differ by rounding, so both are
    measured against the fp32 computation of the same weights, and ours must be no less accurate."""
    _, ours, theirs = _ours_and_peft(torch.bfloat16, use_rslora=variant == "rslora", use_dora=variant == "dora",
                                     adapter_dtype=torch.bfloat16)
    _randomise_and_copy(ours, theirs)
    oracle = copy.deepcopy(ours).float()
    outs = [m(IDS).logits for m in (ours, theirs, oracle)]
    for y in outs:
        y.float().square().mean().backward()
    g_ours, g_theirs, g_ref = _grads(ours), _grads(theirs, peft_names=True), _grads(oracle)
    assert set(g_ours) == set(g_theirs) == set(g_ref)
    assert _rel(outs[0], outs[2]) <= 1.5 * _rel(outs[1], outs[2]) + 1e-3
    for k in g_ref:
        assert _rel(g_ours[k], g_ref[k]) <= 1.5 * _rel(g_theirs[k], g_ref[k]) + 2e-2, k


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_default_mixed_precision_is_as_accurate_as_peft_under_autocast(variant):
    """Defaults (bf16 base, fp32 master adapters, adapter math in bf16 on the fused path) against PEFT's
    fp32 adapters run under ``torch.autocast(bfloat16)``; both measured against a float64 oracle with the
    same weights. Two bf16 computations round differently, so a single tensor's error scatters either way
    (measured: per-seed ratios 0.7-1.4): over four seeds the mean error of the output and of every gradient
    must be no worse than PEFT's (10% slack), and no single tensor more than twice PEFT's."""
    ratios = []
    for seed in range(4):
        _, ours, theirs = _ours_and_peft(torch.bfloat16, use_dora=variant == "dora")
        _randomise_and_copy(ours, theirs, seed=seed)
        oracle = copy.deepcopy(ours).double()
        for _, layer in adapter_layers(ours):
            assert layer._fused_dtype(torch.ones(1, dtype=torch.bfloat16), "default") == torch.bfloat16
        ids = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(seed))
        y_ours = ours(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_theirs = theirs(ids).logits
        y_ref = oracle(ids).logits
        for y in (y_ours, y_theirs, y_ref):
            y.double().square().mean().backward()
        g_ours, g_theirs, g_ref = _grads(ours), _grads(theirs, peft_names=True), _grads(oracle)
        assert set(g_ours) == set(g_theirs) == set(g_ref) and g_ours
        assert all(g.dtype == torch.float32 for g in g_ours.values())
        errors = {"output": (_rel(y_ours, y_ref), _rel(y_theirs, y_ref))}
        errors.update({k: (_rel(g_ours[k], g_ref[k]), _rel(g_theirs[k], g_ref[k])) for k in g_ref})
        worse = {k: v for k, v in errors.items() if v[0] > 2 * v[1] + 1e-3}
        assert not worse, (seed, worse)
        ratios.append(sum(e[0] for e in errors.values()) / sum(e[1] for e in errors.values()))
    assert sum(ratios) / len(ratios) <= 1.1, ratios


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_fp32_model_under_autocast_matches_peft(variant):
    """Mixed precision the usual way: an fp32 model run under ``torch.autocast(bfloat16)``. The base
    linears then compute in bf16, so the adapter must follow autocast as PEFT's does (no dropout, one
    adapter: the case that would otherwise take the fused path): a bf16 output, close to PEFT's, and gradients
    as accurate as PEFT's against a float64 oracle. (Compared with PEFT's directly, two bf16 computations differ
    by about their own error: up to 2.6% for one factor's gradient on an AMD EPYC without bf16 instructions, 2-3%
    from the oracle for both libraries; the CPU's bf16 kernels decide the digits.)"""
    _, ours, theirs = _ours_and_peft(torch.float32, use_dora=variant == "dora")
    _randomise_and_copy(ours, theirs)
    oracle = copy.deepcopy(ours).double()
    outs = []
    for model in (ours, theirs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(IDS).logits
        y.float().square().mean().backward()
        outs.append(y)
    oracle(IDS).logits.square().mean().backward()
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outs[0].float(), outs[1].float(), **TOL[torch.bfloat16])
    g_ours, g_theirs, g_ref = _grads(ours), _grads(theirs, peft_names=True), _grads(oracle)
    assert set(g_ours) == set(g_theirs) == set(g_ref) and g_ours
    for k in g_ours:
        assert g_ours[k].dtype == torch.float32
        assert _rel(g_ours[k], g_ref[k]) <= 1.5 * _rel(g_theirs[k], g_ref[k]) + 1e-2, k
        assert _rel(g_ours[k], g_theirs[k]) < 5e-2, k


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_init_match_peft(init):
    _, ours, theirs = _ours_and_peft(init=init, r=3, alpha=6)
    theirs_sd = theirs.state_dict()
    for name, layer in adapter_layers(ours):
        # singular/QR vectors are defined up to sign: compare the product instead of the factors
        prod = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        peer_prod = theirs_sd[f"base_model.model.{name}.lora_B.default.weight"] @ theirs_sd[f"base_model.model.{name}.lora_A.default.weight"]
        torch.testing.assert_close(prod, peer_prod, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.base_layer.weight, theirs_sd[f"base_model.model.{name}.base_layer.weight"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_saved_by_alignlab_loads_in_peft(tmp_path, variant):
    base, ours, _ = _ours_and_peft(use_rslora=variant == "rslora", use_dora=variant == "dora")
    _randomise_and_copy(ours)
    save_adapter(ours, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] == (variant == "dora")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    torch.testing.assert_close(loaded(IDS).logits, ours(IDS).logits, **TOL[torch.float32])


def test_rank_pattern_and_modules_to_save_roundtrip_through_peft(tmp_path):
    base = make_tiny_llama()
    ours = inject(copy.deepcopy(base), LoRAConfig(r=4, alpha=8, target_modules=TARGETS, rank_pattern={r"layers\.1\.self_attn\.q_proj": 2},
                                                  alpha_pattern={"down_proj": 3}, modules_to_save=["lm_head"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in adapter_layers(ours):
            layer.lora_B["default"].weight.copy_(0.2 * torch.randn(layer.lora_B["default"].weight.shape, generator=g))
        ours.lm_head.modules_to_save["default"].weight.add_(0.3)
    save_adapter(ours, tmp_path / "a")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    torch.testing.assert_close(loaded(IDS).logits, ours(IDS).logits, rtol=1e-4, atol=1e-5)
    # and back: PEFT saves, we load
    loaded.save_pretrained(str(tmp_path / "b"))
    again = load_adapter(copy.deepcopy(base), tmp_path / "b")
    torch.testing.assert_close(again(IDS).logits, ours(IDS).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_saved_by_peft_loads_in_alignlab(tmp_path, variant):
    base, _, theirs = _ours_and_peft(use_rslora=variant == "rslora", use_dora=variant == "dora")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = load_adapter(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, **TOL[torch.float32])


def test_linear_combination_matches_peft():
    base = make_tiny_llama()
    ours = copy.deepcopy(base)
    theirs = None
    for name, seed in (("default", 1), ("b", 2)):
        inject(ours, LoRAConfig(r=3, alpha=6, target_modules=["q_proj"]), adapter_name=name)
        cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj"])
        if theirs is None:
            theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
        else:
            theirs.add_adapter(name, cfg)
        g = torch.Generator().manual_seed(seed)
        state = {}
        with torch.no_grad():
            for lname, layer in adapter_layers(ours):
                if name in layer.adapter_names():
                    for key in ("lora_A", "lora_B"):
                        p = getattr(layer, key)[name].weight
                        p.copy_(0.3 * torch.randn(p.shape, generator=g))
                        state[f"base_model.model.{lname}.{key}.{name}.weight"] = p.detach().clone()
        theirs.load_state_dict(state, strict=False)
    add_weighted_adapter(ours, ["default", "b"], [0.6, 0.9], "mix", combination="linear")
    theirs.add_weighted_adapter(["default", "b"], [0.6, 0.9], "mix", combination_type="linear")
    theirs_sd = theirs.state_dict()
    for lname, layer in adapter_layers(ours):
        for key in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer, key)["mix"].weight, theirs_sd[f"base_model.model.{lname}.{key}.mix.weight"])
