"""LoRA / DoRA on fused MoE expert weights: checked against a reference that forms W_e + s·B_e A_e per
expert and runs transformers' own eager expert loop, and against PEFT's ``target_parameters`` (test-only
oracle) for numbers and files; tiny random Mixtral, Qwen3-MoE and gpt-oss (no downloads)."""

import copy
import json
import math

import pytest
import torch

from alignlab.adapters import (
    ExpertLoRA,
    LoRAConfig,
    adapter_layers,
    delete_adapter,
    disabled,
    inject,
    load_adapter,
    merge,
    merge_and_unload,
    save_adapter,
    set_adapter,
    unmerge,
)
from alignlab.adapters.experts import ExpertGroups, _padded_bmm, grouped_linear

transformers = pytest.importorskip("transformers")

E, K, H, I, V = 4, 2, 32, 48, 64
IDS = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(0))
BOTH = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ROUTER = {"mixtral": "gate", "qwen3_moe": "gate", "gpt_oss": "router"}


def _model(kind: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=K, max_position_embeddings=64)
    if kind == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(intermediate_size=I, num_local_experts=E, **common))
    elif kind == "qwen3_moe":
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            moe_intermediate_size=I, intermediate_size=2 * I, num_experts=E, head_dim=8, norm_topk_prob=True, **common))
    else:
        model = transformers.GptOssForCausalLM(transformers.GptOssConfig(
            intermediate_size=I, num_local_experts=E, head_dim=8, sliding_window=8, **common))
    with torch.no_grad():  # some MoE inits leave zeros (routers, biases): give every weight a value
        for name, p in model.named_parameters():
            if p.dim() >= 2 and ("experts" in name or "router" in name or "gate" in name):
                p.normal_(0, 0.1)
            elif "bias" in name:
                p.normal_(0, 0.05)
    return model.to(dtype).eval()


def _experts(model):
    return model.model.layers[0].mlp.experts


def _routing(T=13, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g, dtype=dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    idx[0] = torch.tensor([E - 1, 0])  # some expert gets tokens in every run, and one expert none below
    idx[idx == 1] = 2
    w = torch.rand(T, K, generator=g, dtype=dtype)
    return h, idx, w


def _randomise(layer: ExpertLoRA, name="default", seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for store in (layer.lora_A[name], layer.lora_B[name]) + ((layer.lora_magnitude_vector[name],) if layer.is_dora(name) else ()):
            for p in store.values():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))


def _reference(layer: ExpertLoRA, names=("default",), dtype=None):
    """The experts module with W_e replaced by W_e + s·B_e A_e (DoRA: m_e ⊙ (…)/‖…‖_row, norm detached), formed
    per expert with autograd through the factors, run by transformers' own eager loop."""
    ref = copy.deepcopy(layer.base_layer)
    transposed = ref.is_transposed
    for p in ("gate_up_proj", "up_proj", "down_proj"):
        if not hasattr(ref, p):
            continue
        w = getattr(layer.base_layer, p).detach()
        w = (w.transpose(1, 2) if transposed else w).double()
        for n in names:
            if p not in layer.lora_A[n]:
                continue
            a, b = layer.factors(n, p)
            upd = w + layer.scaling[n][p] * torch.einsum("eor,eri->eoi", b.double(), a.double())
            if layer.is_dora(n):
                norm = upd.detach().norm(dim=2, keepdim=True)
                upd = layer.lora_magnitude_vector[n][p].double().unsqueeze(-1) * upd / norm
            w = upd
        del ref._parameters[p]
        setattr(ref, p, (w.transpose(1, 2) if transposed else w).to(dtype or getattr(layer.base_layer, p).dtype))
    eager = type(ref).forward.__wrapped__  # the model's own per-expert loop
    return lambda *args: eager(ref, *args)


