"""LoKr / KronA: factorization, the Kronecker identity, identity at init, merge, parameter count, errors."""

import json
import warnings

import pytest
import torch
from torch import nn

from conftest import config_fields, make_tiny_llama, saved_adapter_config

from alignlab.adapters import (LoKrConfig, LoKrLinear, adapter_layers, count_parameters, disabled, factorization, inject, merge,
                               save_adapter, unmerge)

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def test_factorization_examples():
    assert factorization(256) == (16, 16)
    assert factorization(128) == (8, 16)
    assert factorization(127) == (1, 127)
    assert factorization(72) == (8, 9)
    assert factorization(128, 4) == (4, 32)
    assert factorization(72, 5) == (4, 18)  # 5 does not divide: largest divisor ≤ 5


@pytest.mark.parametrize("r, decompose_both", [(1, False), (2, True), (64, False)])
def test_forward_equals_dense_kron(r, decompose_both):
    torch.manual_seed(0)
    lin = nn.Linear(24, 18)
    layer = LoKrLinear(lin, r=r, alpha=3.0, decompose_both=decompose_both, init_zero=False)
    w1, w2 = layer.factors("default")
    delta = (3.0 / r) * torch.kron(w1, w2).detach()  # written out: s · W₁ ⊗ W₂
    assert delta.shape == (18, 24)
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(layer(x), lin(x) + x @ delta.T, rtol=1e-5, atol=1e-5)
    full2 = "default" in layer.lokr_w2
    assert full2 == (r >= max(w2.shape) / 2)


