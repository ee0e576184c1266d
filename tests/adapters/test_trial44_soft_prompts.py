"""Soft prompts on an encoder classifier (BERT: segment ids, sequence labels) and prefix tuning under
gradient checkpointing."""

import copy

import pytest
import torch

from conftest import disable_checkpointing, enable_checkpointing, make_tiny_llama

from alignlab.adapters import PrefixTuningConfig, PromptTuningConfig, disabled, inject

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 7, [1] * 5 + [0, 0]])
TYPES = torch.tensor([[0] * 4 + [1] * 3, [0] * 3 + [1] * 4])


def _tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def test_prompt_tuning_on_bert_takes_segment_ids_and_sequence_labels():
    model = inject(_tiny_bert(), PromptTuningConfig(num_virtual_tokens=3, seed=1))
    holder = model.get_input_embeddings()
    n = 3
    # the oracle: the prompt concatenated by hand, segment 0 and mask 1 at the virtual tokens
    embeds = torch.cat([holder.prompt_embeddings["default"].detach().expand(2, -1, -1), holder.base_layer(IDS)], dim=1)
    with disabled(model):
        want = model(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, n, dtype=MASK.dtype), MASK], 1),
                     token_type_ids=torch.cat([torch.zeros(2, n, dtype=TYPES.dtype), TYPES], 1)).logits
    labels = torch.tensor([0, 2])
    out = model(input_ids=IDS, attention_mask=MASK, token_type_ids=TYPES, labels=labels)
    torch.testing.assert_close(out.logits, want, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(want, labels))
    out.loss.backward()
    assert holder.prompt_embeddings["default"].grad.abs().sum() > 0


def test_prompt_tuning_on_bert_equals_peft():
    peft = pytest.importorskip("peft")
    base = _tiny_bert()
    ours = inject(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=3, seed=1))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(ours.get_input_embeddings().prompt_embeddings["default"])
    theirs.eval()
    kwargs = dict(input_ids=IDS, attention_mask=MASK, token_type_ids=TYPES)
    torch.testing.assert_close(ours(**kwargs).logits, theirs(**kwargs).logits)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_prefix_tuning_under_gradient_checkpointing_is_refused_clearly(use_reentrant):
    model = inject(make_tiny_llama(), PrefixTuningConfig(num_virtual_tokens=3))
    enable_checkpointing(model, use_reentrant)
    model.enable_input_require_grads()
    model.train()
    # the checkpointed layers would drop the cache holding the prefixes (a shape error in attention before)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids=IDS, attention_mask=MASK, labels=IDS)
    with torch.no_grad(), pytest.raises(ValueError, match="gradient checkpointing"):  # transformers 5.0 drops it too
        model(input_ids=IDS, attention_mask=MASK)
    # in eval mode the checkpointed layers keep the cache, and the prefixes work: the same logits as unchecked
    model.eval()
    with torch.no_grad():
        checkpointed = model(input_ids=IDS, attention_mask=MASK).logits
    disable_checkpointing(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).logits, checkpointed)
    model.train()
    model(input_ids=IDS, attention_mask=MASK, labels=IDS).loss.backward()
