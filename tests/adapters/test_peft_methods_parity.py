"""PEFT parity for the non-LoRA families on a tiny random Llama: same outputs, files load both ways."""

import copy
import json
import warnings

import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters import (
    AdaLoRAConfig,
    IA3Config,
    LoKrConfig,
    VeRAConfig,
    adapter_layers,
    inject,
    load_adapter,
    save_adapter,
)

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
TOL = dict(rtol=1e-4, atol=1e-5)

# (ours, theirs) pairs of equivalent configs
METHODS = {
    "ia3": (lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
            lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "vera": (lambda: VeRAConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], projection_prng_key=7),
             lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], projection_prng_key=7)),
    "lokr": (lambda: LoKrConfig(r=2, alpha=6, target_modules=["q_proj", "v_proj", "down_proj"]),
             lambda: peft.LoKrConfig(r=2, alpha=6, target_modules=["q_proj", "v_proj", "down_proj"])),
    "lokr_both": (lambda: LoKrConfig(r=1, alpha=2, target_modules=["o_proj", "up_proj"], decompose_both=True, decompose_factor=4),
                  lambda: peft.LoKrConfig(r=1, alpha=2, target_modules=["o_proj", "up_proj"], decompose_both=True, decompose_factor=4)),
    "adalora": (lambda: AdaLoRAConfig(init_r=4, target_r=2, alpha=6, total_step=10, target_modules=["q_proj", "v_proj"]),
                lambda: peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=6, total_step=10, target_modules=["q_proj", "v_proj"])),
}


def _randomise(model, seed, predicate):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if predicate(n, p):
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_saved_by_alignlab_loads_in_peft(tmp_path, method):
    ours_cfg, _ = METHODS[method]
    base = make_tiny_llama()
    ours = inject(copy.deepcopy(base), ours_cfg())
    _randomise(ours, 1, lambda n, p: p.requires_grad)
    save_adapter(ours, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["peft_type"] == ours_cfg().peft_type
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    torch.testing.assert_close(theirs(IDS).logits, ours(IDS).logits, **TOL)
    assert not torch.allclose(ours(IDS).logits, base(IDS).logits, **TOL)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_saved_by_peft_loads_in_alignlab(tmp_path, method):
    ours_cfg, theirs_cfg = METHODS[method]
    base = make_tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), theirs_cfg())
    ours_fresh = inject(copy.deepcopy(base), ours_cfg())
    # same initialisation where the method fixes it: identity at the start on both sides
    torch.testing.assert_close(theirs(IDS).logits, ours_fresh(IDS).logits, **TOL)
    _randomise(theirs, 2, lambda n, p: p.requires_grad)
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = load_adapter(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, **TOL)


def test_vera_projections_equal_peft():
    base = make_tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), METHODS["vera"][1]())
    ours = inject(copy.deepcopy(base), METHODS["vera"][0]())
    proj = next(iter(adapter_layers(ours)))[1].projections["default"]
    torch.testing.assert_close(proj.A, theirs.base_model.vera_A["default"], rtol=0, atol=0)
    torch.testing.assert_close(proj.B, theirs.base_model.vera_B["default"], rtol=0, atol=0)


def test_vera_without_saved_projection_regenerates_them(tmp_path):
    base = make_tiny_llama()
    cfg = peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"], projection_prng_key=3, save_projection=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    _randomise(theirs, 4, lambda n, p: p.requires_grad)
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = load_adapter(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, **TOL)


