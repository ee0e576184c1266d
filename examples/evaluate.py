"""Evaluate a tiny model before and after a few LoRA steps: perplexity, EM/F1, ROUGE.

Runs on CPU in seconds, with no download: a random-weight Llama and a
word-level tokenizer built from a synthetic reading-comprehension set
("the kite is deep red . question : what colour is the kite ? answer : deep red .").
The model learns with LoRA to answer from the context on training items; the
scores are measured on held-out items (object and colour pairs it never saw
together). We measure

- perplexity of the answer tokens given the question (``alignlab.eval.perplexity``),
- SQuAD exact match and token F1 of greedy answers (``alignlab.eval.squad_scores``),
- ROUGE-1/2/L of the same answers (``alignlab.eval.rouge``, needs ``alignlab[eval]``),

print them as a table and, with ``--plot PATH`` and matplotlib installed
(``alignlab[plot]``), save a bar chart; nothing is written otherwise.

    python examples/evaluate.py --steps 80 --plot evaluate.png
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch

from alignlab.adapters import LoRAConfig, count_parameters, inject
from alignlab.eval import perplexity, rouge, squad_scores

OBJECTS = "kite car door lamp boat cup hat sofa bike shoe vase fence".split()
SHADES = "deep pale dark bright".split()
COLOURS = "red blue green yellow white black".split()


class WordTokenizer:
    """Whitespace tokenizer over a fixed vocabulary (id 0 = padding)."""

    def __init__(self, words: list[str]) -> None:
        self.vocab = ["<pad>"] + sorted(set(words))
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def encode(self, text: str) -> list[int]:
        return [self.ids[w] for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids if i != 0)


def build_data(seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) items: every object with every colour phrase; held-out pairs are never trained on."""
    rng = random.Random(seed)
    items = [(f"the {o} is {s} {c} . question : what colour is the {o} ? answer :", f"{s} {c}")
             for o in OBJECTS for s in SHADES for c in COLOURS]
    rng.shuffle(items)
    return items[:96], items[-32:]


def make_model(vocab_size: int, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=eos_id, bos_token_id=None)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = eos_id
    return model


def answer_batch(tok: WordTokenizer, data: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded question + answer sequences; labels only on the answer (and its full stop)."""
    rows = [(tok.encode(q), tok.encode(a + " .")) for q, a in data]
    width = max(len(q) + len(a) for q, a in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, (q, a) in enumerate(rows):
        ids[i, : len(q) + len(a)] = torch.tensor(q + a)
        labels[i, len(q) : len(q) + len(a)] = torch.tensor(a)
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}


@torch.no_grad()
def greedy_answers(model, tok: WordTokenizer, data: list[tuple[str, str]]) -> list[str]:
    prompts = [tok.encode(q) for q, _ in data]
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)  # left padding for generation
    model.eval()
    out = model.generate(ids, attention_mask=(ids != 0).long(), max_new_tokens=4, do_sample=False)
    answers = []
    for row in out[:, width:].tolist():
        words = tok.decode(row).split()
        answers.append(" ".join(words[: words.index(".")] if "." in words else words))
    return answers


def evaluate(model, tok, data) -> dict[str, float]:
    batch = answer_batch(tok, data)
    preds = greedy_answers(model, tok, data)
    refs = [a for _, a in data]
    scores = {"perplexity": perplexity(model, [batch]), **squad_scores(preds, refs)}
    try:
        scores.update(rouge(preds, refs, use_stemmer=False))
    except ImportError:
        pass  # ROUGE needs the eval extra; the table just has fewer rows
    return scores


def train_lora(model, tok, data, steps: int, lr: float) -> float:
    inject(model, LoRAConfig(r=16, alpha=32.0, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batch = answer_batch(tok, data)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def save_plot(before: dict[str, float], after: dict[str, float], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [k for k in before if k != "perplexity"]
    fig, (ax_ppl, ax_rest) = plt.subplots(1, 2, figsize=(9, 3.5), gridspec_kw={"width_ratios": [1, 3]})
    ax_ppl.bar(["before", "after"], [before["perplexity"], after["perplexity"]], color=["#999999", "#3b75af"])
    ax_ppl.set_title("answer perplexity")
    x = torch.arange(len(names)).numpy()
    ax_rest.bar(x - 0.2, [before[n] for n in names], 0.4, label="before", color="#999999")
    ax_rest.bar(x + 0.2, [after[n] for n in names], 0.4, label="after LoRA", color="#3b75af")
    ax_rest.set_xticks(x, names)
    ax_rest.set_ylim(0, 1.25)
    ax_rest.legend(loc="upper left", ncol=2)
    ax_rest.set_title("answer quality")
    fig.tight_layout()
    path = os.path.expanduser(path)  # "--plot ~/x.png" quoted (or "--plot=~/x.png") reaches us unexpanded
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:  # write then rename: never a partial file; savefig creates it, so it gets the umask's permissions
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80, help="LoRA optimisation steps")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--plot", default="", help="write the chart to this PNG path (default: no file)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train, held_out = build_data(args.seed)
    words = [w for q, a in train + held_out for w in (q + " " + a + " .").split()]
    tok = WordTokenizer(words)
    model = make_model(len(tok.vocab), eos_id=tok.ids["."])

    start = time.perf_counter()
    before = evaluate(model, tok, held_out)
    loss = train_lora(model, tok, train, args.steps, args.lr)
    after = evaluate(model, tok, held_out)
    count = count_parameters(model)

    print(f"LoRA r=16 on all linear layers: {count.trainable} trainable of {count.total} parameters, "
          f"{args.steps} steps on {len(train)} items, final loss {loss:.3f}; scores on {len(held_out)} held-out items")
    print(f"{'metric':<12} {'before':>10} {'after':>10}")
    for name in before:
        print(f"{name:<12} {before[name]:>10.3f} {after[name]:>10.3f}")
    if args.plot:
        if save_plot(before, after, args.plot):
            print(f"plot saved to {os.path.expanduser(args.plot)}")
        else:
            print("matplotlib is not installed (pip install alignlab[plot]); no plot")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
