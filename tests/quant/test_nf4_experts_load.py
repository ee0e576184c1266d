"""NF4Experts.load_state_dict refuses a checkpoint quantized with the other double_quant setting: its block scales
(uint8 codes with double quantization, fp32 without) have the same shape, and copy_ cast one into the other."""

import pytest
import torch

from alignlab.quant import quantize_model
from alignlab.quant.experts import NF4Experts

transformers = pytest.importorskip("transformers")


def _mixtral():
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg).eval()


@pytest.mark.parametrize("saved_dq, loading_dq", [(True, False), (False, True)])
@pytest.mark.parametrize("strict", [True, False])
def test_other_double_quant_is_refused_and_nothing_is_copied(saved_dq, loading_dq, strict):
    torch.manual_seed(0)
    saved = quantize_model(_mixtral(), double_quant=saved_dq, compute_dtype=torch.float32)
    model = quantize_model(_mixtral(), double_quant=loading_dq, compute_dtype=torch.float32)
    experts = next(m for m in model.modules() if isinstance(m, NF4Experts))
    before = {k: v.clone() for k, v in experts.state_dict().items()}
    # with strict=False this loaded: scale codes read as scales (or scales truncated to codes), output 0.6 off
    with pytest.raises(RuntimeError, match="_qabsmax: the checkpoint holds .* double_quant"):
        model.load_state_dict(saved.state_dict(), strict=strict)
    after = experts.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_same_settings_still_load():
    torch.manual_seed(0)
    saved = quantize_model(_mixtral(), compute_dtype=torch.float32)
    model = quantize_model(_mixtral(), compute_dtype=torch.float32)
    model.load_state_dict(saved.state_dict())
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, saved(input_ids=ids).logits)
