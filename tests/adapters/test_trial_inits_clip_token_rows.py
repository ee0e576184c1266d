"""``trainable_token_indices`` on a model whose ``get_input_embeddings()`` raises ``NotImplementedError``.

transformers' ``CLIPModel`` (two towers, no single input embedding) raises there. Rows named by module
(``{"token_embedding": ids}``, which PEFT takes) failed with that ``NotImplementedError`` from the tie lookup, and a
plain list of ids with it too instead of the ``ValueError`` that asks for ``{module name: [ids]}``.
"""

import pytest
import torch

from alignlab.adapters import LoRAConfig, inject, save_adapter

transformers = pytest.importorskip("transformers")


def make_tiny_clip():
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=16)
    return transformers.CLIPModel(config).eval()


def _logits(model, ids, pixels):
    return model(input_ids=ids, pixel_values=pixels).logits_per_image


def test_rows_named_by_module_on_clip_train_only_those_rows_and_match_peft(tmp_path):
    peft = pytest.importorskip("peft")
    ids, pixels = torch.tensor([[1, 3, 5, 9, 2], [1, 7, 3, 4, 2]]), torch.randn(2, 3, 16, 16)
    model = make_tiny_clip()
    inject(model, LoRAConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"token_embedding": [3, 5]}))
    layer = model.text_model.embeddings.token_embedding
    with torch.no_grad():
        layer.trainable_tokens_delta["default"].add_(torch.randn(2, 32))
    _logits(model, ids, pixels).sum().backward()
    assert layer.trainable_tokens_delta["default"].grad.abs().sum() > 0
    assert not layer.base_layer.weight.requires_grad
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_tiny_clip(), tmp_path).eval()
    torch.testing.assert_close(_logits(theirs, ids, pixels), _logits(model, ids, pixels))


def test_a_list_of_ids_on_clip_is_a_value_error_asking_for_the_module():
    model = make_tiny_clip()
    with pytest.raises(ValueError, match=r"trainable_token_indices: found no single input embedding"):
        inject(model, LoRAConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 5]))
    assert type(model.text_model.encoder.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_every_input_embedding_lookup_takes_a_model_without_one():
    """The other callers of ``get_input_embeddings()`` (soft prompts' embedding lookup, the decoding companions'
    vocabulary size, LoRA's check of embeddings read elsewhere, PEFT-file table ids) go through one helper,
    ``hf_embedding``: None where transformers cannot name one module; soft prompts then take the first embedding."""
    from torch import nn

    from alignlab.adapters.base import hf_embedding
    from alignlab.adapters.prompt import _input_embedding_name
    from alignlab.decoding.companion import vocab_size

    clip = make_tiny_clip()
    with pytest.raises(NotImplementedError):
        clip.get_input_embeddings()  # what leaked before
    assert hf_embedding(clip) is None and hf_embedding(nn.Linear(2, 2)) is None
    assert _input_embedding_name(clip, None) == "text_model.embeddings.token_embedding"
    assert vocab_size(clip) is None  # no single table, and CLIPConfig has no top-level vocab_size
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                                   num_hidden_layers=1, num_attention_heads=2))
    assert hf_embedding(llama) is llama.model.embed_tokens and vocab_size(llama) == 64
