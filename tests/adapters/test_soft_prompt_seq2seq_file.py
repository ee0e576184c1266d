"""A PEFT prompt- or prefix-tuning file saved from T5 / BART (``SEQ_2_SEQ_LM``, ``num_transformer_submodules=2``) is
refused at loading with a message naming that layout: it said "only decoder-only models are supported", which read
as if the encoder-only classifiers (BERT) that work were refused too, and did not say what the 2 meant."""

import pytest
import torch

from alignlab.adapters import load_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _t5():
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
                                   decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config).eval()


@pytest.mark.parametrize("make_config", [peft.PromptTuningConfig, peft.PrefixTuningConfig], ids=["prompt", "prefix"])
def test_a_peft_seq2seq_soft_prompt_file_is_refused_naming_the_layout(make_config, tmp_path):
    peft.get_peft_model(_t5(), make_config(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"num_transformer_submodules=2.*encoder-decoder.*SEQ_2_SEQ_LM"):
        load_adapter(_t5(), tmp_path)
