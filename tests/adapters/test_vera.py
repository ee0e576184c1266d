"""VeRA: shared frozen projections, identity at init, formula, merge, parameter count, errors."""

import json
import math

import pytest
import torch
from torch import nn

from conftest import config_fields, make_tiny_llama, saved_adapter_config

from alignlab.adapters import VeRAConfig, VeRALinear, VeRAProjections, adapter_layers, count_parameters, disabled, inject, merge, unmerge

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in list(layer.vera_lambda_b.values()) + list(layer.vera_lambda_d.values()):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_identity_shared_projections_and_count():
    base = make_tiny_llama()
    ref = base(IDS).logits
    model = inject(base, VeRAConfig(r=6, target_modules=["q_proj", "v_proj", "up_proj"]))
    torch.testing.assert_close(model(IDS).logits, ref, rtol=0, atol=0)
    layers = [l for _, l in adapter_layers(model)]
    assert len({id(l.projections["default"]) for l in layers}) == 1  # one pair for the whole model
    proj = layers[0].projections["default"]
    cfg = model.config
    assert proj.A.shape == (6, cfg.hidden_size) and proj.B.shape == (cfg.intermediate_size, 6)
    # A, B ~ U(±√(6/fan_in)): the bound holds and the draw is not degenerate
    assert proj.A.abs().max() <= math.sqrt(6 / cfg.hidden_size) and proj.B.abs().max() <= math.sqrt(6 / 6)
    assert not any(b.requires_grad for b in (proj.A, proj.B))
    # paper: out + r trainable numbers per adapted layer
    want = sum(l.out_features + 6 for l in layers)
    assert count_parameters(model).trainable == want
    _randomise(model)
    assert not torch.allclose(model(IDS).logits, ref)
    with disabled(model):
        torch.testing.assert_close(model(IDS).logits, ref, rtol=0, atol=0)


