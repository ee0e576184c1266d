"""An NF4 model built on the meta device (deferred init, key listing before loading real weights):
``state_dict()`` raised 'Tensor.item() cannot be called on meta tensors' (the bitsandbytes metadata's
nested offset). Its entries are now meta tensors with the keys a real layer has."""

import pytest
import torch
from torch import nn

from alignlab.adapters import LoRAConfig, inject
from alignlab.quant import NF4Linear
from alignlab.quant.fsdp import shardable_nf4_


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("wrap", ["plain", "lora", "shardable"])
def test_meta_state_dict_has_the_real_keys_on_meta(double_quant, wrap):
    def build(device):
        torch.manual_seed(0)
        model = nn.Sequential(NF4Linear.from_linear(nn.Linear(128, 64, device=device), double_quant=double_quant,
                                                    compute_dtype=torch.float32))
        if wrap == "lora":
            model = inject(model, LoRAConfig(r=2, target_modules=["0"]))
        elif wrap == "shardable":
            model = shardable_nf4_(model)
        return model

    real, meta = build("cpu").state_dict(), build("meta").state_dict()
    assert sorted(meta) == sorted(real)
    for k, v in meta.items():
        assert v.is_meta and v.dtype == real[k].dtype, k


def test_meta_layer_takes_real_weights():
    torch.manual_seed(0)
    real = NF4Linear.from_linear(nn.Linear(128, 64), compute_dtype=torch.float32)
    sd = real.state_dict()
    x = torch.randn(3, 128)
    assigned = NF4Linear.from_linear(nn.Linear(128, 64, device="meta"), compute_dtype=torch.float32)
    assigned.load_state_dict(sd, assign=True)
    filled = NF4Linear.from_linear(nn.Linear(128, 64, device="meta"), compute_dtype=torch.float32).to_empty(device="cpu")
    filled.load_state_dict(sd)
    for layer in (assigned, filled):
        torch.testing.assert_close(layer(x), real(x), rtol=0, atol=0)