@pytest.mark.parametrize("method", ["ia3", "lokr", "lokr_both", "vera", "adalora"])
def test_gradients_match_peft(method):
    ours_cfg, theirs_cfg = METHODS[method]
    base = make_tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), theirs_cfg())
    _randomise(theirs, 5, lambda n, p: p.requires_grad)
    ours = inject(copy.deepcopy(base), ours_cfg())
    state = {k.replace("base_model.model.", "").replace(".default", ""): v for k, v in theirs.state_dict().items()}
    with torch.no_grad():
        for name, layer in adapter_layers(ours):
            for key, t in layer.peft_tensors("default").items():
                t.copy_(state[f"{name}.{key}"])
    theirs(IDS).logits.square().mean().backward()
    ours(IDS).logits.square().mean().backward()
    g_theirs = {n.replace("base_model.model.", "").replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, layer in adapter_layers(ours):
        for key, t in layer.peft_tensors("default").items():
            p = next(q for n, q in layer.named_parameters() if n.startswith(key + ".") and n.endswith("default"))
            want = g_theirs[f"{name}.{key}"].reshape(p.shape)
            scale = want.abs().max().clamp_min(1e-12)
            torch.testing.assert_close(p.grad / scale, want / scale, **TOL, msg=f"{name}.{key}")


MASK = torch.tensor([[1] * 9, [0, 0, 0] + [1] * 6])


def _copy_prefix_into_peft(ours, theirs):
    enc = ours.get_input_embeddings().prefix_encoder["default"]
    pe = theirs.prompt_encoder["default"]
    with torch.no_grad():
        pe.embedding.weight.copy_(enc.embedding)
        if enc.transform is not None:
            for i in (0, 2):
                pe.transform[i].weight.copy_(enc.transform[i].weight)
                pe.transform[i].bias.copy_(enc.transform[i].bias)


@pytest.mark.parametrize("method", ["prompt", "prefix", "prefix_projection"])
def test_soft_prompts_match_peft_and_load_both_ways(tmp_path, method):
    from alignlab.adapters import PrefixTuningConfig, PromptTuningConfig

    base = make_tiny_llama()
    if method == "prompt":
        ours = inject(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=3, seed=2))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
        with torch.no_grad():
            theirs.prompt_encoder["default"].embedding.weight.copy_(ours.get_input_embeddings().prompt_embeddings["default"])
    else:
        proj = method == "prefix_projection"
        ours = inject(copy.deepcopy(base), PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=proj, encoder_hidden_size=8))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=proj, encoder_hidden_size=8))
        _copy_prefix_into_peft(ours, theirs)
    kw = dict(input_ids=IDS, attention_mask=MASK, labels=IDS)
    a, b = ours(**kw), theirs(**kw)
    torch.testing.assert_close(a.logits, b.logits, **TOL)
    torch.testing.assert_close(a.loss, b.loss, **TOL)
    assert not torch.allclose(a.logits[:, -9:], base(input_ids=IDS, attention_mask=MASK).logits, **TOL)
    # alignlab -> PEFT
    save_adapter(ours, tmp_path / "a")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    torch.testing.assert_close(loaded(**kw).logits, a.logits, **TOL)
    # PEFT -> alignlab
    theirs.save_pretrained(str(tmp_path / "p"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = load_adapter(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(again(**kw).logits, a.logits, **TOL)


def test_adalora_file_after_allocation_loads_in_alignlab(tmp_path):
    """PEFT saves only the kept ranks (rank_pattern): alignlab rebuilds the smaller layers, same outputs."""
    base = make_tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=6, total_step=6, tinit=1, tfinal=2, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.1)
    _randomise(theirs, 6, lambda n, p: "lora_E" in n)
    for step in range(6):
        theirs(IDS).logits.square().mean().backward()
        opt.step()
        theirs.base_model.update_and_allocate(step)
        opt.zero_grad()
    theirs.save_pretrained(str(tmp_path / "p"))
    raw = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert raw["rank_pattern"]
    ours = load_adapter(copy.deepcopy(base), tmp_path / "p")
    ranks = {n: l.lora_A["default"].shape[0] for n, l in adapter_layers(ours)}
    assert sum(ranks.values()) == 2 * 4 and sorted(set(ranks.values())) != [4]
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, **TOL)
    save_adapter(ours, tmp_path / "a")  # and back: the reduced layers with the same rank_pattern
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    torch.testing.assert_close(again(IDS).logits, theirs(IDS).logits, **TOL)