def test_formula_and_merge():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    w0 = lin.weight.detach().clone()
    proj = VeRAProjections(4, 8, 7, seed=3)
    layer = VeRALinear(lin, proj, r=3)
    with torch.no_grad():
        layer.vera_lambda_b["default"].normal_()
        layer.vera_lambda_d["default"].normal_()
    b, d = layer.vera_lambda_b["default"].detach(), layer.vera_lambda_d["default"].detach()
    a_s, b_s = proj.A[:3, :6], proj.B[:5, :3]
    x = torch.randn(2, 3, 6)
    want = x @ lin.weight.T + lin.bias + ((x @ a_s.T) * d) @ b_s.T * b
    torch.testing.assert_close(layer(x), want)
    layer.merge()
    torch.testing.assert_close(layer.base_layer(x), want, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(lin.weight, w0, rtol=0, atol=1e-6)


def test_model_merge_roundtrip():
    model = _randomise(inject(make_tiny_llama(), VeRAConfig(r=4, target_modules=["q_proj", "down_proj"])))
    y = model(IDS).logits
    merge(model)
    torch.testing.assert_close(model(IDS).logits, y, rtol=1e-4, atol=1e-5)
    unmerge(model)
    torch.testing.assert_close(model(IDS).logits, y, rtol=1e-5, atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        VeRAConfig(r=0)
    with pytest.raises(ValueError, match="dropout"):
        VeRAConfig(dropout=1.5)
    with pytest.raises(ValueError, match="too small"):
        VeRALinear(nn.Linear(9, 5), VeRAProjections(4, 8, 7, seed=0), r=3)


def test_config_refuses_a_non_finite_d_initial_and_a_non_integer_seed():
    # d_initial=NaN used to give NaN logits from the first forward (b = 0 times NaN)
    for bad in (float("nan"), float("inf"), "0.1", None, True):
        with pytest.raises((ValueError, TypeError), match="d_initial"):
            VeRAConfig(r=4, d_initial=bad)
    for bad in (1.5, "7", None, True):
        with pytest.raises((ValueError, TypeError), match="projection_prng_key"):
            VeRAConfig(r=4, projection_prng_key=bad)
    VeRAConfig(r=4, d_initial=-0.1, projection_prng_key=0)  # a negative one is a number like any other (0: test_zero_scalings.py)


def test_numpy_d_initial_is_stored_as_a_float(tmp_path):
    # a NumPy scalar passes as a real number; kept as is, it broke save_adapter (not JSON serializable)
    np = pytest.importorskip("numpy")
    from alignlab.adapters import load_adapter, save_adapter

    cfg = VeRAConfig(r=4, target_modules=["q_proj"], d_initial=np.float32(0.25))
    assert type(cfg.d_initial) is float and cfg.d_initial == 0.25
    model = inject(make_tiny_llama(), cfg)
    save_adapter(model, tmp_path)
    load_adapter(make_tiny_llama(), tmp_path)


def test_numpy_scalars_accepted_bools_refused():
    np = pytest.importorskip("numpy")
    cfg = VeRAConfig(r=np.int64(8), dropout=np.float32(0.25), d_initial=np.float32(0.5), projection_prng_key=np.int64(3))
    assert (cfg.r, cfg.dropout, cfg.d_initial, cfg.projection_prng_key) == (8, 0.25, 0.5, 3)
    assert {type(cfg.r), type(cfg.projection_prng_key)} == {int} and type(cfg.dropout) is float
    with pytest.raises(TypeError):
        VeRAConfig(projection_prng_key=True)
    with pytest.raises(ValueError):
        VeRAConfig(r=True)


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_and_alignlab_files_load_as_the_same_config(tmp_path, save_projection):
    """What PEFT writes, and what we write, comes back with the same values and Python types as before."""
    peft = pytest.importorskip("peft")
    kw = dict(r=4, target_modules=["q_proj", "v_proj"], projection_prng_key=3, d_initial=1)
    theirs = peft.VeraConfig(**kw, vera_dropout=0.1, save_projection=save_projection)
    peft.get_peft_model(make_tiny_llama(), theirs).save_pretrained(str(tmp_path / "p"))
    expected = VeRAConfig(**kw, dropout=0.1)
    expected._save_projection = save_projection
    loaded = VeRAConfig.from_peft(json.loads((tmp_path / "p" / "adapter_config.json").read_text()))
    assert config_fields(loaded) == config_fields(expected)
    assert type(loaded.d_initial) is float and type(loaded.projection_prng_key) is int
    # save_adapter writes the model's task type (a tiny LlamaForCausalLM), and it is read back
    assert config_fields(VeRAConfig.from_peft(saved_adapter_config(tmp_path / "a", VeRAConfig(**kw, dropout=0.1)))) == config_fields(
        VeRAConfig(**kw, dropout=0.1, task_type="CAUSAL_LM"))


@pytest.mark.parametrize("field, value, match", [
    ("save_projection", 1, "save_projection must be true or false, got 1"),
    ("save_projection", "false", "save_projection must be true or false"),  # bool("false") is True
    ("r", 2.7, "r must be an integer, got 2.7"),  # int(2.7) would give rank 2
    ("vera_dropout", "0.1", "vera_dropout must be a number, got '0.1'"),
    ("vera_dropout", False, "vera_dropout must be a number"),
    ("d_initial", float("nan"), "d_initial must be a finite number"),
    ("projection_prng_key", 3.5, "projection_prng_key must be an integer"),  # int(3.5) is another seed's matrices
    ("projection_prng_key", "3", "projection_prng_key must be an integer"),
])
def test_config_fields_of_the_wrong_type_are_refused(tmp_path, field, value, match):
    raw = saved_adapter_config(tmp_path, VeRAConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=f"adapter_config.json: {match}"):
        VeRAConfig.from_peft({**raw, field: value})
    del raw["r"]
    with pytest.raises(ValueError, match="adapter_config.json: r is missing"):
        VeRAConfig.from_peft(raw)


def test_seed_outside_torch_generator_range_is_refused_naming_it():
    # 2**64 passed the int check and failed at inject with torch's 'Overflow when unpacking long long'
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="projection_prng_key"):
            VeRAConfig(r=4, projection_prng_key=bad)
        with pytest.raises(ValueError, match="seed"):
            VeRAProjections(2, 4, 4, bad)
    for edge in (2**64 - 1, -(2**63)):  # the ends of the range draw as torch does
        want = torch.Generator().manual_seed(edge)
        bound = (6.0 / 4) ** 0.5
        torch.testing.assert_close(VeRAProjections(2, 4, 4, edge).A, torch.empty(2, 4).uniform_(-bound, bound, generator=want))
