"""(IA)³: identity at init, the paper's formula, merge/unmerge, parameter count, errors."""

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama

from alignlab.adapters import IA3Config, IA3Linear, adapter_layers, count_parameters, disabled, inject, merge, unmerge

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in layer.ia3_l.values():
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model


def test_identity_at_init_and_disabled():
    base = make_tiny_llama()
    ref = base(IDS).logits
    model = inject(base, IA3Config())
    torch.testing.assert_close(model(IDS).logits, ref, rtol=0, atol=0)
    _randomise(model)
    assert not torch.allclose(model(IDS).logits, ref)
    with disabled(model):
        torch.testing.assert_close(model(IDS).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("feedforward", [False, True])
def test_formula(feedforward):
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    layer = IA3Linear(lin, feedforward=feedforward, init_ones=False)
    x = torch.randn(3, 4, 6)
    l = layer.ia3_l["default"].detach()
    want = (x * l) @ lin.weight.T + lin.bias if feedforward else l * (x @ lin.weight.T + lin.bias)
    y = layer(x)
    assert y.shape == (3, 4, 5)
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("feedforward", [False, True])
def test_merge_unmerge(feedforward):
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    layer = IA3Linear(lin, feedforward=feedforward, init_ones=False)
    x = torch.randn(4, 6)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.base_layer(x), y, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(lin.weight, w0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lin.bias, b0, rtol=1e-6, atol=1e-7)


def test_model_merge_and_parameter_count():
    model = _randomise(inject(make_tiny_llama(), IA3Config()))
    y = model(IDS).logits
    merge(model)
    torch.testing.assert_close(model(IDS).logits, y, rtol=1e-4, atol=1e-5)
    unmerge(model)
    # paper: one vector per key/value output and per FFN (down_proj) input
    cfg = model.config
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    assert count_parameters(model).trainable == cfg.num_hidden_layers * (2 * kv + cfg.intermediate_size)


def test_config_errors():
    with pytest.raises(ValueError, match="subset of target_modules"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(TypeError, match="target_modules"):
        IA3Config(target_modules=[])
    with pytest.raises(ValueError, match="no module matched"):
        inject(make_tiny_llama(), IA3Config(target_modules=["nope"], feedforward_modules=[]))
    layer = IA3Linear(nn.Linear(3, 2))
    with torch.no_grad():
        layer.ia3_l["default"][0] = 0
    with pytest.raises(ValueError, match="zero entries"):
        layer.merge()
    with pytest.raises(TypeError, match="nn.Linear"):
        IA3Linear(nn.Conv1d(2, 2, 1))


def test_config_init_ones_must_be_a_bool():
    with pytest.raises(TypeError, match="init_ones"):
        IA3Config(init_ones="yes")
    for bad in (0, 1, None):
        with pytest.raises(TypeError, match="init_ones must be a bool"):
            IA3Config(init_ones=bad)


def test_numpy_bool_flags_act_as_python_bools():
    np = pytest.importorskip("numpy")
    assert IA3Config(init_ones=np.False_).init_ones is False
    layer = IA3Linear(nn.Linear(6, 4), feedforward=np.True_, init_ones=np.True_)
    assert layer.feedforward is True
    torch.testing.assert_close(layer.ia3_l["default"].detach(), torch.ones(6))  # input scaling, identity
    for kw, name in ((dict(feedforward="no"), "feedforward"), (dict(feedforward=0), "feedforward"),
                     (dict(init_ones=1), "init_ones"), (dict(init_ones="no"), "init_ones")):
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            IA3Linear(nn.Linear(6, 4), **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("feedforward", [False, True])
def test_half_precision_merge_is_the_exact_product_rounded_once(dtype, feedforward):
    """Guard: the fp32 vector is folded into a 16-bit weight in fp32 and rounded once; a product taken in the
    weight's dtype (l rounded first) misses the once-rounded fp64 formula on hundreds of these entries."""
    torch.manual_seed(0)
    base = nn.Linear(64, 48).to(dtype)
    with torch.no_grad():
        base.weight.mul_(torch.logspace(-6, 2, 64).to(dtype))  # down to fp16's subnormal range
    w0, b0 = base.weight.detach().double(), base.bias.detach().double()
    layer = IA3Linear(base, feedforward=feedforward, init_ones=False)
    l = layer.ia3_l["default"].detach().double()
    layer.merge()
    want = w0 * (l[None, :] if feedforward else l[:, None])
    assert torch.equal(layer.base_layer.weight.detach(), want.to(dtype))
    assert torch.equal(layer.base_layer.bias.detach(), (b0 if feedforward else b0 * l).to(dtype))


@pytest.mark.parametrize("feedforward, where", [(False, "weight"), (True, "weight"), (False, "bias")])
def test_float16_merge_beyond_the_range_is_refused_and_writes_nothing(feedforward, where):
    # W·l above 65504 rounded to inf and was written into the model (the additive families refuse it already)
    base = nn.Linear(4, 3).half()
    with torch.no_grad():
        base.weight.fill_(0.5)
        base.bias.fill_(0.5)
        getattr(base, where)[0] = 30000.0
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = IA3Linear(base, feedforward=feedforward)
    with torch.no_grad():
        layer.ia3_l["default"].fill_(4.0)
    with pytest.raises(ValueError, match="float16"):
        layer.merge()
    assert torch.equal(base.weight, w0) and torch.equal(base.bias, b0) and not layer.merged_adapters


def test_a_second_adapter_scaling_the_other_side_of_a_layer_is_refused_before_any_change():
    # a layer scales one side for all its adapters: "b" asked for input scaling of o_proj (square: silently got
    # output scaling) and of down_proj (another length: the file then failed to load)
    model = inject(make_tiny_llama(), IA3Config(target_modules=["k_proj", "o_proj"], feedforward_modules=[]), "a")
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.o_proj' already holds .* scaling its output"):
        inject(model, IA3Config(target_modules=["k_proj", "o_proj"], feedforward_modules=["o_proj"]), "b")
    assert all(layer.adapter_names() == ["a"] for _, layer in adapter_layers(model))  # k_proj did not get "b"
    inject(model, IA3Config(target_modules=["k_proj", "o_proj"], feedforward_modules=[]), "b")  # same sides: fine


@pytest.mark.parametrize("feedforward", [False, True])
def test_unmerge_on_a_quantized_base_puts_the_bias_back(feedforward):
    """Output scaling merges ``l`` into the bias too; on an NF4 base unmerge put back the packed weight but left the
    bias multiplied by ``l``, so the layer after unmerge differed from the one before merge."""
    import warnings

    from alignlab.quant import NF4Linear

    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(64, 24), blocksize=32, compute_dtype=torch.float32)
    layer = IA3Linear(base, feedforward=feedforward)
    with torch.no_grad():
        layer.ia3_l["default"].add_(torch.randn(layer.ia3_l["default"].shape) * 0.3)
    x = torch.randn(3, 64)
    before, bias = layer(x), base.bias.detach().clone()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="merging into a quantized base")
        layer.merge()
    layer.unmerge()
    assert torch.equal(base.bias, bias)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
