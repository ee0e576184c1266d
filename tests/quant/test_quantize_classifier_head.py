"""quantize_model leaves a transformers classifier's head dense, as transformers + bitsandbytes do.

``transformers`` (``get_keys_to_not_convert``) keeps the module of a model's last parameter in full precision, besides
the output embeddings: a reward model's ``score`` (``…ForSequenceClassification``, ``num_labels=1``). It was quantized
here (it has no output embeddings): a 4-bit HF reward-model checkpoint, whose ``score.weight`` is dense, failed to
load, and ``inject(..., modules_to_save=["score"])``, the QLoRA reward-model recipe, was refused.
"""
import pytest
import torch
from torch import nn

from alignlab.adapters import LoRAConfig, inject, load_adapter, save_adapter
from alignlab.losses import bradley_terry_loss
from alignlab.quant import NF4Linear, quantize_model

transformers = pytest.importorskip("transformers")


def _reward_model():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForSequenceClassification(cfg)


def test_score_head_stays_dense_and_the_rest_is_quantized():
    model = quantize_model(_reward_model(), compute_dtype=torch.float32)
    assert type(model.score) is nn.Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, NF4Linear)
    head = quantize_model(_reward_model(), compute_dtype=torch.float32, quantize_head=True)
    assert isinstance(head.score, NF4Linear)


def test_last_parameter_rule_is_transformers_own():
    # transformers strips ".weight" only: a classifier whose last parameter is a bias is quantized there too
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, num_labels=2)
    model = quantize_model(transformers.BertForSequenceClassification(cfg), compute_dtype=torch.float32)
    assert isinstance(model.classifier, NF4Linear)


def test_qlora_reward_model_trains_the_head_and_round_trips(tmp_path):
    model = quantize_model(_reward_model(), compute_dtype=torch.float32)
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["score"]))
    ids = torch.randint(1, 64, (4, 7))
    rewards = model(input_ids=ids).logits.squeeze(-1)
    loss, _ = bradley_terry_loss(rewards[:2], rewards[2:])
    loss.backward()
    head = model.score.modules_to_save["default"].weight
    assert head.grad is not None and head.grad.abs().sum() > 0
    with torch.no_grad():
        head.add_(0.5)
        expected = model(input_ids=ids).logits
    save_adapter(model, tmp_path)
    fresh = quantize_model(_reward_model(), compute_dtype=torch.float32)
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected)


def test_hf_4bit_reward_checkpoint_loads(tmp_path):
    pytest.importorskip("bitsandbytes")
    _reward_model().save_pretrained(tmp_path / "dense")
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
    try:
        hf = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "dense", quantization_config=bnb,
                                                                         device_map="cpu")
    except Exception as e:  # bitsandbytes builds without a CPU backend
        pytest.skip(f"bitsandbytes 4-bit on CPU: {e}")
    state = hf.state_dict()
    assert "score.weight" in state and not any(k.startswith("score.weight.") for k in state)
    model = quantize_model(_reward_model(), compute_dtype=torch.float32)
    model.load_state_dict(state, strict=True)  # failed: score.weight is missing its NF4 keys
    assert set(model.state_dict()) == set(state)