def _grads(*tensors):
    return [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("dora", [False, True])
def test_forward_and_gradients_equal_the_formed_weight(kind, dora):
    base = _experts(_model(kind))
    layer = ExpertLoRA(copy.deepcopy(base), {p: 3 for p in ("gate_up_proj", "down_proj")}, alpha=5.0, use_dora=dora)
    _randomise(layer)
    h, idx, w = _routing()
    params = [p for p in layer.parameters() if p.requires_grad]
    assert params and all(not p.requires_grad for p in layer.base_layer.parameters())

    def run(fn):
        for p in params:
            p.grad = None
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(hh, idx, ww)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), [hh.grad, ww.grad] + _grads(*params)

    ours, g_ours = run(layer)
    theirs, g_ref = run(_reference(layer))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, base(h, idx, w), atol=1e-3)  # the adapter does something


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_float64_and_odd_rank_take_the_padded_reference_path_and_agree(kind):
    base = _experts(_model(kind, dtype=torch.float64))
    layer = ExpertLoRA(base, {"gate_up_proj": 3, "down_proj": 5}, alpha={"gate_up_proj": 2.0, "down_proj": 7.0},
                       use_rslora=True)
    assert layer.lora_A["default"]["gate_up_proj"].dtype == torch.float64
    _randomise(layer)
    h, idx, w = _routing(dtype=torch.float64)
    torch.testing.assert_close(layer(h, idx, w), _reference(layer)(h, idx, w), rtol=1e-10, atol=1e-12)
    assert layer.scaling["default"]["down_proj"] == pytest.approx(7.0 / 5 ** 0.5)


def test_grouped_linear_paths_agree_with_a_loop_over_experts():
    g = torch.Generator().manual_seed(0)
    x, wt = torch.randn(11, 16, generator=g), torch.randn(4, 8, 16, generator=g)
    groups = ExpertGroups.from_routing(torch.tensor([3, 0, 0, 2, 3, 3, 0, 2, 2, 0, 3]), 4)  # expert 1 gets no rows
    loop = torch.cat([x[groups.perm[groups.ids == e]] @ wt[e].T for e in range(4)])
    torch.testing.assert_close(grouped_linear(x[groups.perm], wt, groups), loop)
    torch.testing.assert_close(_padded_bmm(x[groups.perm], wt.transpose(1, 2), groups), loop)


