"""What ``inject`` / ``load_adapter`` keep to put back base weights that a PiSSA / OLoRA init rewrote (ed21e41,
5616966): nothing for a model on the meta device (there is no data; ``inject`` refused such a model with
``NotImplementedError: Cannot copy out of meta tensor``, where it built it before), and one host copy per target
during a load (``load_adapter`` took one, then ``inject`` a second of every target: twice the targets' bytes)."""

import importlib

import pytest
import torch
from torch import nn

from alignlab.adapters import LoRAConfig, inject, load_adapter, save_adapter

inject_module = importlib.import_module("alignlab.adapters.inject")  # the package's name ``inject`` is the function


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_a_meta_model_takes_a_pissa_or_olora_adapter(init):
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    inject(net, LoRAConfig(r=2, target_modules=["0", "2"], init=init))
    assert net[0].base_layer.weight.is_meta and net[2].lora_B["default"].weight.shape == (8, 2)


def _count_copies(monkeypatch) -> list:
    calls = []
    keep = inject_module._kept_base_weight

    def counted(module):
        calls.append(module)
        return keep(module)

    monkeypatch.setattr(inject_module, "_kept_base_weight", counted)
    return calls


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_load_keeps_one_copy_of_each_target(init, tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6))
    save_adapter(inject(net, LoRAConfig(r=2, target_modules=["0", "2"], init=init)), tmp_path)
    calls = _count_copies(monkeypatch)
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6))
    load_adapter(fresh, tmp_path)
    assert [id(m) for m in calls] == [id(fresh[0].base_layer), id(fresh[2].base_layer)]
    calls.clear()
    inject(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6)), LoRAConfig(r=2, target_modules=["0", "1"], init=init))
    assert len(calls) == 2  # a plain inject: one each, as before
