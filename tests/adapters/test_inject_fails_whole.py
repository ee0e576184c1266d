"""A target that refuses the adapter (a LoRA on a layer holding (IA)^3) fails ``inject`` with the model as it was.

The targets before it in model order used to stay wrapped with an adapter that no config described, so the
corrected call failed with "adapter 'lora' already exists on this layer"."""

import pytest
import torch
from torch import nn

from alignlab.adapters import IA3Config, LoRAConfig, adapter_configs, inject


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))


def test_a_refused_target_leaves_every_other_target_as_it_was():
    net = _net()
    inject(net, IA3Config(target_modules=["1"], feedforward_modules=[]), adapter_name="ia3")
    flags = [p.requires_grad for p in net.parameters()]
    with pytest.raises(ValueError, match="'1' already holds a IA3Linear"):
        inject(net, LoRAConfig(r=2, target_modules="all-linear"), adapter_name="lora")
    assert [type(m).__name__ for m in net] == ["Linear", "IA3Linear", "Linear"]
    assert list(adapter_configs(net)) == ["ia3"] and list(net[1].ia3_l) == ["ia3"]
    assert [p.requires_grad for p in net.parameters()] == flags
    inject(net, LoRAConfig(r=2, target_modules=["0", "2"]), adapter_name="lora")   # the corrected call
    assert [type(m).__name__ for m in net] == ["LoRALinear", "IA3Linear", "LoRALinear"]


def test_a_refusal_after_some_layers_took_the_adapter_takes_it_back():
    net = _net()
    inject(net, LoRAConfig(r=2, target_modules=["0"]), adapter_name="a")
    inject(net, IA3Config(target_modules=["2"], feedforward_modules=[]), adapter_name="ia3")
    with pytest.raises(ValueError, match="'2' already holds a IA3Linear"):
        inject(net, LoRAConfig(r=2, target_modules="all-linear"), adapter_name="b")
    assert list(net[0].lora_A) == ["a"] and type(net[1]) is nn.Linear
    assert sorted(adapter_configs(net)) == ["a", "ia3"]


def test_a_refused_new_layer_unwraps_the_ones_built_before_it():
    net = nn.Sequential(nn.Linear(4, 4), nn.Embedding(10, 4))
    flags = [p.requires_grad for p in net.parameters()]
    with pytest.raises(ValueError, match="DoRA on the embedding '1'"):
        inject(net, LoRAConfig(r=2, target_modules=["0", "1"], use_dora=True))
    assert type(net[0]) is nn.Linear and type(net[1]) is nn.Embedding
    assert [p.requires_grad for p in net.parameters()] == flags and adapter_configs(net) == {}


def _state(net):
    return {k: v.detach().clone() for k, v in net.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_a_refusal_after_a_pissa_or_olora_init_puts_the_rewritten_base_weight_back(init):
    # PiSSA / OLoRA leave W - s·BA in the base; the embedding refuses the init later, and the rolled-back model kept
    # the residual as its weight (put back as the plain module, but no longer the model it was)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Linear(6, 6), nn.Embedding(10, 4))
    inject(net, LoRAConfig(r=2, target_modules=["0"]), adapter_name="a")   # a layer that already holds an adapter
    names, state = [n for n, _ in net.named_modules()], _state(net)
    with pytest.raises(ValueError, match=f"init={init!r} is not supported on the embedding '2'"):
        inject(net, LoRAConfig(r=2, target_modules=["1", "2"], init=init), adapter_name="b")
    assert [n for n, _ in net.named_modules()] == names and list(adapter_configs(net)) == ["a"]
    after = net.state_dict()
    assert list(after) == list(state)
    for key, value in state.items():
        assert torch.equal(after[key], value), key
    inject(net, LoRAConfig(r=2, target_modules=["1"], init=init), adapter_name="b")   # the corrected call
    torch.testing.assert_close(net[1].base_layer.weight + net[1].delta_weight("b"), state["1.weight"])


def test_a_pissa_refusal_on_an_nf4_base_leaves_its_packed_weight():
    from alignlab.adapters.inject import _kept_base_weight
    from alignlab.quant.linear import NF4Linear

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), NF4Linear.from_linear(nn.Linear(64, 64)))
    before = {k: v.clone() for k, v in net[1]._buffers.items() if v is not None}
    with pytest.raises(ValueError, match="not supported on a quantized base"):
        inject(net, LoRAConfig(r=2, target_modules=["0", "1"], init="pissa"))
    assert type(net[0]) is nn.Linear and type(net[1]) is NF4Linear
    assert all(torch.equal(net[1]._buffers[k], v) for k, v in before.items())
    # were PiSSA allowed there, a re-quantized base would be put back bit for bit too
    restore = _kept_base_weight(net[1])
    net[1].load_dense_weight_(torch.randn(64, 64))
    assert not torch.equal(net[1].qdata, before["qdata"])
    restore()
    assert all(torch.equal(net[1]._buffers[k], v) for k, v in before.items())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_failed_load_of_a_pissa_or_olora_file_puts_the_base_weights_back(init, tmp_path):
    # the file's init wrote W - s·BA into every target before the missing key was found; the adapter was deleted,
    # the residuals stayed
    from safetensors.torch import load_file, save_file

    from alignlab.adapters import load_adapter, save_adapter

    torch.manual_seed(0)
    save_adapter(inject(_net(), LoRAConfig(r=2, target_modules=["0", "2"], init=init)), tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    del weights[sorted(weights)[-1]]
    save_file(weights, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    net = _net()
    state = _state(net)
    with pytest.raises(ValueError, match="adapter file lacks 1 key"):
        load_adapter(net, tmp_path)
    assert [type(m) for m in net] == [nn.Linear] * 3 and adapter_configs(net) == {}
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
