"""BitFit: bias offsets, identity at init, merge (also into bias-less linears), counts, own file format, errors."""

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama

from alignlab.adapters import (BitFitConfig, BitFitLayer, adapter_layers, count_parameters, disabled, inject, load_adapter, merge,
                               merge_and_unload, save_adapter, unmerge)

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in layer.bitfit_bias.values():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def test_formula_and_merge_with_existing_bias():
    torch.manual_seed(0)
    lin = nn.Linear(5, 4)
    b0 = lin.bias.detach().clone()
    layer = BitFitLayer(lin)
    with torch.no_grad():
        layer.bitfit_bias["default"].normal_()
    x = torch.randn(3, 5)
    want = x @ lin.weight.T + b0 + layer.bitfit_bias["default"].detach()
    torch.testing.assert_close(layer(x), want)
    layer.merge()
    torch.testing.assert_close(lin(x), want)
    layer.unmerge()
    torch.testing.assert_close(lin.bias, b0)


def test_llama_all_linear_identity_count_merge():
    base = make_tiny_llama()
    ref = base(IDS).logits
    with pytest.raises(ValueError, match="no bias parameters"):
        inject(make_tiny_llama(), BitFitConfig())
    model = inject(base, BitFitConfig(target_modules="all-linear"))
    torch.testing.assert_close(model(IDS).logits, ref, rtol=0, atol=0)
    # one bias per output unit of every linear except the head
    want = sum(m.out_features for n, m in make_tiny_llama().named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    assert count_parameters(model).trainable == want
    _randomise(model)
    y = model(IDS).logits
    with disabled(model):
        torch.testing.assert_close(model(IDS).logits, ref, rtol=0, atol=0)
    merge(model)
    q = model.model.layers[0].self_attn.q_proj.base_layer
    assert q.bias is not None and not q.bias.requires_grad
    torch.testing.assert_close(model(IDS).logits, y, rtol=1e-5, atol=1e-5)
    unmerge(model)
    assert q.bias is None
    torch.testing.assert_close(model(IDS).logits, y, rtol=1e-5, atol=1e-5)


def test_subset_and_own_format_roundtrip(tmp_path):
    model = _randomise(inject(make_tiny_llama(), BitFitConfig(target_modules=["q_proj", "up_proj"])))
    assert len(list(adapter_layers(model))) == 4
    save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "ALIGNLAB_BITFIT" and raw["format_version"] == 1
    fresh = load_adapter(make_tiny_llama(), tmp_path)
    torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version"):
        load_adapter(make_tiny_llama(), tmp_path)


def test_errors():
    with pytest.raises(TypeError, match="bias"):
        BitFitLayer(nn.ReLU())
    with pytest.raises(ValueError, match="no module matched"):
        inject(make_tiny_llama(), BitFitConfig(target_modules=["nope"]))


@pytest.mark.parametrize("module, shape", [
    (nn.Conv1d(3, 4, 3), (2, 3, 4)),             # width 4 = channels: was silently added across the width
    (nn.Conv2d(3, 4, 3, padding=1), (2, 3, 5, 5)),  # was a shape error
    (nn.Conv2d(3, 4, 3), (3, 6, 6)),             # unbatched
    (nn.ConvTranspose2d(3, 4, 2), (2, 3, 4, 4)),
    (nn.BatchNorm1d(4), (6, 4)),
    (nn.BatchNorm2d(4), (2, 4, 4, 4)),
    (nn.GroupNorm(2, 4), (2, 4, 4)),
    (nn.InstanceNorm1d(4, affine=True), (4, 4)),  # unbatched
    (nn.LayerNorm((4, 3)), (2, 4, 3)),            # a 2-D normalized_shape
])
def test_offsets_go_where_the_module_adds_its_bias(module, shape):
    # the reference is the module with its bias unfrozen and moved by δ (BitFit's definition)
    torch.manual_seed(0)
    module.eval()
    x = torch.randn(shape)
    layer = BitFitLayer(module).eval()
    with torch.no_grad():
        layer.bitfit_bias["default"].copy_(torch.randn(module.bias.numel()))
        moved = copy.deepcopy(module)
        moved.bias += layer.bitfit_bias["default"].view(module.bias.shape)
        want = moved(x)
    torch.testing.assert_close(layer(x), want)
    layer.merge()
    torch.testing.assert_close(layer(x), want)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer(x), module(x))


