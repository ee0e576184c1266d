"""Every ```python block of README.md and docs/*.md runs, so the docs cannot drift from the code.

One test per doc file: its blocks run in order in one namespace, as a reader would type them, on CPU,
offline (``HF_HUB_OFFLINE=1``), in a temporary working directory. A block needs nothing but what an
earlier block of its file defines, plus the file's set-up below (``SETUP``): the things a reader
obviously has at hand (a model, a batch, a tokenizer), made tiny. The set-up is kept in plain sight
here so that a reader of the test sees exactly what each page takes for granted.

A block that cannot run on CI (a GPU, ``torchrun``, a hub download, minutes of training) carries
``<!-- snippet: skip (reason) -->`` on the line right before its fence; each such block is reported
as a skipped test with that reason.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

markdown_it = pytest.importorskip("markdown_it", reason="markdown-it-py is not installed (pip install -e '.[dev]')")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"^\s*<!--\s*snippet:\s*skip\s*\((?P<reason>.+)\)\s*-->\s*$")


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` for each fenced python block of ``path``, in order (1-based lines)."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    blocks = []
    for token in markdown_it.MarkdownIt("commonmark").parse(text):
        if token.type != "fence" or token.info.strip() != "python":
            continue
        start = token.map[0]
        mark = SKIP.match(lines[start - 1]) if start > 0 else None
        blocks.append((start + 1, token.content, mark["reason"] if mark else None))
    return blocks


# --- what each page takes for granted --------------------------------------------------------------


def tiny_llama(seed: int = 0, vocab_size: int = 64) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_lora_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    """A LoRA policy: the pages that take the reference as ``disabled(model)`` need adapters to disable."""
    from alignlab.adapters import LoRAConfig, inject

    return inject(tiny_llama(seed), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))


def batch_ids(batch: int = 2, seq: int = 12, vocab_size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


WORDS = "hello world how are you i am fine what is the capital of france paris two plus equals four".split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} </s>\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer with a chat template, its ids within ``tiny_llama``'s vocabulary."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + ["user", "assistant", "system", ":", "?", "."])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def saved_tiny_llama(tmp_path: Path) -> str:
    """A directory holding a tiny Llama and its tokenizer, standing in for a hub name in ``from_pretrained``."""
    path = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return str(path)


def _readme(tmp_path: Path) -> dict:
    return {"model_name": saved_tiny_llama(tmp_path), "ids": batch_ids()}


def _adapters(tmp_path: Path) -> dict:
    return {"model": tiny_llama(), "fresh_base": tiny_llama(), "ids": batch_ids(),
            "model_name": saved_tiny_llama(tmp_path)}


def _shorter_answer_wins(prompt: str) -> str:
    """An LM judge by rule: the shorter of the two answers in the pairwise template wins."""
    a = re.search(r"\[Answer A\]\n(.*?)\n\[End of answer A\]", prompt, re.S)
    b = re.search(r"\[Answer B\]\n(.*?)\n\[End of answer B\]", prompt, re.S)
    if a is None or b is None or len(a[1]) == len(b[1]):
        return "[[C]]"
    return "[[A]]" if len(a[1]) < len(b[1]) else "[[B]]"


def _canned_generator():
    """A generator ``batch of chats -> replies`` cycling through canned replies of different lengths."""
    replies = ["four", "it is four .", "paris", "the capital of france is paris ."]
    counter = iter(range(10**6))
    return lambda batch: [replies[next(counter) % len(replies)] for _ in batch]


def _ai_feedback(tmp_path: Path) -> dict:
    tokenizer = word_tokenizer()
    prompts = ["what is two plus two ?", "what is the capital of france ?"]
    return {"prompts": prompts, "generate": _canned_generator(), "judge": _shorter_answer_wins,
            "model": tiny_lora_llama(), "tokenizer": tokenizer, "step": 0,
            "prompt_ids": [tokenizer.encode(p) for p in prompts]}


def _chat_data(tmp_path: Path) -> dict:
    tokenizer = word_tokenizer()
    chats = [[{"role": "user", "content": "what is two plus two ?"}, {"role": "assistant", "content": "four"}],
             [{"role": "user", "content": "what is the capital of france ?"}, {"role": "assistant", "content": "paris"}]]
    from alignlab.data import tokenize_chat

    return {"messages": chats[0], "tokenizer": tokenizer, "dataset": chats * 8, "model": tiny_llama(),
            "examples": [tokenize_chat(c, tokenizer) for c in chats],
            "base_model": tiny_llama(seed=1), "reference_model": tiny_llama(seed=2),
            "sample": [{"input_ids": batch_ids(seed=s), "labels": batch_ids(seed=s)} for s in range(2)]}


def tiny_reward_model(seed: int = 3) -> transformers.LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=0,
    )
    return transformers.LlamaForSequenceClassification(config).eval()


def _prompt_batch() -> dict:
    """Two left-padded prompts of a tiny Llama (pad id 0)."""
    ids = batch_ids(seq=6)
    ids[0, :2] = 0
    mask = (torch.arange(6) >= torch.tensor([[2], [0]])).long()
    return {"ids": ids, "mask": mask, "pad": 0}


def _decoding(tmp_path: Path) -> dict:
    return {**_prompt_batch(), "model": tiny_llama(), "processor": transformers.RepetitionPenaltyLogitsProcessor(1.2),
            "policy": tiny_llama(), "rm": tiny_reward_model(), "expert": tiny_llama(seed=1),
            "amateur": tiny_llama(seed=2), "large_base": tiny_llama(seed=3), "small_chat": tiny_llama(seed=4),
            "small_base": tiny_llama(seed=5)}


def _distillation(tmp_path: Path) -> dict:
    student, teacher = tiny_llama(seed=0), tiny_llama(seed=1)
    ids, am = batch_ids(), torch.ones(2, 12, dtype=torch.long)
    with torch.no_grad():
        t_hidden = teacher.model(ids, attention_mask=am).last_hidden_state
    return {"student": student, "teacher": teacher, "input_ids": ids, "am": am, "attention_mask": am,
            "t_hidden": t_hidden, "student_logits": student(ids).logits, "teacher_logits": teacher(ids).logits,
            "prompt_ids": ids[:, :4], "prompt_lengths": torch.tensor([4, 4]), "pad": 0, "eos": 1}


def _eval(tmp_path: Path) -> dict:
    ids = batch_ids()
    programs = ["def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b"]
    return {"model": tiny_llama(), "ids": ids, "mask": torch.ones_like(ids), "labels": ids,
            "loader": [batch_ids(seq=40, seed=1)], "samples": programs * 6,
            "my_judge": _shorter_answer_wins,
            "rows": [("what is two plus two ?", "four", "it is four ."), ("the capital of france ?", "paris .", "paris")]}


def _forgetting(tmp_path: Path) -> dict:
    ids = batch_ids()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    task, general = [{"x": i} for i in range(40)], [{"x": -i} for i in range(40)]
    return {"model": tiny_llama(), "old_task_loader": [batch] * 2, "task_loss": torch.tensor(1.0),
            "task_stream": task, "general_stream": general, "task": task, "general": general,
            "step": lambda batch: None, "collate": lambda examples: examples}


def _long_context(tmp_path: Path) -> dict:
    ids = batch_ids()
    attn = torch.softmax(torch.randn(2, 4, 12, 12), -1)
    return {"model_name": saved_tiny_llama(tmp_path), "input_ids": ids, "labels": ids,
            "attn_probs": attn, "attention_mask": torch.ones_like(ids)}


def _losses(tmp_path: Path) -> dict:
    model = tiny_lora_llama()
    ids = batch_ids(batch=4)
    completion_mask = torch.zeros_like(ids, dtype=torch.bool)
    completion_mask[:, 6:] = True
    return {"model": model, "policy": model, "ids": ids, "input_ids": ids, "labels": ids,
            "logits": model(ids).logits, "policy_logits": model(ids).logits, "completion_mask": completion_mask,
            "micro_batches": [{"input_ids": ids[:2], "labels": ids[:2]}, {"input_ids": ids[2:], "labels": ids[2:]}],
            "optimizer": torch.optim.SGD(model.parameters(), lr=1e-3)}


def write_tiny_checkpoint(path: Path, seed: int) -> None:
    from safetensors.torch import save_file

    path.mkdir()
    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(8, 8, generator=g), "b": torch.randn(8, generator=g)}, str(path / "model.safetensors"))


def _merging(tmp_path: Path) -> dict:
    for seed, name in enumerate(["llama-base", "llama-math", "llama-code"]):
        write_tiny_checkpoint(tmp_path / name, seed)
    return {}


def tiny_mixtral() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )
    return transformers.MixtralForCausalLM(config)


def _rl(tmp_path: Path) -> dict:
    plen, n = 4, 8
    seq = batch_ids(batch=n, seq=plen + 6)
    return {"model": tiny_lora_llama(), "rewards": torch.randn(n), "seq": seq, "attn": torch.ones_like(seq),
            "plen": plen, "completion_ids": seq[:, plen:], "completion_mask": torch.ones(n, 6),
            "vllm_logprobs": -torch.rand(n, 6)}


SETUP = {
    "README.md": _readme,
    "adapters.md": _adapters,
    "ai-feedback.md": _ai_feedback,
    "data.md": _chat_data,
    "decoding.md": _decoding,
    "distillation.md": _distillation,
    "eval.md": _eval,
    "forgetting.md": _forgetting,
    "long-context.md": _long_context,
    "losses-logprobs.md": _losses,
    "losses-preference.md": _losses,
    "merging.md": _merging,
    "moe.md": lambda tmp_path: {"model": tiny_mixtral()},
    "optimizers.md": lambda tmp_path: {"model": tiny_llama()},
    "peft-methods.md": lambda tmp_path: {"model": tiny_llama(), "ids": batch_ids(),
                                         "loader": [{"input_ids": batch_ids(seed=s), "labels": batch_ids(seed=s)}
                                                    for s in range(4)]},
    "quantization.md": lambda tmp_path: {"model": tiny_llama(), "linear": torch.nn.Linear(64, 32), "device": "cpu"},
    "rl.md": _rl,
}


# --- the tests --------------------------------------------------------------------------------------

DOCS = [path for path in PAGES if python_blocks(path)]


def test_every_python_fence_is_collected():
    """The parser finds each ```python fence a line scan sees (none lost to a parsing quirk)."""
    for path in PAGES:
        fences = [i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                  if line.strip() == "```python"]
        assert [line for line, _, _ in python_blocks(path)] == fences, path.name
    assert sum(len(python_blocks(p)) for p in PAGES) >= 40


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_doc_snippets_run(path: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files the snippets write ("out/adapter") land here
    from alignlab.kernels import nf4_configs

    monkeypatch.setattr(nf4_configs, "TABLES", dict(nf4_configs.TABLES))  # a page registers a GPU's launch table
    namespace = {"__name__": f"doc_{path.stem}"}
    setup = SETUP.get(path.name)
    if setup is not None:
        namespace.update(setup(tmp_path))
    torch.manual_seed(0)
    for line, code, skip in python_blocks(path):
        if skip is None:
            exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), namespace)  # noqa: S102 - the docs' own code


SKIPPED = [(path, line, reason) for path in DOCS for line, _, reason in python_blocks(path) if reason]


@pytest.mark.parametrize("path, line, reason", SKIPPED, ids=[f"{p.name}:{line}" for p, line, _ in SKIPPED])
def test_skipped_snippet(path: Path, line: int, reason: str):
    pytest.skip(f"{path.relative_to(ROOT)}:{line}: {reason}")
