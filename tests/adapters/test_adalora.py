"""AdaLoRA and SoRA: formula, identity at init, merge, counts, budget schedule, masking, regulariser, proximal step."""

import copy
import json

import pytest
import torch
from torch import nn

from conftest import config_fields, make_tiny_llama, saved_adapter_config

from alignlab.adapters import (
    AdaLoRAAllocator,
    AdaLoRAConfig,
    AdaLoRALinear,
    IA3Config,
    SoRAConfig,
    active_ranks,
    adapter_layers,
    count_parameters,
    disabled,
    inject,
    load_adapter,
    merge,
    orthogonal_regularizer,
    save_adapter,
    sora_proximal_step,
    unmerge,
)

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj"]


def test_formula_and_merge():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    w0 = lin.weight.detach().clone()
    layer = AdaLoRALinear(lin, r=3, scaling=0.7)
    with torch.no_grad():
        layer.lora_E["default"].normal_()
    p, lam, q = layer.lora_B["default"].detach(), layer.lora_E["default"].detach().view(-1), layer.lora_A["default"].detach()
    x = torch.randn(4, 6)
    want = lin(x) + 0.7 * x @ (p @ torch.diag(lam) @ q).T
    torch.testing.assert_close(layer(x), want)
    layer.merge()
    torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(lin.weight, w0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg", [AdaLoRAConfig(init_r=4, target_r=2, target_modules=TARGETS), SoRAConfig(r=4, target_modules=TARGETS)])
def test_identity_count_disable_merge(cfg):
    base = make_tiny_llama()
    ref = base(IDS).logits
    model = inject(base, cfg)
    torch.testing.assert_close(model(IDS).logits, ref, rtol=0, atol=0)
    layers = [l for _, l in adapter_layers(model)]
    assert count_parameters(model).trainable == sum(4 * (l.in_features + l.out_features + 1) for l in layers)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for l in layers:
            l.lora_E["default"].copy_(torch.randn(4, 1, generator=g))
            l.lora_B["default"].copy_(0.3 * torch.randn(l.lora_B["default"].shape, generator=g))
    y = model(IDS).logits
    assert not torch.allclose(y, ref)
    with disabled(model):
        torch.testing.assert_close(model(IDS).logits, ref, rtol=0, atol=0)
    merge(model)
    torch.testing.assert_close(model(IDS).logits, y, rtol=1e-4, atol=1e-5)
    unmerge(model)


def test_budget_schedule_is_cubic():
    model = inject(make_tiny_llama(), AdaLoRAConfig(init_r=6, target_r=2, total_step=20, tinit=2, tfinal=4, deltaT=3, target_modules=TARGETS))
    alloc = AdaLoRAAllocator(model, AdaLoRAConfig(init_r=6, target_r=2, total_step=20, tinit=2, tfinal=4, deltaT=3, target_modules=TARGETS))
    b0, bt = 4 * 6, 4 * 2
    assert alloc.budget(1) == (b0, False)
    for t in (3, 6, 9, 15):
        want = int((b0 - bt) * (1 - (t - 2) / (20 - 4 - 2)) ** 3 + bt)
        assert alloc.budget(t) == (want, t % 3 == 0)
    assert alloc.budget(17) == (bt, True)


def test_allocator_matches_peft():
    peft = pytest.importorskip("peft")
    base = make_tiny_llama()
    kw = dict(init_r=4, target_r=2, total_step=8, tinit=1, tfinal=2, deltaT=1, beta1=0.8, beta2=0.7)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(target_modules=TARGETS, lora_alpha=8, **kw))
    cfg = AdaLoRAConfig(target_modules=TARGETS, alpha=8, **kw)
    ours = inject(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(3)
    sd = theirs.state_dict()
    with torch.no_grad():
        for name, layer in adapter_layers(ours):
            for kind in ("lora_A", "lora_B", "lora_E"):
                t = torch.randn(sd[f"base_model.model.{name}.{kind}.default"].shape, generator=g)
                getattr(layer, kind)["default"].copy_(t)
                sd[f"base_model.model.{name}.{kind}.default"].copy_(t)
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-4, atol=1e-5)
    alloc = AdaLoRAAllocator(ours, cfg)
    opt_o = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    opt_t = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.05)
    for step in range(8):
        for model, opt in ((ours, opt_o), (theirs, opt_t)):
            opt.zero_grad()
            model(IDS).logits.square().mean().backward()
        opt_o.step()
        opt_t.step()
        _, pattern = alloc.step(step)
        theirs.base_model.update_and_allocate(step)
        sd = theirs.state_dict()
        for name, layer in adapter_layers(ours):
            torch.testing.assert_close(layer.lora_E["default"], sd[f"base_model.model.{name}.lora_E.default"],
                                       rtol=1e-4, atol=1e-6, msg=f"step {step} {name}")
    assert sum(active_ranks(ours).values()) == 4 * 2  # at the target budget at the end
    final = {k.replace("base_model.model.", "").replace(".default", ""): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert alloc.rank_pattern == final


def test_orthogonal_regularizer_formula():
    model = inject(make_tiny_llama(), AdaLoRAConfig(init_r=3, target_r=1, target_modules=["q_proj"]))
    want = []
    for _, l in adapter_layers(model):
        a, b = l.lora_A["default"].detach(), l.lora_B["default"].detach()
        want += [((a @ a.T - torch.eye(3)) ** 2).sum().sqrt(), ((b.T @ b - torch.eye(3)) ** 2).sum().sqrt()]
    torch.testing.assert_close(orthogonal_regularizer(model), torch.stack(want).mean())


def test_sora_proximal_step_prunes_and_roundtrips(tmp_path):
    model = inject(make_tiny_llama(), SoRAConfig(r=4, target_modules=TARGETS))
    with torch.no_grad():
        for _, l in adapter_layers(model):
            l.lora_E["default"].copy_(torch.tensor([[0.05], [-0.5], [2.0], [-0.02]]))
            l.lora_B["default"].normal_()
    zeros = sora_proximal_step(model, lr=0.1, sparsity=1.0)
    assert zeros == 2 * 4
    for _, l in adapter_layers(model):
        torch.testing.assert_close(l.lora_E["default"].view(-1), torch.tensor([0.0, -0.4, 1.9, 0.0]))
    assert set(active_ranks(model).values()) == {2}
    save_adapter(model, tmp_path)
    fresh = load_adapter(make_tiny_llama(), tmp_path)
    torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits)
    with pytest.raises(ValueError, match="non-negative"):
        sora_proximal_step(model, lr=-1, sparsity=1)


