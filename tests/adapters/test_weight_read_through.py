"""Model code that reads a wrapped linear's ``.weight`` (T5's feed-forward casts its input to ``self.wo.weight.dtype``)
keeps working under every linear adapter family, with PEFT's outputs; table-changing layers keep refusing it."""

import copy

import pytest
import torch
from torch import nn

from alignlab.adapters import (
    AdaLoRAConfig,
    BitFitConfig,
    IA3Config,
    LoKrConfig,
    LoRAConfig,
    VeRAConfig,
    adapter_layers,
    disabled,
    inject,
    load_adapter,
    save_adapter,
)

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))


def _tiny_t5():
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                decoder_start_token_id=0)
    # frozen as inject leaves it: CPU attention picks another kernel when no input needs a gradient (~1e-6 apart)
    return transformers.T5ForConditionalGeneration(cfg).eval().requires_grad_(False)


def _logits(model):
    return model(input_ids=IDS, decoder_input_ids=IDS).logits


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


CONFIGS = {
    "ia3": lambda: IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"]),
    "lora": lambda: LoRAConfig(r=2, target_modules="all-linear"),
    "vera": lambda: VeRAConfig(r=4, target_modules=["q", "wo"]),
    "lokr": lambda: LoKrConfig(r=2, target_modules=["wo"]),
    "adalora": lambda: AdaLoRAConfig(init_r=4, target_r=2, total_step=10, target_modules=["wo"]),
    "bitfit": lambda: BitFitConfig(target_modules=["wo"]),
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_adapters_on_t5_feed_forward_output_run_and_train(method):
    base = _tiny_t5()
    ref = _logits(base)
    model = inject(copy.deepcopy(base), CONFIGS[method]())
    _perturb(model, 1)
    out = _logits(model)  # raised AttributeError: '...' object has no attribute 'weight'
    assert not torch.allclose(out, ref)
    with disabled(model):
        torch.testing.assert_close(_logits(model), ref, rtol=0, atol=0)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert wo.weight is wo.base_layer.weight  # the frozen base weight, as PEFT's layers give it


def test_ia3_on_t5_matches_peft_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    base = _tiny_t5()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=["k", "v", "wo"],
                                                                     feedforward_modules=["wo"]))
    _perturb(theirs, 2)
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = load_adapter(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-6)
    _perturb(ours, 3)
    save_adapter(ours, tmp_path / "o")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "o"))
    torch.testing.assert_close(_logits(back), _logits(ours), rtol=1e-5, atol=1e-6)


def test_table_changing_layers_do_not_expose_the_frozen_weight():
    emb = nn.Embedding(10, 4)
    model = nn.ModuleDict({"embed_tokens": emb, "lm_head": nn.Linear(4, 10, bias=False)})
    model["lm_head"].weight = emb.weight
    inject(model, LoRAConfig(r=2, target_modules=["embed_tokens"], trainable_token_indices={"lm_head": [1]}))
    kinds = {type(layer).__name__: layer for _, layer in adapter_layers(model)}
    assert set(kinds) == {"LoRAEmbedding", "TrainableTokensLayer"}
    for layer in kinds.values():  # computing with the base table would silently drop the trained rows / LoRA
        with pytest.raises(AttributeError):
            layer.weight


def test_an_adapted_output_head_does_not_expose_the_frozen_table():
    # fused_linear_dpo(h, model.lm_head.weight, ...) would have scored without the head's LoRA (and trained it not)
    from conftest import make_tiny_llama

    model = inject(make_tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(AttributeError, match="no attribute 'weight'"):
        model.lm_head.weight
    assert model.model.layers[0].self_attn.q_proj.weight is model.model.layers[0].self_attn.q_proj.base_layer.weight
    with pytest.raises(AttributeError, match="no attribute 'weight'"):
        inject(make_tiny_llama(), IA3Config(target_modules=["lm_head"], feedforward_modules=[])).lm_head.weight