def test_bf16_base_keeps_fp32_factors_and_follows_the_activations():
    base = _experts(_model("mixtral", dtype=torch.bfloat16))
    layer = ExpertLoRA(copy.deepcopy(base), {"gate_up_proj": 8, "down_proj": 8}, alpha=16.0)
    assert layer.lora_A["default"]["gate_up_proj"].dtype == torch.float32
    _randomise(layer)
    h, idx, w = _routing(dtype=torch.bfloat16)
    out = layer(h, idx, w)
    assert out.dtype == torch.bfloat16
    ref = _reference(layer, dtype=torch.float32)(h.float(), idx, w.float())  # fp32 reference, same bf16 weights
    rel = lambda y: ((y.float() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert rel(out) < 2e-2  # bf16 activations: the base alone is ~0.4% off its fp32 run
    layer.exact_fp32 = True
    assert rel(layer(h, idx, w)) < 2e-2


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("dora", [False, True])
def test_inject_train_save_load_merge(kind, dora, tmp_path):
    model = _model(kind)
    before = model(IDS).logits
    config = LoRAConfig(r=4, alpha=8, target_parameters=BOTH, use_dora=dora)
    ours = inject(copy.deepcopy(model), config)
    assert sorted(n for n, _ in adapter_layers(ours)) == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)  # router, attention, experts' base: frozen
    torch.testing.assert_close(ours(IDS).logits, before)  # B = 0: starts as the base
    ours.train()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    router = ours.model.layers[0].mlp.get_submodule(ROUTER[kind]).weight.detach().clone()
    losses = []
    for _ in range(3):
        loss = ours(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    torch.testing.assert_close(ours.model.layers[0].mlp.get_submodule(ROUTER[kind]).weight, router, rtol=0, atol=0)
    ours.eval()
    adapted = ours(IDS).logits
    with disabled(ours):
        torch.testing.assert_close(ours(IDS).logits, before)

    save_adapter(ours, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == ("ALIGNLAB_LORA" if dora else "LORA")
    assert raw["target_parameters"] == [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("down_proj", "gate_up_proj")]
    loaded = load_adapter(copy.deepcopy(model), tmp_path)
    torch.testing.assert_close(loaded(IDS).logits, adapted, rtol=0, atol=0)

    merge(ours)
    torch.testing.assert_close(ours(IDS).logits, adapted, rtol=1e-4, atol=1e-5)
    unmerge(ours)
    torch.testing.assert_close(ours(IDS).logits, adapted, rtol=1e-4, atol=1e-5)
    plain = merge_and_unload(ours)
    assert not list(adapter_layers(plain)) and type(plain.model.layers[0].mlp.experts) is type(_experts(model))
    torch.testing.assert_close(plain(IDS).logits, adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_router_trains_only_when_targeted(kind):
    model = _model(kind)
    ours = inject(model, LoRAConfig(r=2, target_parameters=["mlp.experts.down_proj"], modules_to_save=[ROUTER[kind]]))
    ours(IDS, labels=IDS).loss.backward()
    routers = [n for n, p in ours.named_parameters() if p.requires_grad and ROUTER[kind] in n and "lora" not in n]
    assert routers and all(ours.get_parameter(n).grad is not None for n in routers)
    layer = ours.model.layers[0].mlp.experts
    assert layer.parameters_of("default") == ["down_proj"] and "gate_up_proj" not in layer.lora_A["default"]


def test_all_linear_covers_experts_only_when_asked():
    model = _model("qwen3_moe")
    plain = inject(copy.deepcopy(model), LoRAConfig(r=2))
    assert not any(isinstance(l, ExpertLoRA) for _, l in adapter_layers(plain))
    both = inject(copy.deepcopy(model), LoRAConfig(r=2, include_experts=True, rank_pattern={"down_proj": 3}))
    names = {n: l for n, l in adapter_layers(both)}
    assert "model.layers.0.self_attn.q_proj" in names
    experts = names["model.layers.1.mlp.experts"]
    assert experts.r["default"] == {"gate_up_proj": 2, "down_proj": 3}  # rank patterns match the parameter's name
    only = inject(copy.deepcopy(model), LoRAConfig(r=2, target_parameters=["down_proj"]))
    assert all(isinstance(l, ExpertLoRA) for _, l in adapter_layers(only))
    skip0 = inject(copy.deepcopy(model), LoRAConfig(r=2, target_parameters=["down_proj"],
                                                    exclude_modules=["model.layers.0.mlp.experts"]))
    assert [n for n, _ in adapter_layers(skip0)] == ["model.layers.1.mlp.experts"]


def test_named_adapters_switch_sum_and_delete():
    model = _model("mixtral")
    ours = inject(copy.deepcopy(model), LoRAConfig(r=2, target_parameters=BOTH))
    inject(ours, LoRAConfig(r=3, alpha=3, target_parameters=["gate_up_proj"]), "other")
    layer = ours.model.layers[0].mlp.experts
    _randomise(layer, "default", 1)
    _randomise(layer, "other", 2)
    h, idx, w = _routing()
    only_default = layer(h, idx, w)
    torch.testing.assert_close(only_default, _reference(layer, ["default"])(h, idx, w), rtol=1e-4, atol=1e-5)
    set_adapter(ours, ["default", "other"])
    torch.testing.assert_close(layer(h, idx, w), _reference(layer, ["default", "other"])(h, idx, w), rtol=1e-4, atol=1e-5)
    delete_adapter(ours, "other")
    delete_adapter(ours, "default")
    assert type(ours.model.layers[0].mlp.experts) is type(_experts(model))


def test_refusals(tmp_path):
    model = _model("mixtral")
    with pytest.raises(ValueError, match="not a fused expert weight"):
        inject(copy.deepcopy(model), LoRAConfig(target_parameters=["mlp.gate.weight"]))
    with pytest.raises(ValueError, match="matched no parameter"):
        inject(copy.deepcopy(model), LoRAConfig(target_parameters=["mlp.experts.w1"]))
    with pytest.raises(ValueError, match="include_experts"):
        LoRAConfig(target_modules=["q_proj"], include_experts=True)
    with pytest.raises(TypeError, match="target_parameters"):
        LoRAConfig(target_parameters="mlp.experts.down_proj")
    with pytest.raises(ValueError, match="init"):
        inject(copy.deepcopy(model), LoRAConfig(target_parameters=BOTH, init="pissa"))
    with pytest.raises(TypeError, match="experts module"):
        ExpertLoRA(model.model.layers[0].mlp.gate, {"gate_up_proj": 2})
    for bad in (float("nan"), float("inf"), 0.0, True):  # a NaN alpha would reach every output
        with pytest.raises(ValueError, match="alpha of 'down_proj'"):
            ExpertLoRA(copy.deepcopy(_experts(model)), {"down_proj": 2}, alpha=bad)
    import numpy as np  # a sweep's NumPy numbers are numbers

    layer = ExpertLoRA(copy.deepcopy(_experts(model)), {"down_proj": np.int64(2)}, alpha=np.float32(4.0))
    assert layer.r["default"] == {"down_proj": 2} and type(layer.r["default"]["down_proj"]) is int
    assert layer.scaling["default"]["down_proj"] == 2.0
    # NumPy bools act as Python bools; strings and ints are refused (bool("no") would switch rsLoRA on)
    layer = ExpertLoRA(copy.deepcopy(_experts(model)), {"down_proj": 4}, alpha=8.0, use_rslora=np.True_,
                       use_dora=np.False_, exact_fp32=np.True_)
    assert layer.use_rslora["default"] is True and layer.exact_fp32 is True and not layer.is_dora("default")
    assert layer.scaling["default"]["down_proj"] == 8.0 / math.sqrt(4)
    for kw, name in ((dict(use_rslora="no"), "use_rslora"), (dict(use_dora=1), "use_dora"),
                     (dict(exact_fp32=0), "exact_fp32")):
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            ExpertLoRA(copy.deepcopy(_experts(model)), {"down_proj": 2}, **kw)
    # a file from PEFT < 0.19.1 has (E, out, in) factors the other way round: refused, not read wrong
    ours = inject(copy.deepcopy(model), LoRAConfig(r=2, target_parameters=BOTH))
    save_adapter(ours, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, "peft_version": "0.18.0"}))
    with pytest.raises(ValueError, match="0.19.1"):
        load_adapter(copy.deepcopy(model), tmp_path)


@pytest.mark.parametrize("extra", [dict(use_dora=True), dict(dropout=0.1)])
def test_what_peft_cannot_read_goes_out_in_our_own_versioned_format(extra, tmp_path):
    from safetensors.torch import load_file

    model = _model("gpt_oss")
    ours = inject(copy.deepcopy(model), LoRAConfig(r=2, target_parameters=BOTH, **extra))
    save_adapter(ours, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "ALIGNLAB_LORA" and raw["format_version"] == 1
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert ("base_model.model.model.layers.0.mlp.experts.base_layer.lora_magnitude_vector" in keys) == ("use_dora" in extra)
    loaded = load_adapter(copy.deepcopy(model), tmp_path)
    assert loaded.model.layers[0].mlp.experts.is_dora("default") == ("use_dora" in extra)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version"):
        load_adapter(copy.deepcopy(model), tmp_path)


# -- PEFT as the oracle ----------------------------------------------------------------------------
def _peft_or_skip(kind: str):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import LoraConfig

    if "target_parameters" not in LoraConfig.__dataclass_fields__:
        pytest.skip(f"peft {peft.__version__} has no target_parameters")
    version = tuple(int(p) for p in peft.__version__.split("+")[0].split(".")[:3] if p.isdigit())
    if kind != "gpt_oss" and version < (0, 19, 1):
        pytest.skip(f"peft {peft.__version__} reads (E, out, in) expert weights as (E, in, out) (fixed in 0.19.1)")
    return peft


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_files_load_both_ways_with_peft(kind, tmp_path):
    peft = _peft_or_skip(kind)
    model = _model(kind)
    ours = inject(copy.deepcopy(model), LoRAConfig(r=2, alpha=6, target_parameters=BOTH, target_modules=["q_proj"],
                                                   rank_pattern={"down_proj": 3}))
    for _, layer in adapter_layers(ours):
        if isinstance(layer, ExpertLoRA):
            _randomise(layer)
        else:
            with torch.no_grad():
                layer.lora_B["default"].weight.normal_()
    expected = ours(IDS).logits
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(IDS).logits, expected, rtol=1e-4, atol=1e-5)

    theirs.save_pretrained(tmp_path / "peft")
    back = load_adapter(copy.deepcopy(model), tmp_path / "peft")
    torch.testing.assert_close(back(IDS).logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_peft_trained_adapter_matches_ours_step_for_step(kind, tmp_path):
    """A PEFT model with random factors, saved and loaded by us: same loss and same factor gradients."""
    peft = _peft_or_skip(kind)
    model = _model(kind)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=[],
                                                                       target_parameters=BOTH))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(model), tmp_path)
    l_ours, l_theirs = ours(IDS, labels=IDS).loss, theirs(IDS, labels=IDS).loss
    torch.testing.assert_close(l_ours, l_theirs, rtol=1e-5, atol=1e-6)
    l_ours.backward()
    l_theirs.backward()
    g_theirs = {n.replace("base_model.model.", "").replace(".default", ""): p.grad for n, p in theirs.named_parameters()
                if p.requires_grad}
    layer = ours.model.layers[0].mlp.experts
    for key, tensor in layer.peft_tensors("default").items():
        torch.testing.assert_close(tensor.grad, g_theirs[f"model.layers.0.mlp.experts.{key}"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("dora", [False, True])
def test_quantized_base_through_the_module_interface(kind, dora):
    """On NF4 experts (QLoRA for MoE) the wrapper equals itself on the dequantized dense experts; merge
    re-quantizes and unmerge puts the packed weights back bit for bit."""
    from alignlab.quant import NF4Experts

    base = _experts(_model(kind))
    quant = NF4Experts.from_experts(copy.deepcopy(base))
    quant.compute_dtype = torch.float32
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for p in ("gate_up_proj", "down_proj"):
            w = quant.dequantize_experts(p, dtype=torch.float32)
            getattr(dense, p).copy_(w.transpose(1, 2) if dense.is_transposed else w)
    on_quant = ExpertLoRA(quant, {"gate_up_proj": 4, "down_proj": 4}, alpha=8.0, use_dora=dora)
    on_dense = ExpertLoRA(dense, {"gate_up_proj": 4, "down_proj": 4}, alpha=8.0, use_dora=dora)
    on_dense.load_state_dict({k: v for k, v in on_quant.state_dict().items() if "lora_" in k}, strict=False)
    _randomise(on_quant)
    _randomise(on_dense)
    h, idx, w = _routing()
    grads = []
    for layer in (on_quant, on_dense):
        hh = h.clone().requires_grad_()
        out = layer(hh, idx, w)
        out.backward(torch.ones_like(out))
        grads.append([out.detach(), hh.grad] + [p.grad for p in layer.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    packed = {p: {k: v.clone() for k, v in quant.quantized_state(p).items()} for p in quant.expert_parameters}
    before = on_quant(h, idx, w).detach()
    on_quant.merge()
    assert not torch.equal(quant.quantized_state("down_proj")["qdata"], packed["down_proj"]["qdata"])
    on_quant.unmerge()
    for p, state in packed.items():
        for k, v in state.items():
            assert torch.equal(quant.quantized_state(p)[k], v)
    torch.testing.assert_close(on_quant(h, idx, w), before, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("dora", [False, True])
def test_cuda_bf16_grouped_mm_path(kind, dora):
    """On a GPU, bf16 experts take torch's grouped_mm: output and factor gradients against an fp32 run of the
    formed weight (same bf16 base weights)."""
    base = _experts(_model(kind)).to("cuda", torch.bfloat16)
    layer = ExpertLoRA(copy.deepcopy(base), {"gate_up_proj": 16, "down_proj": 16}, alpha=32.0, use_dora=dora)
    _randomise(layer)
    h, idx, w = (t.cuda() for t in _routing(T=64))
    params = [p for p in layer.parameters() if p.requires_grad]
    cot = torch.randn(64, H, device="cuda")

    def run(fn, dtype):
        for p in params:
            p.grad = None
        out = fn(h.to(dtype), idx, w.to(dtype))
        out.float().backward(cot)
        return [out.detach().float()] + [p.grad.float().clone() for p in params]

    ours = run(layer, torch.bfloat16)
    ref = run(_reference(layer, dtype=torch.float32), torch.float32)
    for a, b in zip(ours, ref):
        assert ((a - b).norm() / b.norm()).item() < 3e-2


def test_torch_compile_fullgraph_equals_the_formed_weight():
    """Inductor compiles the wrapper as one graph (the padded path's data-dependent group sizes stay inside an
    opaque op), with the eager reference's numbers; gpt-oss + DoRA: transposed storage, biases, magnitudes."""
    torch._dynamo.reset()
    layer = ExpertLoRA(copy.deepcopy(_experts(_model("gpt_oss"))), {"gate_up_proj": 3, "down_proj": 3}, alpha=5.0,
                       use_dora=True)
    _randomise(layer)
    h, idx, w = _routing()
    params = [p for p in layer.parameters() if p.requires_grad]

    def run(fn):
        for p in params:
            p.grad = None
        hh = h.clone().requires_grad_()
        out = fn(hh, idx, w)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), [hh.grad] + _grads(*params)

    ours, g_ours = run(torch.compile(layer, fullgraph=True))
    theirs, g_ref = run(_reference(layer))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_peft_file_from_transformers_4_expert_names_loads(tmp_path):
    """PEFT rewrites target_modules=[gate_proj, up_proj, down_proj] on a MoE model into target_parameters with
    rank and alpha doubled for the fused gate_up_proj (rank_pattern / alpha_pattern regexes): same logits here."""
    peft = _peft_or_skip("qwen3_moe")
    model = _model("qwen3_moe")
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False))
    if not theirs.peft_config["default"].target_parameters:
        pytest.skip(f"peft {peft.__version__} does not convert transformers 4.x expert names")
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(model), tmp_path)
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_experts", [1, 2, 5])
def test_group_offsets_count_only_real_experts(num_experts):
    """offsets[e] = rows routed to experts <= e; expert-parallel sentinel ids (>= E) count in no group, also
    with a single expert (torch.histc with min == max would take the data's own range)."""
    ids = torch.tensor([0, num_experts, 0, num_experts - 1, num_experts + 3, 0])
    groups = ExpertGroups.from_routing(ids, num_experts)
    want = torch.cumsum(torch.stack([(ids == e).sum() for e in range(num_experts)]), 0).to(torch.int32)
    torch.testing.assert_close(groups.offsets, want)


def test_merge_of_lora_and_dora_together_equals_forward():
    """Forward adds DoRA's term on the unmerged W_e beside the LoRA term: merge folds the DoRA adapter first
    (whatever the order asked), so the merged experts give the forward's output and unmerge undoes it; a
    second DoRA adapter, or a DoRA adapter onto an already merged one, is refused before anything changes."""
    layer = ExpertLoRA(copy.deepcopy(_experts(_model("mixtral"))), {"gate_up_proj": 4, "down_proj": 4}, alpha=8.0)
    layer.add_adapter("d", {"gate_up_proj": 4, "down_proj": 4}, alpha=8.0, use_dora=True)
    _randomise(layer, "default", seed=1)
    _randomise(layer, "d", seed=2)
    layer.active_adapters = ["default", "d"]
    h, idx, w = _routing()
    with torch.no_grad():
        y = layer(h, idx, w)
        layer.merge(["default", "d"])
        assert layer.merged_adapters == ["d", "default"]
        torch.testing.assert_close(layer(h, idx, w), y, rtol=1e-4, atol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer(h, idx, w), y, rtol=1e-4, atol=1e-5)
        layer.add_adapter("d2", {"down_proj": 2}, alpha=4.0, use_dora=True)
        with pytest.raises(ValueError, match="cannot merge DoRA adapter 'd'"):
            layer.merge(["d", "d2"])
        layer.merge(["default"])
        with pytest.raises(ValueError, match="cannot merge DoRA adapter 'd'"):
            layer.merge(["d"])
        assert layer.merged_adapters == ["default"]
