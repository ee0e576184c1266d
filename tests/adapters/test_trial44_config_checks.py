"""Config fields that reached the user's loss or the layers unchecked: AdaLoRA's ``orth_reg_weight`` and
``rank_pattern``, the soft prompts' ``seed``, and ``init_token_ids`` given as a tokenizer's tensor."""

import numpy as np
import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters import AdaLoRAConfig, PrefixTuningConfig, PromptTuningConfig, inject


@pytest.mark.parametrize("bad, error", [(float("nan"), ValueError), (float("inf"), ValueError), (-0.5, ValueError),
                                        ("0.5", TypeError), (None, TypeError)])
def test_adalora_orth_reg_weight_must_be_a_finite_non_negative_number(bad, error):
    with pytest.raises(error, match="orth_reg_weight"):
        AdaLoRAConfig(orth_reg_weight=bad)
    assert type(AdaLoRAConfig(orth_reg_weight=np.float32(0.25)).orth_reg_weight) is float


@pytest.mark.parametrize("bad", [{"model.layers.0.self_attn.q_proj.lora_E": "abc"},
                                 {"model.layers.0.self_attn.q_proj.lora_E": [1, 0, 1, 1]}, ["x"]])
def test_adalora_rank_pattern_must_be_lists_of_bools(bad):
    # "abc" counted as 3 kept ranks by truthiness, [1, 0, 1, 1] as 3
    with pytest.raises(ValueError, match="rank_pattern must map"):
        AdaLoRAConfig(init_r=4, target_r=2, rank_pattern=bad)
    good = {"model.layers.0.self_attn.q_proj.lora_E": [True, False, True, True]}
    model = inject(make_tiny_llama(), AdaLoRAConfig(init_r=4, target_r=2, total_step=10, rank_pattern=good))
    assert model.get_submodule("model.layers.0.self_attn.q_proj").lora_A["default"].shape[0] == 3


@pytest.mark.parametrize("cls", [PromptTuningConfig, PrefixTuningConfig])
@pytest.mark.parametrize("bad", [1.5, "1", True])
def test_soft_prompt_seed_must_be_an_int(cls, bad):
    with pytest.raises(TypeError, match="seed"):
        cls(num_virtual_tokens=2, seed=bad)
    assert cls(num_virtual_tokens=2, seed=np.int64(3)).seed == 3


def test_prompt_init_token_ids_from_a_tensor():
    config = PromptTuningConfig(num_virtual_tokens=4, init_token_ids=torch.tensor([3, 9, 11]))
    assert config.init_token_ids == [3, 9, 11]
    model = inject(make_tiny_llama(), config)
    holder = model.get_input_embeddings()
    torch.testing.assert_close(holder.prompt_embeddings["default"], holder.base_layer.weight[[3, 9, 11, 3]])
    with pytest.raises(ValueError, match="init_token_ids"):  # a (1, n) batch from return_tensors="pt"
        PromptTuningConfig(init_token_ids=torch.tensor([[3, 9]]))
