"""torch.nn.MultiheadAttention hands out_proj.weight / out_proj.bias to F.multi_head_attention_forward instead of
calling the module, so an adapter on out_proj never runs: "all-linear" leaves it out, a named target is refused."""

import copy

import pytest
import torch
from torch import nn

from alignlab.adapters import IA3Config, LoRAConfig, adapter_layers, inject


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.mlp(x)


X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("config", [LoRAConfig(r=2, target_modules="all-linear"),
                                    IA3Config(target_modules="all-linear", feedforward_modules=["mlp.2"])])
def test_all_linear_leaves_out_the_attention_output_projection(config):
    torch.manual_seed(0)
    block = Block().eval()
    model = inject(copy.deepcopy(block), config)
    assert [n for n, _ in adapter_layers(model)] == ["mlp.0", "mlp.2"]
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    assert not torch.allclose(model(X), block(X))  # raised AttributeError: no attribute 'bias' (out_proj wrapped)


def test_naming_the_attention_output_projection_is_refused():
    with pytest.raises(ValueError, match="'attn.out_proj' is the out_proj of a torch nn.MultiheadAttention"):
        inject(Block(), LoRAConfig(r=2, target_modules=["out_proj", "mlp.0"]))


def test_transformer_encoder_trains_with_all_linear():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
                                enable_nested_tensor=False)
    model = inject(enc, LoRAConfig(r=2, target_modules="all-linear"))
    assert sorted({n.split(".")[-1] for n, _ in adapter_layers(model)}) == ["linear1", "linear2"]
    model(X).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
