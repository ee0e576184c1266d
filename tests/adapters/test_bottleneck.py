"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) and AdapterFusion."""

import json

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama

from alignlab.adapters import (
    AdapterFusionConfig,
    BottleneckConfig,
    BottleneckLayer,
    adapter_layers,
    count_parameters,
    disabled,
    inject,
    load_adapter,
    merge,
    save_adapter,
    set_adapter,
)
from alignlab.adapters.bottleneck import bottleneck_parameters, fused_parameters

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _randomise(model, name="default", seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            if name in layer.adapter_down:
                for p in list(layer.adapter_up[name].parameters()) + list(layer.adapter_down[name].parameters()):
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("placement, blocks", [("houlsby", 2), ("pfeiffer", 1), ("parallel", 1)])
def test_identity_count_and_disable(placement, blocks):
    base = make_tiny_llama()
    ref = base(IDS).logits
    model = inject(base, BottleneckConfig(reduction_factor=4, placement=placement))
    torch.testing.assert_close(model(IDS).logits, ref, rtol=0, atol=0)
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    assert count_parameters(model).trainable == layers * blocks * (2 * hidden * (hidden // 4) + hidden // 4 + hidden)
    assert bottleneck_parameters(hidden, 4) == 2 * hidden * 8 + 8 + hidden
    _randomise(model)
    assert not torch.allclose(model(IDS).logits, ref)
    with disabled(model):
        torch.testing.assert_close(model(IDS).logits, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot be merged"):
        merge(model)


@pytest.mark.parametrize("parallel", [False, True])
def test_formula(parallel):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    layer = BottleneckLayer(block, hidden=8, bottleneck=3, non_linearity="gelu", parallel=parallel, scaling=2.0)
    with torch.no_grad():
        layer.adapter_up["default"].weight.normal_()
        layer.adapter_up["default"].bias.normal_()
    d, u = layer.adapter_down["default"], layer.adapter_up["default"]
    x = torch.randn(2, 5, 8)
    h = block(x)
    z = x if parallel else h
    want = h + 2.0 * (torch.nn.functional.gelu(z @ d.weight.T + d.bias) @ u.weight.T + u.bias)
    torch.testing.assert_close(layer(x), want)


def test_parallel_flag_takes_numpy_bools_and_refuses_strings():
    np = pytest.importorskip("numpy")
    block = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    layer = BottleneckLayer(block, hidden=8, bottleneck=3, parallel=np.True_)
    assert layer.parallel["default"] is True
    for bad in ("no", 0, None):  # "no" would read the block input instead of its output
        with pytest.raises(TypeError, match="parallel must be a bool"):
            layer.add_adapter("other", 3, parallel=bad)
    assert layer.adapter_names() == ["default"]


def test_fusion_starts_at_average_and_trains_only_fusion(tmp_path):
    base = make_tiny_llama()
    model = inject(base, BottleneckConfig(reduction_factor=4, placement="pfeiffer"), "a")
    inject(model, BottleneckConfig(reduction_factor=4, placement="pfeiffer"), "b")
    _randomise(model, "a", 1)
    _randomise(model, "b", 2)
    inject(model, AdapterFusionConfig(adapters=["a", "b"]), "fusion")
    set_adapter(model, "fusion")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapter_fusion.fusion." in n for n in trainable)
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    assert count_parameters(model).trainable == layers * fused_parameters(hidden)
    # exact average at the start when the query/key projections are zero: V = I, uniform weights
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.adapter_fusion["fusion"].query.weight.zero_()
    y_fused = model(IDS).logits
    set_adapter(model, ["a", "b"])  # the sum of both adapters
    for _, layer in adapter_layers(model):
        for n in ("a", "b"):
            layer.scaling[n] *= 0.5
    torch.testing.assert_close(y_fused, model(IDS).logits, rtol=1e-5, atol=1e-5)
    for _, layer in adapter_layers(model):
        for n in ("a", "b"):
            layer.scaling[n] *= 2.0
    set_adapter(model, "fusion")
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.adapter_fusion["fusion"].query.weight.normal_()
    y = model(IDS).logits
    y.square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    # own file format: adapters first, then the fusion
    for name in ("a", "b", "fusion"):
        save_adapter(model, tmp_path / name, adapter_name=name)
    assert json.loads((tmp_path / "fusion" / "adapter_config.json").read_text())["peft_type"] == "ALIGNLAB_FUSION"
    fresh = make_tiny_llama()
    for name in ("a", "b", "fusion"):
        load_adapter(fresh, tmp_path / name, adapter_name=name)
    set_adapter(fresh, "fusion")
    torch.testing.assert_close(fresh(IDS).logits, y)


def test_config_errors():
    with pytest.raises(ValueError, match="larger than the hidden size"):
        inject(make_tiny_llama(), BottleneckConfig(reduction_factor=64))
    with pytest.raises(ValueError, match="reduction_factor"):
        BottleneckConfig(reduction_factor=0)
    with pytest.raises(ValueError, match="placement"):
        BottleneckConfig(placement="sideways")
    with pytest.raises(ValueError, match="non_linearity"):
        BottleneckConfig(non_linearity="softsign")
    with pytest.raises(ValueError, match="no module matched"):
        inject(make_tiny_llama(), BottleneckConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="at least two"):
        AdapterFusionConfig(adapters=["a"])
    model = inject(make_tiny_llama(), BottleneckConfig(placement="pfeiffer"), "a")
    with pytest.raises(ValueError, match="no block holds"):
        inject(model, AdapterFusionConfig(adapters=["a", "zzz"]), "f")


def test_lora_inside_a_bottleneck_wrapped_block():
    """Block-level wrappers leave their linears targetable: Houlsby adapters + LoRA on q/v together."""
    from alignlab.adapters import LoRAConfig, LoRALinear, add_weighted_adapter

    base = make_tiny_llama()
    ref = base(IDS).logits
    model = inject(base, BottleneckConfig(reduction_factor=4, placement="houlsby"), "ad")
    inject(model, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]), "lo")
    lora = [n for n, l in adapter_layers(model) if isinstance(l, LoRALinear)]
    assert len(lora) == 4 and all(".self_attn.base_layer." in n for n in lora)
    set_adapter(model, ["ad", "lo"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A.lo" in n for n in trainable) and any("adapter_down.ad" in n for n in trainable)
    torch.testing.assert_close(model(IDS).logits, ref, rtol=0, atol=0)  # both start as the identity
    with pytest.raises(ValueError, match="combines LoRA adapters"):
        add_weighted_adapter(model, ["ad", "lo"], [1.0, 1.0], "mix")


def test_config_refuses_a_non_finite_scaling():
    # scaling=NaN used to give NaN logits from the first forward (W_up = 0 times NaN)
    for bad in (float("nan"), float("inf"), "4", None, True):
        with pytest.raises((ValueError, TypeError), match="scaling"):
            BottleneckConfig(scaling=bad)
    BottleneckConfig(placement="parallel", scaling=4)


def test_fusion_temperature_must_be_a_positive_finite_number():
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            AdapterFusionConfig(adapters=["a", "b"], temperature=bad)


def test_numpy_scaling_is_stored_as_a_float(tmp_path):
    np = pytest.importorskip("numpy")
    cfg = BottleneckConfig(placement="parallel", scaling=np.float32(4.0))
    assert type(cfg.scaling) is float and cfg.scaling == 4.0
    save_adapter(inject(make_tiny_llama(), cfg), tmp_path)  # used to fail: float32 is not JSON serializable


def test_numpy_scalars_accepted_bools_refused():
    np = pytest.importorskip("numpy")
    cfg = BottleneckConfig(reduction_factor=np.float32(4), scaling=np.float32(0.5))
    assert (cfg.reduction_factor, cfg.scaling) == (4.0, 0.5)
    assert type(cfg.reduction_factor) is float and type(BottleneckConfig(reduction_factor=np.int64(4)).reduction_factor) is int
    for bad in (True, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="reduction_factor"):
            BottleneckConfig(reduction_factor=bad)


def _saved_config(path, model, name="default") -> dict:
    save_adapter(model, path, adapter_name=name)
    return json.loads((path / "adapter_config.json").read_text())


def test_saved_configs_load_with_the_same_values_and_types(tmp_path):
    model = inject(make_tiny_llama(), BottleneckConfig(reduction_factor=8, scaling=2), "a")
    raw = _saved_config(tmp_path / "a", model, "a")
    loaded = BottleneckConfig.from_peft(raw)
    assert (loaded.reduction_factor, loaded.scaling, loaded.hidden_size) == (8, 2.0, 32)
    assert (type(loaded.reduction_factor), type(loaded.scaling), type(loaded.hidden_size)) == (int, float, int)
    inject(model, BottleneckConfig(), "b")
    inject(model, AdapterFusionConfig(adapters=["a", "b"], temperature=2), "fusion")
    assert AdapterFusionConfig.from_peft(_saved_config(tmp_path / "f", model, "fusion")).temperature == 2.0


@pytest.mark.parametrize("field, value, match", [
    ("hidden_size", 2.7, "hidden_size must be an integer, got 2.7"),  # int(2.7) in prepare: 2-wide adapters
    ("hidden_size", "32", "hidden_size must be an integer"),
    ("hidden_size", True, "hidden_size must be an integer"),
    ("reduction_factor", "8", "reduction_factor must be a number"),
    ("reduction_factor", True, "reduction_factor must be a number"),
    ("scaling", float("nan"), "scaling must be a finite number"),
])
def test_bottleneck_config_fields_of_the_wrong_type_are_refused(tmp_path, field, value, match):
    raw = _saved_config(tmp_path, inject(make_tiny_llama(), BottleneckConfig()))
    with pytest.raises(ValueError, match=f"adapter_config.json: {match}"):
        BottleneckConfig.from_peft({**raw, field: value})
    assert BottleneckConfig.from_peft({**raw, "hidden_size": None}).hidden_size is None  # the model's width


def test_fusion_temperature_in_the_file_must_be_a_number():
    raw = {"peft_type": "ALIGNLAB_FUSION", "format_version": 1, "adapters": ["a", "b"]}
    for bad, match in (("2", "must be a number"), (True, "must be a number"), (float("inf"), "must be a finite number")):
        with pytest.raises(ValueError, match=f"adapter_config.json: temperature {match}"):
            AdapterFusionConfig.from_peft({**raw, "temperature": bad})


def test_config_hidden_size_must_be_a_positive_int():
    """BottleneckConfig(hidden_size=2.7) used to reach int() in prepare (2-wide blocks); NumPy ints are taken."""
    np = pytest.importorskip("numpy")
    assert type(BottleneckConfig(hidden_size=np.int64(32)).hidden_size) is int
    for bad in (2.7, "32", True, 0, -4):
        with pytest.raises(ValueError, match="hidden_size must be None or a positive int"):
            BottleneckConfig(hidden_size=bad)


def test_find_targets_asks_configs_that_choose_their_own_targets():
    """alignlab.adapters.find_targets returns what inject adapts for configs with their own rule (bottleneck blocks,
    the prompt embedding), as for LoRA (it refused the blocks and raised AttributeError for prompt tuning)."""
    from alignlab.adapters import PromptTuningConfig, find_targets

    model = make_tiny_llama()
    want = find_targets(model, BottleneckConfig())
    assert want and all(n.endswith(("self_attn", "mlp")) for n in want)
    inject(model, BottleneckConfig())
    adapted = sorted(n for n, m in model.named_modules() if type(m).__name__ == "BottleneckLayer")
    assert adapted == sorted(want)
    assert find_targets(make_tiny_llama(), PromptTuningConfig(num_virtual_tokens=4)) == ["model.embed_tokens"]
