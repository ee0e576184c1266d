"""Adapters and a model already wrapped in DistributedDataParallel or sharded by FSDP2 (one gloo process, in this process)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from alignlab.adapters import LoRAConfig, inject, load_adapter, save_adapter
from alignlab.distributed import ddp_model

if not dist.is_available():  # pragma: no cover - every CPU wheel ships gloo
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)


def _model(adapter: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    if adapter:
        inject(model, LoRAConfig(r=2, alpha=4, target_modules=["0", "2"]))
    return model


def test_load_adapter_into_a_ddp_model_copies_into_the_parameters_ddp_reduces(world_of_one, tmp_path):
    """load_adapter unwrapped a DDP model and injected new adapter parameters into it: DDP had registered its
    parameters when it was made, so the new ones were never all-reduced and the ranks trained apart without a
    word (seen at world size 2: after two steps the ranks' lora_B differed). With the adapter injected before
    wrapping, load_adapter said it already existed. It now copies into the adapter the wrapped model has, as
    into a sharded one, and refuses a wrapped model without it."""
    trained = _model(adapter=True)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_()
    save_adapter(trained, tmp_path / "a")

    with pytest.raises(ValueError, match="DistributedDataParallel.*has no adapter 'default'.*then wrap"):
        load_adapter(ddp_model(_model(adapter=False)), tmp_path / "a")

    wrapped = ddp_model(_model(adapter=True))
    reduced = {id(p) for p in wrapped.parameters()}
    load_adapter(wrapped, tmp_path / "a")
    want = dict(trained.named_parameters())
    for name, p in wrapped.module.named_parameters():
        if p.requires_grad:
            assert id(p) in reduced, name
            torch.testing.assert_close(p, want[name], rtol=0, atol=0)
    x = torch.randn(3, 8)
    torch.testing.assert_close(wrapped(x), trained(x))


def test_load_adapter_into_a_wrapped_model_names_the_field_that_differs(world_of_one, tmp_path):
    """The message said only "(LoRAConfig vs LoRAConfig; compared ('r', 'alpha', 'use_rslora', 'use_dora'))"."""
    save_adapter(_model(adapter=True), tmp_path / "a")  # r = 2, alpha = 4
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    inject(model, LoRAConfig(r=8, alpha=4, target_modules=["0", "2"]))
    with pytest.raises(ValueError, match=r"differs from the file's: r: 8 in the model, 2 in the file$"):
        load_adapter(ddp_model(model), tmp_path / "a")


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x)


def test_inject_refuses_a_wrapped_or_sharded_model(world_of_one):
    """inject into a model already wrapped in DDP (or sharded by FSDP2) added adapter parameters that DDP does not
    all-reduce (FSDP2 does not shard or reduce them): each rank trained its own copy, without a word."""
    from alignlab.distributed import shard_model

    with pytest.raises(ValueError, match="DistributedDataParallel.*before ddp_model"):
        inject(ddp_model(_model(adapter=False)), LoRAConfig(r=2, target_modules="all-linear"))
    with pytest.raises(ValueError, match="sharded.*before shard_model"):
        inject(shard_model(nn.Sequential(_Block(), _Block()), block_types=_Block),
               LoRAConfig(r=2, target_modules="all-linear"))


def test_switching_the_active_adapter_after_ddp_model_is_refused_at_the_next_forward(world_of_one):
    """DDP all-reduces the parameters that required grad when it was made: set_adapter(ddp.module, "b") afterwards
    trained b on every rank without all-reducing its gradients (seen at world size 2: after two steps the ranks'
    lora_A of b differed), without a word. The wrapper's next forward with grad now says so."""
    from alignlab.adapters import set_adapter

    model = _model(adapter=True)
    inject(model, LoRAConfig(r=2, target_modules=["0"]), adapter_name="b")
    wrapped = ddp_model(model)
    x = torch.randn(3, 8)
    wrapped(x).sum().backward()  # the adapter trainable when wrapped: fine
    set_adapter(model, "b")
    with torch.no_grad():
        wrapped(x)  # no gradient, nothing to all-reduce: an evaluation of b is fine
    with pytest.raises(ValueError, match=r"parameter '0\.lora_A\.b\.weight' requires grad but did not when ddp_model "
                                         r"wrapped the model.*choose the active adapters before ddp_model"):
        wrapped(x)
    set_adapter(model, "default")
    wrapped(x).sum().backward()  # back to the adapter DDP reduces
    rewrapped = ddp_model(model)
    set_adapter(model, "b")
    with pytest.raises(ValueError, match="lora_A.b"):
        rewrapped(x)
    rewrapped = ddp_model(model)  # wrapped again with b trainable: b is reduced
    rewrapped(x).sum().backward()
    assert model[0].lora_A["b"].weight.grad is not None


def test_a_suffix_rule_file_into_a_wrapped_model_names_the_copies_it_needs(world_of_one, tmp_path):
    """A PEFT <= 0.21 file with modules_to_save=["norm"] holds trained copies of every *_layernorm. Into a plain model
    load_adapter wraps those modules too; a DDP-wrapped model cannot take new copies, and the error was only "adapter
    file has 8 key(s) that match no adapted module". It now names the modules and the modules_to_save to inject
    with before wrapping; injected so, the file loads into the wrapped model as into the plain one."""
    from safetensors.torch import load_file, save_file

    from conftest import make_tiny_llama_classifier, randomise_trainable

    def config(names):
        return LoRAConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS", modules_to_save=names)

    trained = inject(make_tiny_llama_classifier(), config(["norm"]))
    randomise_trainable(trained, seed=3)
    save_adapter(trained, tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    g = torch.Generator().manual_seed(4)
    extra = {f"base_model.model.model.layers.{i}.{ln}.weight": torch.randn(32, generator=g)
             for i in range(2) for ln in ("input_layernorm", "post_attention_layernorm")}
    save_file({**state, **extra}, tmp_path / "adapter_model.safetensors")

    wrapped = ddp_model(inject(make_tiny_llama_classifier(), config(["norm"])))
    with pytest.raises(ValueError, match=r"DistributedDataParallel: the adapter file holds trained copies of 4 "
                                         r"module\(s\).*'model.layers.0.input_layernorm'.*inject with modules_to_save="
                                         r"\['norm', 'model.layers.0.input_layernorm'"):
        load_adapter(wrapped, tmp_path)

    names = ["norm"] + sorted(k.removeprefix("base_model.model.").removesuffix(".weight") for k in extra)
    wrapped = ddp_model(inject(make_tiny_llama_classifier(), config(names)))
    load_adapter(wrapped, tmp_path)
    plain = load_adapter(make_tiny_llama_classifier(), tmp_path)
    ids = torch.randint(0, 64, (2, 5), generator=g)
    torch.testing.assert_close(wrapped(ids).logits, plain(ids).logits, rtol=0, atol=0)
    got = wrapped.module.model.layers[1].post_attention_layernorm.modules_to_save["default"].weight
    torch.testing.assert_close(got, extra["base_model.model.model.layers.1.post_attention_layernorm.weight"])
