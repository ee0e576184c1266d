"""GPT-2's ``Conv1D`` bases (weight stored ``(in, out)``) under the linear adapter families.

PEFT is the oracle: the same adapter weights give the same outputs, files load both ways, merged
weights are written back in Conv1D's transposed layout, and ``"all-linear"`` picks the same layers.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from alignlab.adapters import (
    AdaLoRAConfig,
    BitFitConfig,
    IA3Config,
    LoKrConfig,
    LoRAConfig,
    LoRALinear,
    VeRAConfig,
    adapter_layers,
    inject,
    load_adapter,
    merge,
    merge_and_unload,
    save_adapter,
    unmerge,
)
from alignlab.adapters.inject import find_targets

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers.pytorch_utils import Conv1D  # noqa: E402

IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
TOL = dict(rtol=1e-4, atol=1e-5)
TARGETS = ["c_attn", "c_proj", "c_fc"]
CONV_NAMES = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]

# (ours, theirs) pairs of equivalent configs on c_attn / c_proj / c_fc
METHODS = {
    "lora": (lambda: LoRAConfig(r=4, alpha=8, target_modules=TARGETS),
             lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)),
    "dora": (lambda: LoRAConfig(r=4, alpha=8, target_modules=TARGETS, use_dora=True),
             lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)),
    # keys/values-style scaling of the output on attention, of the input on the MLP down projection
    "ia3": (lambda: IA3Config(target_modules=["c_attn", "attn.c_proj", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
            lambda: peft.IA3Config(target_modules=["c_attn", "attn.c_proj", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])),
    "vera": (lambda: VeRAConfig(r=4, target_modules=TARGETS, projection_prng_key=7),
             lambda: peft.VeraConfig(r=4, target_modules=TARGETS, projection_prng_key=7)),
    "adalora": (lambda: AdaLoRAConfig(init_r=4, target_r=2, alpha=6, total_step=10, target_modules=TARGETS),
                lambda: peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=6, total_step=10, target_modules=TARGETS)),
}


def make_tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _conv_weights(model):
    """``{module name: Conv1D weight}``, the names without PEFT's or our wrapper parts."""
    def plain(name):
        return name.removeprefix("base_model.model.").removesuffix(".base_layer")
    return {plain(n): m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, Conv1D)}


