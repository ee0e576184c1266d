"""``PromptTuningConfig.from_text`` against PEFT's ``prompt_tuning_init="TEXT"``: the same initial prompt for the same
text, tokenizer and ``n`` (PEFT keeps the special tokens the tokenizer adds; ours dropped them), and the file says
``TEXT`` with the text and the tokenizer's name, as PEFT's does, where it said ``RANDOM``."""

import json

import pytest
import torch

from conftest import make_tiny_llama

from alignlab.adapters import PromptTuningConfig, adapter_configs, inject, load_adapter, save_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = "classify the sentiment of this review as good or bad".split()
TEXT = "classify the sentiment of this review"  # 6 words: 8 ids with <s> ... </s>
IDS = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))


def _tokenizer_folder(path):
    """A word-level tokenizer that wraps every text in ``<s> … </s>``, saved to ``path`` so that PEFT can load it by
    name (no hub download)."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                         unk_token="<unk>").save_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def _peft_text_prompt(folder, n):
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init="TEXT",
                                     prompt_tuning_init_text=TEXT, tokenizer_name_or_path=str(folder))
    return peft.get_peft_model(make_tiny_llama(), config)


@pytest.mark.parametrize("n", [3, 8, 20], ids=["cut", "exact", "repeated"])
def test_text_init_is_peft_text_init(n, tmp_path):
    tokenizer = _tokenizer_folder(tmp_path / "tok")
    ids = tokenizer(TEXT)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) == 8
    config = PromptTuningConfig.from_text(TEXT, tokenizer, num_virtual_tokens=n)
    assert config.init_token_ids == ids
    ours = inject(make_tiny_llama(), config).get_input_embeddings().prompt_embeddings["default"]
    theirs = _peft_text_prompt(tmp_path / "tok", n).prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_text_init_file_names_the_text_and_tokenizer_and_loads_both_ways(tmp_path):
    tokenizer = _tokenizer_folder(tmp_path / "tok")
    model = inject(make_tiny_llama(), PromptTuningConfig.from_text(TEXT, tokenizer, num_virtual_tokens=4))
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    save_adapter(model, tmp_path / "ours")
    raw = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (raw["prompt_tuning_init"], raw["prompt_tuning_init_text"], raw["tokenizer_name_or_path"]) == \
        ("TEXT", TEXT, str(tmp_path / "tok"))
    # PEFT's config checks refuse TEXT without a tokenizer name; the file itself is read in inference mode
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "ours")).eval()
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "ours")).tokenizer_name_or_path == str(tmp_path / "tok")
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=IDS).logits, want)
    # PEFT's own TEXT file is read back with its init fields, and written again with them
    _peft_text_prompt(tmp_path / "tok", 4).save_pretrained(tmp_path / "theirs")
    loaded = load_adapter(make_tiny_llama(), tmp_path / "theirs")
    assert adapter_configs(loaded)["default"].num_virtual_tokens == 4
    save_adapter(loaded, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert (again["prompt_tuning_init"], again["prompt_tuning_init_text"], again["tokenizer_name_or_path"]) == \
        ("TEXT", TEXT, str(tmp_path / "tok"))


def test_other_inits_name_what_peft_calls_them(tmp_path):
    # random vocabulary rows are PEFT's SAMPLE_VOCAB; ids given directly, or a tokenizer without a name PEFT could
    # load, have no TEXT init in PEFT: RANDOM (the file's weights replace whatever PEFT initialises)
    def unnamed(text):
        return {"input_ids": [5, 6, 7]}

    for name, config in [("sample", PromptTuningConfig(num_virtual_tokens=2)),
                         ("ids", PromptTuningConfig(num_virtual_tokens=2, init_token_ids=[5, 6])),
                         ("unnamed", PromptTuningConfig.from_text("x", unnamed, num_virtual_tokens=2))]:
        save_adapter(inject(make_tiny_llama(), config), tmp_path / name)
        raw = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert (raw["prompt_tuning_init"], raw["prompt_tuning_init_text"], raw["tokenizer_name_or_path"]) == \
            ("SAMPLE_VOCAB" if name == "sample" else "RANDOM", None, None)
        peft.PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / name))
