"""A local chat tokenizer for data tests (no hub download)."""

import pytest

WORDS = (
    "hello world how are you i am fine thanks what is the capital of france paris two plus equals four "
    "be nice rude answer please a an tell me story once upon time there was cat dog good bad yes no"
).split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_chat_tokenizer(chat_template: str | None = TEMPLATE):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS + ["+", "=", "?", ".", ","])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=SPECIAL[4:],
    )
    fast.chat_template = chat_template
    return fast


@pytest.fixture
def chat_tokenizer():
    return build_chat_tokenizer()


@pytest.fixture
def make_chat_tokenizer():
    """The builder itself, for tests that need a variant template (tests/conftest.py owns the `conftest` name)."""
    return build_chat_tokenizer


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def chatml_tokenizer():
    """A byte-level BPE (GPT-2 / Qwen style) trained locally, with a ChatML template."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    corpus = ["system user assistant", "The capital of France is Paris.", "What is two plus two? Four!",
              "Hello, how are you today? I am fine, thanks."] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>", additional_special_tokens=special[1:])
    fast.chat_template = CHATML
    return fast
