"""The adapter functions given a ``DistributedDataParallel`` wrapper (one gloo process, in this process) act on the
model inside it, as ``save_adapter`` / ``load_adapter`` do."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from alignlab.adapters import (LoRAConfig, active_adapters, adapter_configs, add_weighted_adapter, adapter_layers,
                               delete_adapter, disabled, inject, merge, merge_and_unload, set_adapter, unmerge)

if not dist.is_available():  # pragma: no cover - every CPU wheel ships gloo
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    inject(model, LoRAConfig(r=2, alpha=4, target_modules=["0", "2"]))
    inject(model, LoRAConfig(r=2, alpha=4, target_modules=["0", "2"]), adapter_name="b")
    for _, layer in adapter_layers(model):
        for name in layer.lora_B:
            nn.init.normal_(layer.lora_B[name].weight)
    return model


def test_adapter_functions_unwrap_a_ddp_model(world_of_one):
    """On the wrapper ``adapter_configs`` was ``{}``, ``active_adapters`` ``[]`` and ``set_adapter(ddp, "b")`` said
    adapter 'b' was not found (they looked for the adapter list on the wrapper); ``merge_and_unload`` left the list
    on the inner model after removing its layers."""
    model = _model()
    ddp = DistributedDataParallel(model)
    x = torch.randn(3, 8)
    assert sorted(adapter_configs(ddp)) == ["b", "default"]
    assert active_adapters(ddp) == ["default"]

    set_adapter(ddp, "b")
    assert active_adapters(model) == ["b"]
    with torch.no_grad():
        want_b = model(x)
        with disabled(ddp):
            base = model(x)
        assert not torch.allclose(want_b, base)
        merge(ddp, "b")
        torch.testing.assert_close(ddp(x), want_b)
        unmerge(ddp)

    with pytest.raises(ValueError, match="add_weighted_adapter before ddp_model"):
        add_weighted_adapter(ddp, ["default", "b"], [0.5, 0.5], "mix")
    assert sorted(adapter_configs(model)) == ["b", "default"]

    with pytest.warns(UserWarning, match="'default' is now the active adapter"):
        delete_adapter(ddp, "b")
    assert sorted(adapter_configs(model)) == ["default"]
    with torch.no_grad():
        want = model(x)
    assert merge_and_unload(ddp) is ddp
    assert not list(adapter_layers(model)) and adapter_configs(model) == {} and active_adapters(model) == []
    with torch.no_grad():
        torch.testing.assert_close(ddp(x), want)
