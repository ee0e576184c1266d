"""quantize_model leaves the modules a transformers model keeps in full precision (``_keep_in_fp32_modules``)."""
import pytest
import torch
from torch import nn

from alignlab.quant import NF4Linear, quantize_model
from alignlab.quant.linear import _kept

transformers = pytest.importorskip("transformers")


def test_t5_wo_stays_dense_and_forward_runs():
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                                num_heads=4, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(1, 64, (2, 5))
    quantize_model(model, compute_dtype=torch.float32)
    wo = [n for n, m in model.named_modules() if n.endswith(".wo")]
    assert wo and all(type(model.get_submodule(n)) is nn.Linear for n in wo)
    assert any(isinstance(m, NF4Linear) for n, m in model.named_modules() if n.endswith(".wi"))
    with torch.no_grad():  # T5's feed-forward reads self.wo.weight.dtype: an NF4 wo had no .weight
        out = model(input_ids=ids, decoder_input_ids=ids).logits
    assert torch.isfinite(out).all()


def test_keep_entries_match_segments_and_ancestors():
    keep = ("wo", "qformer", "gate.weight", "indexer.weights_proj")
    assert _kept("encoder.block.0.layer.1.DenseReluDense.wo", keep)
    assert _kept("qformer.layer.0.attention.query", keep)
    assert _kept("model.layers.3.mlp.gate", keep)
    assert _kept("model.layers.3.self_attn.indexer.weights_proj", keep)
    assert not _kept("model.layers.3.mlp.gate_proj", keep)  # a segment, not a prefix of one
    assert not _kept("model.layers.3.mlp.wout", keep)
    assert not _kept("model.layers.3.mlp.up_proj", ())


def test_plain_modules_without_the_list_are_unchanged():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    quantize_model(model, compute_dtype=torch.float32)
    assert isinstance(model[0], NF4Linear) and isinstance(model[2], NF4Linear)