def test_config_errors():
    with pytest.raises(ValueError, match="target_r"):
        AdaLoRAConfig(init_r=4, target_r=8)
    with pytest.raises(ValueError, match="tinit"):
        AdaLoRAConfig(total_step=10, tinit=5, tfinal=5)
    with pytest.raises(ValueError, match="beta1"):
        AdaLoRAConfig(beta1=1.0)
    with pytest.raises(ValueError, match="r must be"):
        SoRAConfig(r=0)
    with pytest.raises(ValueError, match="no AdaLoRA layers"):
        AdaLoRAAllocator(make_tiny_llama(), AdaLoRAConfig())


def test_sora_prune_ranks_shrinks_keeps_outputs_and_roundtrips(tmp_path):
    from alignlab.adapters import prune_ranks

    model = inject(make_tiny_llama(), SoRAConfig(r=4, target_modules=TARGETS))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for i, (_, l) in enumerate(adapter_layers(model)):
            l.lora_B["default"].copy_(torch.randn(l.lora_B["default"].shape, generator=g))
            l.lora_E["default"].view(-1)[: i % 4] = 0  # layers keep 4, 3, 2, 1 ranks
    y = model(IDS).logits
    ranks = prune_ranks(model)
    assert sorted(ranks.values()) == [1, 2, 3, 4]
    assert all(l.lora_A["default"].shape[0] == ranks[n] == l.lora_B["default"].shape[1] for n, l in adapter_layers(model))
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    torch.testing.assert_close(model(IDS).logits, y)
    save_adapter(model, tmp_path)
    fresh = load_adapter(make_tiny_llama(), tmp_path)
    torch.testing.assert_close(fresh(IDS).logits, y)


