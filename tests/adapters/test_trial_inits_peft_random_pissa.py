"""A ``pissa_niter_K`` file written by PEFT warns on ``load_adapter``.

PEFT's randomized SVD draws at random, ours with a fixed seed, so the residual rebuilt on load is another one than
the adapter was trained on: the loaded model was 0.3 off in the logits of a tiny Qwen2, without a word. Our own
files (no ``peft_version``) rebuild their residual exactly and load without the warning.
"""

import warnings

import pytest
import torch

from alignlab.adapters import LoRAConfig, inject, load_adapter, save_adapter
from conftest import logits_of, make_tiny_llama

transformers = pytest.importorskip("transformers")


def test_peft_pissa_niter_file_warns_that_its_residual_is_not_rebuilt(tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                     init_lora_weights="pissa_niter_2"))
    theirs.save_pretrained(tmp_path)
    with pytest.warns(RuntimeWarning, match=r"init_lora_weights='pissa_niter_2' from PEFT .*path_initial_model_for"):
        load_adapter(make_tiny_llama(), tmp_path)


def test_our_pissa_niter_file_loads_exactly_without_the_warning(tmp_path):
    ids = torch.tensor([[1, 5, 9, 2]])
    model = inject(make_tiny_llama(), LoRAConfig(r=4, alpha=8, target_modules=["q_proj"], init="pissa_niter_2"))
    save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        loaded = load_adapter(make_tiny_llama(), tmp_path)
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(model, ids))
