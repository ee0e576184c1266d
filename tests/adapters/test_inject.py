"""Injection, named adapters, disable/merge/unload, trainable marking and error paths."""

import json
import math
import warnings

import numpy as np

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama

from alignlab.adapters import (
    LoRAConfig,
    LoRALinear,
    SavedModule,
    active_adapters,
    adapter_configs,
    adapter_layers,
    add_weighted_adapter,
    count_parameters,
    delete_adapter,
    disabled,
    find_targets,
    inject,
    merge,
    merge_and_unload,
    save_adapter,
    set_adapter,
    unmerge,
)

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _randomise(model, name="default", seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            if name in layer.adapter_names():
                b = layer.lora_B[name].weight
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def test_target_forms():
    model = make_tiny_llama()
    assert all(n.endswith(("q_proj", "v_proj")) for n in find_targets(model, LoRAConfig(target_modules=["q_proj", "v_proj"])))
    assert len(find_targets(model, LoRAConfig(target_modules=["q_proj", "v_proj"]))) == 4
    assert find_targets(model, LoRAConfig(target_modules=r".*layers\.1\.mlp\.(up|down)_proj")) == [
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    all_linear = find_targets(model, LoRAConfig(target_modules="all-linear"))
    assert len(all_linear) == 2 * 7 and "lm_head" not in all_linear
    excl = find_targets(model, LoRAConfig(target_modules="all-linear", exclude_modules=["o_proj", "gate_proj"]))
    assert len(excl) == 2 * 5
    # "all-linear" is no exclusion (read as a regex it matched nothing: a warning, every target kept); a bad regex
    # is named when the config is made
    with pytest.raises(ValueError, match="exclude_modules='all-linear' would exclude every target"):
        LoRAConfig(target_modules=["q_proj"], exclude_modules="all-linear")
    with pytest.raises(ValueError, match="exclude_modules: '\\(' is not a valid regular expression"):
        LoRAConfig(target_modules=["q_proj"], exclude_modules="(")


def test_rank_and_alpha_patterns():
    model = inject(make_tiny_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                                                 rank_pattern={r"layers\.0\.self_attn\.q_proj": 2}, alpha_pattern={"v_proj": 3}))
    layers = dict(adapter_layers(model))
    assert layers["model.layers.0.self_attn.q_proj"].r["default"] == 2
    assert layers["model.layers.1.self_attn.q_proj"].r["default"] == 4
    assert layers["model.layers.0.self_attn.v_proj"].alpha["default"] == 3
    assert layers["model.layers.0.self_attn.q_proj"].alpha["default"] == 8


def test_no_match_lists_what_exists():
    with pytest.raises(ValueError, match=r"no module matched.*q_proj"):
        inject(make_tiny_llama(), LoRAConfig(target_modules=["query"]))


@pytest.mark.parametrize("target, fix", [("q_proj", r"target_modules=['q_proj']"), ("(q|v)_proj", r".*\.((q|v)_proj)")])
def test_a_string_target_that_names_a_suffix_says_strings_are_full_name_regexes(target, fix):
    with pytest.raises(ValueError, match="regular expression matched against the whole module name") as err:
        inject(make_tiny_llama(), LoRAConfig(target_modules=target))
    assert fix in str(err.value)
    with pytest.raises(ValueError) as err:
        inject(make_tiny_llama(), LoRAConfig(target_modules=["query"]))
    assert "regular expression" not in str(err.value)


def test_inject_starts_at_base_and_freezes_base():
    model = make_tiny_llama()
    ref = model(IDS).logits
    inject(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    torch.testing.assert_close(model(IDS).logits, ref)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # trainable count = Σ r·(in + out) over adapted layers (LoRA's parameter formula)
    expected = sum(4 * (l.in_features + l.out_features) for _, l in adapter_layers(model))
    count = count_parameters(model)
    assert count.trainable == expected
    assert count.total == sum(p.numel() for p in model.parameters())


def test_count_parameters_counts_an_nf4_base_by_its_logical_elements():
    # QLoRA: the NF4 base holds out*in weights whatever its packing, so counts equal the dense model's
    from alignlab.quant import quantize_model

    config = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    dense = count_parameters(inject(make_tiny_llama(), config))
    quantized = inject(quantize_model(make_tiny_llama(), compute_dtype=torch.float32), config)
    assert count_parameters(quantized) == dense
    assert dense.total == sum(p.numel() for p in make_tiny_llama().parameters()) + dense.trainable


def test_disabled_equals_base_and_restores():
    model = make_tiny_llama()
    ref = model(IDS).logits
    _randomise(inject(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear", modules_to_save=["lm_head"])))
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.add_(0.5)
    adapted = model(IDS).logits
    assert not torch.allclose(adapted, ref)
    with disabled(model):
        torch.testing.assert_close(model(IDS).logits, ref)
    torch.testing.assert_close(model(IDS).logits, adapted)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_disabled_warns_that_a_pissa_or_olora_base_is_the_residual(init):
    """PiSSA / OLoRA leave W - s·BA in the base, so disabled(model) is the residual model, not the original (a DPO
    reference would be silently wrong): it runs, as in PEFT, with a UserWarning naming the adapter and init."""
    import warnings

    model = make_tiny_llama()
    ref = model(IDS).logits
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init=init))
    with pytest.warns(UserWarning, match=f"init='{init}'.*residual.*not the original"):
        with torch.no_grad(), disabled(model):
            residual = model(IDS).logits
    assert not torch.allclose(residual, ref, atol=1e-3)
    plain = inject(make_tiny_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with disabled(plain):
            pass


def test_disabled_on_a_model_without_adapters_raises():
    # a DPO reference "disabled" from a model that never got adapters is the policy itself
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="no adapter layers"):
        with disabled(model):
            pass


def test_active_adapters_follows_inject_set_and_delete():
    from alignlab.adapters import active_adapters

    model = make_tiny_llama()
    assert active_adapters(model) == []
    inject(model, LoRAConfig(target_modules=["q_proj"]))
    inject(model, LoRAConfig(target_modules=["q_proj"]), adapter_name="other")
    assert active_adapters(model) == ["default"]
    set_adapter(model, ["default", "other"])
    active_adapters(model).append("x")  # a copy
    assert active_adapters(model) == ["default", "other"]
    delete_adapter(model, "other")
    assert active_adapters(model) == ["default"]


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_unmerge_and_unload(use_dora):
    model = make_tiny_llama()
    w_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    _randomise(inject(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear", use_dora=use_dora)))
    adapted = model(IDS).logits
    merge(model)
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        with disabled(model):
            pass
    unmerge(model)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.base_layer.weight, w_before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-4, atol=1e-5)
    plain = merge_and_unload(model)
    assert not list(adapter_layers(plain))
    assert isinstance(plain.model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(plain(IDS).logits, adapted, rtol=1e-4, atol=1e-5)


def test_named_adapters_switch_combine_delete():
    model = make_tiny_llama()
    ref = model(IDS).logits
    inject(model, LoRAConfig(r=2, alpha=2, target_modules=["q_proj", "v_proj"]))
    inject(model, LoRAConfig(r=3, alpha=6, target_modules=["q_proj", "v_proj"]), adapter_name="b")
    _randomise(model, "default", 1)
    _randomise(model, "b", 2)
    out_a = model(IDS).logits  # the second adapter is added inactive
    set_adapter(model, "b")
    out_b = model(IDS).logits
    assert not torch.allclose(out_a, out_b)
    # only the active adapter trains
    assert all(("b" in n.split(".")) for n, p in model.named_parameters() if p.requires_grad)
    with disabled(model):
        torch.testing.assert_close(model(IDS).logits, ref)
    with pytest.raises(ValueError, match="not found"):
        set_adapter(model, "nope")
    with pytest.raises(ValueError, match="already exists"):
        inject(model, LoRAConfig(target_modules=["q_proj"]), adapter_name="b")
    with pytest.warns(UserWarning, match="'b' was active and is deleted: 'default' is now the active adapter"):
        delete_adapter(model, "b")  # PEFT activates a remaining adapter too; the model ran as the bare base
    assert active_adapters(model) == ["default"]
    torch.testing.assert_close(model(IDS).logits, out_a)
    assert all(("default" in n.split(".")) for n, p in model.named_parameters() if p.requires_grad)


def test_deleting_one_of_several_active_adapters_keeps_the_others_without_a_warning():
    model = make_tiny_llama()
    for i, name in enumerate(("a", "b", "c")):
        inject(model, LoRAConfig(r=2, target_modules=["q_proj"]), adapter_name=name)
        _randomise(model, name, i)
    set_adapter(model, ["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        delete_adapter(model, "a")  # "b" is still active
        assert active_adapters(model) == ["b"]
        delete_adapter(model, "c")  # an inactive one
        assert active_adapters(model) == ["b"]
        delete_adapter(model, "b")  # the last one: nothing left to activate
    assert active_adapters(model) == [] and not list(adapter_layers(model))


def _delta(layer, name):
    return layer.delta_weight(name)


@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_weighted_combination_is_weighted_sum_of_deltas(combination):
    model = make_tiny_llama()
    inject(model, LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    inject(model, LoRAConfig(r=3, alpha=3, target_modules=["q_proj", "v_proj"]), adapter_name="b")
    _randomise(model, "default", 1)
    _randomise(model, "b", 2)
    add_weighted_adapter(model, ["default", "b"], [0.7, -0.4], "mix", combination=combination, rank=5)
    for _, layer in adapter_layers(model):
        expected = 0.7 * _delta(layer, "default") - 0.4 * _delta(layer, "b")
        torch.testing.assert_close(_delta(layer, "mix"), expected, rtol=1e-4, atol=1e-6)


def test_weighted_combination_errors():
    model = inject(make_tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="combination must be"):
        add_weighted_adapter(model, ["default"], [1.0], "x", combination="ties")
    with pytest.raises(ValueError, match="equal length"):
        add_weighted_adapter(model, ["default"], [1.0, 2.0], "x")
    with pytest.raises(ValueError, match="positive rank"):
        add_weighted_adapter(model, ["default"], [1.0], "x", combination="svd")


def test_modules_to_save_trains_a_copy():
    model = make_tiny_llama()
    inject(model, LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert isinstance(model.lm_head, SavedModule)
    assert model.lm_head.modules_to_save["default"].weight.requires_grad
    assert not model.lm_head.original_module.weight.requires_grad
    with pytest.raises(ValueError, match="modules_to_save"):
        inject(make_tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["nothing"]))


def test_plain_module_tree_works():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    inject(model, LoRAConfig(r=2, target_modules="all-linear"))
    assert isinstance(model[0], LoRALinear) and isinstance(model[2], LoRALinear)
    model(torch.randn(3, 8)).sum().backward()
    assert model[0].lora_A["default"].weight.grad is not None


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"r": 0}, ValueError, "r must be a positive"),
        ({"init": "nope"}, ValueError, "init must be one of"),
        ({"target_modules": 3}, TypeError, "target_modules"),
        ({"target_modules": "("}, ValueError, "not a valid regular expression"),
        ({"rank_pattern": {"q": 0}}, ValueError, "rank_pattern"),
        ({"alpha": -1}, ValueError, "alpha"),
        # a truthy string or None must not switch a flag silently
        ({"use_rslora": "yes"}, TypeError, "use_rslora must be a bool"),
        ({"use_dora": 1}, TypeError, "use_dora must be a bool"),
        ({"use_dora": None}, TypeError, "use_dora must be a bool"),
        ({"use_rslora": 0}, TypeError, "use_rslora must be a bool"),
        ({"exact_fp32": "no"}, TypeError, "exact_fp32 must be a bool"),
        ({"exact_fp32": 1}, TypeError, "exact_fp32 must be a bool"),
        ({"include_experts": 0}, TypeError, "include_experts must be a bool"),
        ({"ensure_weight_tying": "no"}, TypeError, "ensure_weight_tying must be a bool"),
        ({"use_rslora": np.array(True)}, TypeError, "use_rslora must be a bool"),
        ({"init": None}, TypeError, "init must be a string"),
        ({"adapter_dtype": "bf16"}, TypeError, "adapter_dtype must be None or a floating-point torch.dtype"),
        ({"adapter_dtype": torch.int8}, TypeError, "adapter_dtype must be None or a floating-point torch.dtype"),
    ],
)
def test_config_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LoRAConfig(**kwargs)


def test_numpy_bool_flags_are_stored_as_python_bools_and_saved_as_json_booleans(tmp_path):
    """A sweep hands over np.bool_: it acts as the Python bool would, and adapter_config.json gets true/false
    (json cannot write an np.bool_, so a flag kept as given would break save_adapter)."""
    flags = dict(use_rslora=np.True_, use_dora=np.False_, exact_fp32=np.True_, include_experts=np.False_,
                 ensure_weight_tying=np.False_)
    config = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], **flags)
    assert all(type(getattr(config, k)) is bool and getattr(config, k) == v for k, v in flags.items())
    model = inject(make_tiny_llama(), config)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.exact_fp32 is True and layer.use_rslora["default"] is True and not layer.is_dora("default")
    assert layer.scaling["default"] == 8 / math.sqrt(4)  # rsLoRA: α/√r
    save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["use_rslora"] is True and raw["use_dora"] is False and raw["ensure_weight_tying"] is False


def test_inject_type_errors():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        inject("model", LoRAConfig())
    with pytest.raises(TypeError, match="config must be"):
        inject(make_tiny_llama(), {"r": 2})
    with pytest.raises(ValueError, match="nothing to merge"):
        merge(make_tiny_llama())


def test_set_adapter_and_merge_take_one_name_as_a_string():
    model = make_tiny_llama()
    inject(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    inject(model, LoRAConfig(r=2, target_modules=["q_proj"]), adapter_name="other")
    with pytest.raises(TypeError, match="names must be an adapter name or an iterable of names"):
        set_adapter(model, 5)
    with pytest.raises(TypeError, match="names must be an adapter name or an iterable of names"):
        set_adapter(model, ["other", 5])
    set_adapter(model, {"default": 1, "other": 2}.keys())  # any iterable of names
    assert model.model.layers[0].self_attn.q_proj.active_adapters == ["default", "other"]
    set_adapter(model, "default")
    merge(model, "other")  # one name, not its letters 'o', 't', ...
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.merged_adapters == ["other"]
    unmerge(model)
    with pytest.raises(TypeError, match="adapter_names must be an adapter name or an iterable of names"):
        merge(model, 3)
    plain = merge_and_unload(model, "other")
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "0.5", True])
def test_add_weighted_adapter_refuses_non_finite_weights(weight):
    model = make_tiny_llama()
    inject(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises((TypeError, ValueError), match=r"weights\[0\]"):
        add_weighted_adapter(model, ["default"], [weight], "mix")
    assert "mix" not in adapter_configs(model)


@pytest.mark.parametrize("unload", [False, True])
def test_merge_into_a_tied_head_unties_it_with_a_warning(unload):
    """A LoRA on an lm_head tied to the input embedding: merging must not move the embedding."""
    import warnings

    model = make_tiny_llama()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as Llama-3.2 / Gemma checkpoints are
    embed = model.model.embed_tokens.weight.detach().clone()
    inject(model, LoRAConfig(r=2, alpha=4, target_modules=["lm_head"]))
    with torch.no_grad():
        model.lm_head.lora_B["default"].weight.normal_(0, 0.5)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with pytest.warns(UserWarning, match="tied"):
        out = merge_and_unload(model) if unload else merge(model)
    torch.testing.assert_close(out.model.embed_tokens.weight, embed, rtol=0, atol=0)
    assert out.config.tie_word_embeddings is False
    with torch.no_grad():
        torch.testing.assert_close(out(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once untied, nothing more to warn about
        if not unload:
            unmerge(out)
            merge(out)