def test_targets_by_name_and_all_linear_find_conv1d_like_peft():
    base = make_tiny_gpt2()
    assert find_targets(base, LoRAConfig(target_modules=["c_attn"])) == [n for n in CONV_NAMES if n.endswith("c_attn")]
    ours = find_targets(base, LoRAConfig(target_modules="all-linear"))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules="all-linear"))
    assert sorted(ours) == sorted(theirs.targeted_module_names) == sorted(CONV_NAMES)  # lm_head (tied to wte) left out
    bitfit = inject(copy.deepcopy(base), BitFitConfig(target_modules="all-linear"))
    assert sorted(n for n, _ in adapter_layers(bitfit)) == sorted(CONV_NAMES)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_conv1d_matches_peft_both_ways_and_merges_in_conv1d_layout(tmp_path, method):
    ours_cfg, theirs_cfg = METHODS[method]
    base = make_tiny_gpt2()
    theirs = peft.get_peft_model(copy.deepcopy(base), theirs_cfg())
    _randomise(theirs, 1)
    want = _logits(theirs)
    assert not torch.allclose(want, _logits(base), **TOL)
    # PEFT -> alignlab: PEFT writes fan_in_fan_out=True for Conv1D targets
    theirs.save_pretrained(str(tmp_path / "p"))
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ours = load_adapter(copy.deepcopy(base), tmp_path / "p")
    assert sorted(n for n, _ in adapter_layers(ours)) == sorted(theirs.targeted_module_names)
    assert all(isinstance(layer.base_layer, Conv1D) for _, layer in adapter_layers(ours))
    torch.testing.assert_close(_logits(ours), want, **TOL)
    # alignlab -> PEFT
    save_adapter(ours, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    torch.testing.assert_close(_logits(again), want, **TOL)
    # merge / unmerge write the (in, out) storage back: same weights as PEFT's merge, same outputs
    before = _conv_weights(ours)
    merge(ours)
    torch.testing.assert_close(_logits(ours), want, **TOL)
    unmerge(ours)
    for name, w in _conv_weights(ours).items():
        torch.testing.assert_close(w, before[name], rtol=1e-5, atol=1e-6)
    plain = merge_and_unload(ours)
    assert not list(adapter_layers(plain))
    torch.testing.assert_close(_logits(plain), want, **TOL)
    merged_theirs = _conv_weights(theirs.merge_and_unload())
    for name, w in _conv_weights(plain).items():
        torch.testing.assert_close(w, merged_theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def test_lokr_on_conv1d_equals_the_kronecker_formula(tmp_path):
    """PEFT's LoKr does not take Conv1D; the formula ``y = x Wᵀ... + s·x kron(W₁, W₂)ᵀ`` is the oracle."""
    base = make_tiny_gpt2()
    ours = inject(copy.deepcopy(base), LoKrConfig(r=2, alpha=6, target_modules=TARGETS))
    _randomise(ours, 2)
    layer = ours.get_submodule("transformer.h.0.attn.c_attn")
    x = torch.randn(3, 32)
    w1, w2 = layer.factors("default")
    conv = layer.base_layer
    torch.testing.assert_close(layer(x), x @ conv.weight + conv.bias + 3.0 * F.linear(x, torch.kron(w1, w2)), **TOL)
    want = _logits(ours)
    save_adapter(ours, tmp_path / "a")
    torch.testing.assert_close(_logits(load_adapter(copy.deepcopy(base), tmp_path / "a")), want, **TOL)
    delta = layer.delta_weight("default")
    old = conv.weight.detach().clone()
    plain = merge_and_unload(ours)
    merged = plain.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(merged, Conv1D)
    torch.testing.assert_close(merged.weight, old + delta.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_logits(plain), want, **TOL)


def test_pissa_on_conv1d_leaves_the_same_residual_as_peft():
    base = make_tiny_gpt2()
    ours = inject(copy.deepcopy(base), LoRAConfig(r=4, alpha=8, target_modules=["c_attn"], init="pissa"))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                                       init_lora_weights="pissa"))
    torch.testing.assert_close(_logits(ours), _logits(base), **TOL)  # PiSSA starts at the base output
    theirs_w = _conv_weights(theirs)
    for name, w in _conv_weights(ours).items():
        if "c_attn" in name:
            torch.testing.assert_close(w, theirs_w[name], rtol=1e-4, atol=1e-5, msg=name)
            assert not torch.allclose(w, base.get_submodule(name).weight)


def test_quantize_model_quantizes_conv1d_as_its_out_in_matrix():
    from alignlab.quant.linear import NF4Linear, quantize_model

    base = make_tiny_gpt2()
    q = quantize_model(copy.deepcopy(base), compute_dtype=torch.float32)
    for name in CONV_NAMES:
        conv, nf4 = base.get_submodule(name), q.get_submodule(name)
        assert isinstance(nf4, NF4Linear) and (nf4.in_features, nf4.out_features) == tuple(conv.weight.shape)
        ref = NF4Linear.from_linear(torch.nn.Linear(*conv.weight.shape).requires_grad_(False), compute_dtype=torch.float32)
        ref.load_dense_weight_(conv.weight.detach().T)  # the same (out, in) matrix, quantized the usual way
        assert torch.equal(nf4.qdata, ref.qdata)
        x = torch.randn(3, conv.weight.shape[0])
        torch.testing.assert_close(nf4(x), F.linear(x, ref.dequantize(torch.float32), conv.bias))
    assert type(q.lm_head) is torch.nn.Linear
    adapted = inject(q, LoRAConfig(r=4, target_modules="all-linear"))
    assert sorted(n for n, _ in adapter_layers(adapted)) == sorted(CONV_NAMES)


def test_non_linear_base_is_refused_naming_the_accepted_kinds():
    with pytest.raises(TypeError, match="Conv1D"):
        LoRALinear(torch.nn.Embedding(10, 4))


def test_dora_row_norm_kernel_reads_a_conv1d_weight_right(triton_mode):
    """The Triton row-norm kernel (interpreted on CPU) takes the (out, in) view of a Conv1D weight."""
    conv = Conv1D(12, 16)
    layer = LoRALinear(conv, r=3, alpha=6, use_dora=True)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_magnitude_vector["default"].add_(torch.rand(12))
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    merged = conv.weight.T + 2.0 * b @ a  # (out, in)
    dense = layer.lora_magnitude_vector["default"][:, None] * merged / merged.norm(dim=1, keepdim=True)
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), F.linear(x, dense, conv.bias), rtol=1e-4, atol=1e-5)