def test_adalora_prune_after_allocation_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from alignlab.adapters import prune_ranks

    base = make_tiny_llama()
    cfg = AdaLoRAConfig(init_r=4, target_r=2, alpha=6, total_step=6, tinit=1, tfinal=2, target_modules=TARGETS)
    model = inject(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for _, l in adapter_layers(model):
            l.lora_E["default"].normal_()
    alloc = AdaLoRAAllocator(model, cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(6):
        model(IDS).logits.square().mean().backward()
        opt.step()
        alloc.step(step)
        opt.zero_grad()
    y = model(IDS).logits
    ranks = prune_ranks(model)
    assert sum(ranks.values()) == 2 * 4
    torch.testing.assert_close(model(IDS).logits, y)
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(theirs(IDS).logits, y, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="AdaLoRA or SoRA"):
        prune_ranks(inject(make_tiny_llama(), IA3Config()))


def test_sora_proximal_step_refuses_nan_and_infinite_steps():
    # lr=NaN passed the `lr < 0` check and turned every gate into NaN (NaN logits, counted as active ranks)
    model = inject(make_tiny_llama(), SoRAConfig(r=4, target_modules=TARGETS))
    before = {n: l.lora_E["default"].clone() for n, l in adapter_layers(model)}
    for lr, sparsity in ((float("nan"), 1.0), (0.1, float("nan")), (float("inf"), 1.0), ("0.1", 1.0)):
        with pytest.raises(ValueError, match="non-negative"):
            sora_proximal_step(model, lr=lr, sparsity=sparsity)
    for n, l in adapter_layers(model):
        torch.testing.assert_close(l.lora_E["default"], before[n])  # nothing touched


def test_numpy_scalars_accepted_bools_refused():
    np = pytest.importorskip("numpy")
    cfg = AdaLoRAConfig(init_r=np.int64(4), target_r=np.int32(2), alpha=np.float32(8), total_step=np.int64(100),
                        deltaT=np.int64(5), target_modules=TARGETS)
    assert (cfg.init_r, cfg.target_r, cfg.alpha, cfg.total_step, cfg.deltaT) == (4, 2, 8.0, 100, 5)
    assert all(type(v) is int for v in (cfg.init_r, cfg.target_r, cfg.total_step, cfg.deltaT))
    sora = SoRAConfig(r=np.int64(4), alpha=np.float32(2), rank_pattern={"x": np.int64(1)}, target_modules=TARGETS)
    assert (sora.r, sora.alpha, type(sora.rank_pattern["x"])) == (4, 2.0, int)
    for kw in ({"target_r": True}, {"total_step": True}, {"alpha": float("nan")}):
        with pytest.raises(ValueError):
            AdaLoRAConfig(target_modules=TARGETS, **kw)


def test_schedule_and_beta_types_checked():
    np = pytest.importorskip("numpy")
    cfg = AdaLoRAConfig(total_step=100, tinit=np.int64(10), tfinal=np.int32(20), beta1=np.float32(0.5),
                        beta2=np.float64(0.75), target_modules=TARGETS)
    assert (cfg.tinit, cfg.tfinal, cfg.beta1, cfg.beta2) == (10, 20, 0.5, 0.75)
    assert [type(v) for v in (cfg.tinit, cfg.tfinal, cfg.beta1, cfg.beta2)] == [int, int, float, float]
    for name in ("tinit", "tfinal"):
        for bad in (-1, 2.5, np.float64(3), True, "5", None):
            with pytest.raises(ValueError, match=f"{name} must be a non-negative integer"):
                AdaLoRAConfig(total_step=100, target_modules=TARGETS, **{name: bad})
    for name in ("beta1", "beta2"):
        for bad in (0, 1, 1.5, -0.1, float("nan"), True, "0.85", None):
            with pytest.raises(ValueError, match=f"{name} must be"):
                AdaLoRAConfig(target_modules=TARGETS, **{name: bad})


def test_peft_and_alignlab_adalora_files_load_as_the_same_config(tmp_path):
    """What PEFT writes, and what we write, comes back with the same values and Python types as before."""
    peft = pytest.importorskip("peft")
    kw = dict(init_r=4, target_r=2, total_step=10, tinit=1, tfinal=2, deltaT=2, beta1=0.8, beta2=0.9, orth_reg_weight=1)
    theirs = peft.AdaLoraConfig(**kw, lora_alpha=6, lora_dropout=0.1, target_modules=TARGETS)
    peft.get_peft_model(make_tiny_llama(), theirs).save_pretrained(str(tmp_path / "p"))
    expected = AdaLoRAConfig(**{**kw, "orth_reg_weight": 1.0}, alpha=6.0, dropout=0.1, target_modules=TARGETS)
    loaded = AdaLoRAConfig.from_peft(json.loads((tmp_path / "p" / "adapter_config.json").read_text()))
    assert config_fields(loaded) == config_fields(expected)
    ours = AdaLoRAConfig(**kw, alpha=6, dropout=0.1, target_modules=TARGETS)
    # save_adapter writes the model's task type (a tiny LlamaForCausalLM), and it is read back
    assert config_fields(AdaLoRAConfig.from_peft(saved_adapter_config(tmp_path / "a", ours))) == \
        config_fields(expected) | {"task_type": ("CAUSAL_LM", str)}


@pytest.mark.parametrize("field, value, match", [
    ("init_r", 4.5, "init_r must be an integer, got 4.5"),  # int(4.5) would give rank 4
    ("target_r", "2", "target_r must be an integer"),
    ("total_step", True, "total_step must be an integer"),
    ("deltaT", 1.0, "deltaT must be an integer"),
    ("lora_alpha", "6", "lora_alpha must be a number"),
    ("beta1", float("nan"), "beta1 must be a finite number"),
    ("orth_reg_weight", False, "orth_reg_weight must be a number"),
    ("lora_dropout", "0.1", "lora_dropout must be a number"),
    ("rank_pattern", {"model.layers.0.self_attn.q_proj.lora_E": ["false", True, True, True]}, "rank_pattern must map"),
    ("rank_pattern", {"model.layers.0.self_attn.q_proj.lora_E": [0, 1, 1, 1]}, "rank_pattern must map"),
])
def test_adalora_config_fields_of_the_wrong_type_are_refused(tmp_path, field, value, match):
    raw = saved_adapter_config(tmp_path, AdaLoRAConfig(init_r=4, target_r=2, total_step=10, target_modules=TARGETS))
    with pytest.raises(ValueError, match=f"adapter_config.json: {match}"):
        AdaLoRAConfig.from_peft({**raw, field: value})
    del raw["init_r"]
    with pytest.raises(ValueError, match="adapter_config.json: init_r is missing"):
        AdaLoRAConfig.from_peft(raw)


def test_peft_adalora_file_with_trainable_token_rows_is_refused_naming_the_field(tmp_path):
    """PEFT trains token rows next to AdaLoRA too (``trainable_token_indices``, a LoraConfig field AdaLoraConfig
    inherits); alignlab's AdaLoRA has none, and the file was refused as a key matching no module, without the cause."""
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(make_tiny_llama(), peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                                       target_modules=TARGETS, trainable_token_indices=[3]))
    theirs.save_pretrained(tmp_path)
    model = make_tiny_llama()
    with pytest.raises(ValueError, match=r"trainable_token_indices=\[3\] is not supported by alignlab for AdaLoRA"):
        load_adapter(model, tmp_path)
    assert not list(adapter_layers(model))


@pytest.mark.parametrize("field, value, match", [
    ("r", 2.7, "r must be an integer, got 2.7"),
    ("alpha", "8", "alpha must be a number"),
    ("dropout", float("inf"), "dropout must be a finite number"),
])
def test_sora_config_fields_of_the_wrong_type_are_refused(tmp_path, field, value, match):
    raw = saved_adapter_config(tmp_path, SoRAConfig(r=4, target_modules=TARGETS))
    loaded = SoRAConfig.from_peft(raw)
    assert (loaded.r, loaded.alpha, loaded.dropout) == (4, 8.0, 0.0) and type(loaded.r) is int
    with pytest.raises(ValueError, match=f"adapter_config.json: {match}"):
        SoRAConfig.from_peft({**raw, field: value})


def test_allocator_scores_layers_a_batch_did_not_reach_as_zero_gradients():
    # a module the data never reaches (or reaches now and then) has no .grad: PEFT crashes, we raised KeyError when
    # masking; its sensitivity is that of a zero gradient, so its EMAs decay and its ranks go first
    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x, use_c):
            return self.a(x) + (self.c(x) if use_c else 0)  # b: never reached

    torch.manual_seed(0)
    model = TwoPaths()
    cfg = AdaLoRAConfig(init_r=4, target_r=2, total_step=6, tinit=1, tfinal=1, beta1=0.8, target_modules=["a", "b", "c"])
    inject(model, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_E" in n:
                p.normal_()
    alloc = AdaLoRAAllocator(model, cfg)
    x = torch.randn(5, 8)
    for step in range(6):
        model.zero_grad(set_to_none=True)
        model(x, use_c=step % 2 == 0).square().mean().backward()
        before = alloc.ipt_avg.get(("c", "lora_E"))
        _, pattern = alloc.step(step)
        if step % 2 == 1 and step < 5:  # c not reached: Ī ← β₁ Ī (none updated in the final phase, from step 5)
            torch.testing.assert_close(alloc.ipt_avg[("c", "lora_E")], 0.8 * before)
    assert pattern["b.lora_E"] == [False] * 4
    assert sum(active_ranks(model).values()) == 3 * 2


@pytest.mark.parametrize("kind", ["sora", "adalora"])
def test_gates_of_a_merged_adapter_are_not_changed(kind):
    # the proximal step (or rank masking) on a merged adapter changed λ under the merged ΔW, so unmerge subtracted
    # another ΔW and left the base weight changed for good (0.69 off on a tiny Llama)
    base = make_tiny_llama()
    cfg = SoRAConfig(r=4, target_modules=TARGETS) if kind == "sora" else \
        AdaLoRAConfig(init_r=4, target_r=1, total_step=4, target_modules=TARGETS)
    model = inject(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_E["default"].normal_()
            layer.lora_B["default"].normal_()
    alloc = AdaLoRAAllocator(model, cfg) if kind == "adalora" else None
    model(IDS).logits.square().mean().backward()
    merge(model)
    with pytest.raises(ValueError, match="is merged"):
        sora_proximal_step(model, lr=0.5, sparsity=1.0) if kind == "sora" else alloc.step(3)
    unmerge(model)
    for (_, layer), (_, plain) in zip(adapter_layers(model), ((n, base.get_submodule(n)) for n, _ in adapter_layers(model))):
        torch.testing.assert_close(layer.base_layer.weight, plain.weight, rtol=0, atol=1e-6)


def test_rank_pattern_lists_hold_one_flag_per_initial_rank():
    # a 3-flag list with init_r=4 gave the layer rank 3 here, and PEFT failed to load the saved file (IndexError)
    key = "model.layers.0.self_attn.q_proj.lora_E"
    with pytest.raises(ValueError, match=r"init_r=4 flags each, got lengths \{'model.layers.0.self_attn.q_proj.lora_E': 3\}"):
        AdaLoRAConfig(init_r=4, target_r=2, rank_pattern={key: [True, False, True]})
    cfg = AdaLoRAConfig(init_r=4, target_r=2, rank_pattern={key: [True, False, True, False]}, target_modules=TARGETS)
    model = inject(make_tiny_llama(), cfg)
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].shape[0] == 2


def test_rank_pattern_keys_naming_no_adapted_module_warn():
    """A misspelt AdaLoRA rank_pattern key was ignored without a word (the module trained at init_r), where LoRA and
    LoKr warn for keys that match nothing."""
    import warnings

    good, typo = "model.layers.0.self_attn.q_proj.lora_E", "model.layers.0.self_atn.q_proj.lora_E"
    cfg = AdaLoRAConfig(init_r=4, target_r=2, rank_pattern={good: [True] * 2 + [False] * 2, typo: [True] * 4},
                        target_modules=TARGETS)
    with pytest.warns(RuntimeWarning, match=r"rank_pattern keys \['model.layers.0.self_atn.q_proj.lora_E'\] name none"):
        inject(make_tiny_llama(), cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        inject(make_tiny_llama(), AdaLoRAConfig(init_r=4, target_r=2, rank_pattern={good: [True] * 4},
                                                target_modules=TARGETS))