def test_identity_merge_and_count():
    base = make_tiny_llama()
    ref = base(IDS).logits
    model = inject(base, LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.testing.assert_close(model(IDS).logits, ref, rtol=0, atol=0)
    g = torch.Generator().manual_seed(2)
    want = 0
    for _, layer in adapter_layers(model):
        (o1, i1), (o2, i2) = layer.shapes()
        r = 2
        want += (o1 * i1) + (o2 * i2 if r >= max(o2, i2) / 2 else r * (o2 + i2))
        with torch.no_grad():
            for p in layer.parameters():
                if p.requires_grad:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
    assert count_parameters(model).trainable == want
    y = model(IDS).logits
    assert not torch.allclose(y, ref)
    with disabled(model):
        torch.testing.assert_close(model(IDS).logits, ref, rtol=0, atol=0)
    merge(model)
    torch.testing.assert_close(model(IDS).logits, y, rtol=1e-4, atol=1e-5)
    unmerge(model)
    torch.testing.assert_close(model(IDS).logits, y, rtol=1e-5, atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="r must be"):
        LoKrConfig(r=0)
    with pytest.raises(ValueError, match="decompose_factor"):
        LoKrConfig(decompose_factor=0)
    with pytest.raises(ValueError, match="alpha"):
        LoKrLinear(nn.Linear(4, 4), alpha=-1.0)


def test_config_flags_must_be_bools():
    # decompose_both="no" is truthy: it used to decompose silently
    for field in ("decompose_both", "init_zero"):
        with pytest.raises(TypeError, match=field):
            LoKrConfig(**{field: "no"})


def test_numpy_bool_flags_are_python_bools_in_the_layers_and_the_file(tmp_path):
    """np.bool_ from a sweep acts as the Python bool; adapter_config.json gets a JSON boolean."""
    import json

    np = pytest.importorskip("numpy")
    cfg = LoKrConfig(r=1, decompose_both=np.True_, init_zero=np.False_, target_modules=["q_proj"])
    assert cfg.decompose_both is True and cfg.init_zero is False
    from alignlab.adapters import save_adapter

    save_adapter(inject(make_tiny_llama(), cfg), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["decompose_both"] is True
    torch.manual_seed(0)
    ours = LoKrLinear(nn.Linear(16, 16), r=1, decompose_both=np.True_, init_zero=np.False_)
    torch.manual_seed(0)
    ref = LoKrLinear(nn.Linear(16, 16), r=1, decompose_both=True, init_zero=False)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in ours.state_dict().items())
    for kw in ({"decompose_both": 1}, {"init_zero": 0}, {"decompose_both": "no"}):
        with pytest.raises(TypeError, match=f"{next(iter(kw))} must be a bool"):
            LoKrConfig(**kw)
        with pytest.raises(TypeError, match=f"{next(iter(kw))} must be a bool"):
            LoKrLinear(nn.Linear(16, 16), **kw)


def test_numpy_scalars_accepted_bools_refused():
    np = pytest.importorskip("numpy")
    cfg = LoKrConfig(r=np.int64(4), alpha=np.float32(8), decompose_factor=np.int16(2))
    assert (cfg.r, cfg.alpha, cfg.decompose_factor) == (4, 8.0, 2)
    assert (type(cfg.r), type(cfg.alpha), type(cfg.decompose_factor)) == (int, float, int)
    for kw in ({"r": True}, {"alpha": float("nan")}, {"decompose_factor": True}):
        with pytest.raises(ValueError):
            LoKrConfig(**kw)


def test_peft_and_alignlab_files_load_as_the_same_config(tmp_path):
    """What PEFT writes, and what we write, comes back with the same values and Python types as before."""
    peft = pytest.importorskip("peft")
    kw = dict(r=1, alpha=2, target_modules=["o_proj", "up_proj"], decompose_both=True, decompose_factor=4)
    peft.get_peft_model(make_tiny_llama(), peft.LoKrConfig(**kw)).save_pretrained(str(tmp_path / "p"))
    expected = LoKrConfig(**{**kw, "alpha": 2.0})  # a JSON number for alpha loads as a float
    assert config_fields(LoKrConfig.from_peft(json.loads((tmp_path / "p" / "adapter_config.json").read_text()))) == config_fields(expected)
    # save_adapter writes the model's task type (a tiny LlamaForCausalLM), and it is read back
    assert config_fields(LoKrConfig.from_peft(saved_adapter_config(tmp_path / "a", LoKrConfig(**kw)))) == \
        config_fields(expected) | {"task_type": ("CAUSAL_LM", str)}


@pytest.mark.parametrize("field, value, match", [
    ("decompose_both", "false", "decompose_both must be true or false, got 'false'"),  # bool("false") is True
    ("decompose_both", 1, "decompose_both must be true or false"),
    ("r", 2.7, "r must be an integer, got 2.7"),  # int(2.7) would give a rank-2 adapter
    ("r", True, "r must be an integer"),
    ("alpha", "6", "alpha must be a number"),
    ("alpha", float("inf"), "alpha must be a finite number"),
    ("decompose_factor", 4.5, "decompose_factor must be an integer"),
    ("decompose_factor", "4", "decompose_factor must be an integer"),
])
def test_config_fields_of_the_wrong_type_are_refused(tmp_path, field, value, match):
    raw = saved_adapter_config(tmp_path, LoKrConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=f"adapter_config.json: {match}"):
        LoKrConfig.from_peft({**raw, field: value})
    del raw["r"]
    with pytest.raises(ValueError, match="adapter_config.json: r is missing"):
        LoKrConfig.from_peft(raw)


def test_unused_rank_and_alpha_pattern_keys_warn_as_for_lora():
    # a typo trained at the default rank / alpha without a word (PEFT 0.21 warns for every method)
    cfg = LoKrConfig(r=2, target_modules=["q_proj", "v_proj"], rank_pattern={"v_prj": 4, "q_proj": 3},
                     alpha_pattern={r"layers\.9\..*": 1.0})
    with pytest.warns(RuntimeWarning) as record:
        model = inject(make_tiny_llama(), cfg)
    messages = [str(w.message) for w in record]
    assert any("rank_pattern keys ['v_prj']" in m for m in messages)
    assert any("alpha_pattern keys ['layers\\\\.9\\\\..*']" in m for m in messages)
    assert model.model.layers[0].self_attn.q_proj.r["default"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject(make_tiny_llama(), LoKrConfig(r=2, target_modules=["q_proj"], rank_pattern={"q_proj": 3}))


@pytest.mark.parametrize("dimension,factor,err", [(-4, -1, ValueError), (True, -1, TypeError), (4.0, -1, TypeError),
                                                  (12, 2.0, TypeError), (12, None, TypeError)])
def test_factorization_checks_its_arguments(dimension, factor, err):
    """A negative, bool or float dimension (and a non-int factor) is refused by name; isqrt's unnamed error and
    factorization(True) == (1, True) before."""
    from alignlab.adapters.kron import factorization

    with pytest.raises(err, match="dimension|factor"):
        factorization(dimension, factor)
    assert factorization(12, 2) == (2, 6) and factorization(0) == (0, 1)