def test_merging_into_a_bias_free_linear_warns_that_from_pretrained_would_drop_the_bias():
    # merge_and_unload + save_pretrained wrote the new biases, and from_pretrained of Llama's config (no
    # attention / MLP biases) dropped them: the reloaded model was the base, with only a load report
    model = _randomise(inject(make_tiny_llama(), BitFitConfig(target_modules=["q_proj", "down_proj"])))
    want = model(IDS).logits
    with pytest.warns(UserWarning, match="attention_bias / mlp_bias"):
        plain = merge_and_unload(model)
    torch.testing.assert_close(plain(IDS).logits, want)
    lin = BitFitLayer(nn.Linear(3, 2))  # a base with its own bias: nothing to warn about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lin.merge()


@pytest.mark.parametrize("has_bias", [True, False])
def test_float16_merge_beyond_the_range_is_refused_and_writes_nothing(has_bias):
    # b + δ above 65504 rounded to inf and was written into the model (the additive families refuse it already)
    lin = nn.Linear(3, 2, bias=has_bias).half()
    if has_bias:
        with torch.no_grad():
            lin.bias.fill_(60000.0)
    b0 = None if not has_bias else lin.bias.detach().clone()
    layer = BitFitLayer(lin)
    with torch.no_grad():
        layer.bitfit_bias["default"].fill_(70000.0 if not has_bias else 10000.0)
    with pytest.raises(ValueError, match="float16"):
        layer.merge()
    assert (lin.bias is None) if not has_bias else torch.equal(lin.bias, b0)
    assert not layer.merged_adapters


@pytest.mark.parametrize("entry, kind", [("input_layernorm", "LlamaRMSNorm"), ("mlp", "LlamaMLP"),
                                         ("embed_tokens", "Embedding")])
def test_a_listed_module_without_a_bias_is_refused_naming_it(entry, kind):
    # it was dropped without a word while q_proj matched: BitFit trained the q_proj biases only
    with pytest.raises(ValueError, match=f"entry '{entry}' selects '.*{entry}', a {kind} without a bias"):
        inject(make_tiny_llama(), BitFitConfig(target_modules=["q_proj", entry]))
    model = inject(make_tiny_llama(), BitFitConfig(target_modules=["q_proj", entry], exclude_modules=[entry]))
    assert [n.split(".")[-1] for n, _ in adapter_layers(model)] == ["q_proj", "q_proj"]


@pytest.mark.parametrize("targets", [["k_proj"], ["q_proj", "k_proj"], r".*\.(q|k)_proj"])
def test_a_named_module_another_family_holds_is_refused_naming_it(targets):
    # BitFit skipped it: alone it raised "no module matched target_modules=['k_proj']" while listing k_proj, and next
    # to q_proj it was dropped without a word (as LoRA or VeRA there refuse, naming the layer)
    from alignlab.adapters import IA3Config

    model = inject(make_tiny_llama(), IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    match = "'model.layers.0.self_attn.k_proj' already holds a IA3Linear; cannot add BitFit"
    with pytest.raises(ValueError, match=match):
        inject(model, BitFitConfig(target_modules=targets), "bitfit")
    assert not any(isinstance(m, BitFitLayer) for m in model.modules())
    if targets != ["k_proj"]:  # left out, the other target takes the biases
        inject(model, BitFitConfig(target_modules=targets, exclude_modules=["k_proj"]), "bitfit")
        assert sorted(n for n, m in model.named_modules() if isinstance(m, BitFitLayer)) == [
            f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
