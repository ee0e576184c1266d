"""LoRA on a tied ``lm_head`` injected *after* trainable token rows: the head is already a tied
``TrainableTokensLayer`` then, and ``inject`` refused it ("module 'lm_head' already holds a TrainableTokensLayer"),
while the other order nests the LoRA over the rows (PEFT's nesting). Both orders now build the same model: same
module tree, logits, gradients, state dict and adapter files."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import make_tied_llama, randomise_trainable

from alignlab.adapters import LoRAConfig, TrainableTokensLayer, inject, merge_and_unload, save_adapter, set_adapter
from alignlab.adapters.lora import LoRALinear

IDS = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
ROWS = LoRAConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[7, 9])
HEAD = LoRAConfig(r=2, target_modules=["lm_head"])


def _build(order):
    model = make_tied_llama()
    for config, name in order:
        inject(model, config, adapter_name=name)
    set_adapter(model, ["a", "b"])
    return randomise_trainable(model, scale=1.0)


def _both():
    """Both orders, the second holding the first's values (the two draw their LoRA inits in another order)."""
    first, second = _build([(HEAD, "a"), (ROWS, "b")]), _build([(ROWS, "b"), (HEAD, "a")])
    assert {n: p.shape for n, p in first.state_dict().items()} == {n: p.shape for n, p in second.state_dict().items()}
    second.load_state_dict(first.state_dict())
    return first, second


def test_both_orders_build_the_same_model():
    first, second = _both()
    assert isinstance(second.lm_head, LoRALinear) and isinstance(second.lm_head.base_layer, TrainableTokensLayer)
    assert [(n, type(m)) for n, m in first.named_modules()] == [(n, type(m)) for n, m in second.named_modules()]
    rows = second.model.embed_tokens.trainable_tokens_delta["b"]
    assert second.lm_head.base_layer.trainable_tokens_delta["b"] is rows
    assert second.lm_head.base_layer.base_layer.weight is second.model.embed_tokens.base_layer.weight
    trained = [sorted(n for n, p in m.named_parameters(remove_duplicate=False) if p.requires_grad)
               for m in (first, second)]
    assert trained[0] == trained[1]
    with torch.no_grad():
        torch.testing.assert_close(second(input_ids=IDS).logits, first(input_ids=IDS).logits, rtol=0, atol=0)

    for m in (first, second):
        m(input_ids=IDS).logits.square().mean().backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (first, second)]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=0, msg=n)


def test_both_orders_save_the_same_files_and_merge_alike(tmp_path):
    first, second = _both()
    for model, d in ((first, "first"), (second, "second")):
        for name in ("a", "b"):
            save_adapter(model, tmp_path / d / name, adapter_name=name)
    for name in ("a", "b"):
        mine, theirs = (load_file(tmp_path / d / name / "adapter_model.safetensors") for d in ("first", "second"))
        assert mine.keys() == theirs.keys()
        for k in mine:
            torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=0, msg=k)
        assert (tmp_path / "first" / name / "adapter_config.json").read_text() == \
               (tmp_path / "second" / name / "adapter_config.json").read_text()

    with torch.no_grad():
        want = second(input_ids=IDS).logits
    with pytest.warns(UserWarning, match="lm_head.weight is tied"):
        merge_and_unload(second)
    assert type(second.lm_head) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(second(input_ids=IDS).logits, want, rtol=1e-4, atol=1e-4)


def test_refused_lora_over_rows_leaves_the_model_as_it_was():
    model = make_tied_llama()
    inject(model, ROWS, adapter_name="b")
    head = model.lm_head
    with pytest.raises(ValueError, match="use_dora=True is not supported on a head whose trainable token rows"):
        inject(model, LoRAConfig(r=2, target_modules=["q_proj", "lm_head"], use_dora=True), adapter_name="a")
    assert model.lm_head is head and model.model.layers[0].self_attn.q_proj.adapter_names() == ["b"]


def test_rows_of_the_head_its_own_take_no_lora_in_either_order():
    # other ids on the head: it trains rows apart from the embedding's, and a module takes rows or LoRA (PEFT)
    rows = LoRAConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [7], "lm_head": [9]})
    model = inject(make_tied_llama(), HEAD, adapter_name="a")
    with pytest.raises(ValueError, match="'lm_head' also gets a LoRALinear adapter"):
        inject(model, rows, adapter_name="b")
    model = inject(make_tied_llama(), rows, adapter_name="b")
    assert model.lm_head.tied_to is None
    with pytest.raises(ValueError, match="'lm_head' already holds a TrainableTokensLayer"):
        inject(model, HEAD, adapter_name="a")
