"""AI-feedback data loops: Constitutional AI critique → revision, AI-labelled comparisons, online AI feedback.

Every model here is a user-supplied callable, so nothing depends on a model class: a *generator*
``generate(batch_of_message_lists) -> list[str]`` (as in :mod:`alignlab.data.pairs`; :func:`hf_generator`
wraps a ``transformers`` model + tokenizer), an LM *judge* ``judge(prompt) -> reply`` (as in
:mod:`alignlab.eval.judge`), or a pairwise *preference* ``prefer(question, answer_a, answer_b) ->
"a" | "b" | "tie"`` (:func:`lm_preference` builds one from an LM judge with position-swap debiasing; a
rule is a three-line function).

* **Constitutional AI** — "Constitutional AI: Harmlessness from AI Feedback", Bai et al. 2022,
  arXiv 2212.08073. *SL-CAI*: answer, then for ``rounds`` rounds draw a principle, ask the model to
  critique its answer by the principle's critique request and to rewrite it by the revision request
  (:func:`constitutional_revisions`); the final revisions are SFT targets (:func:`revision_sft_examples`)
  and (revised, original) a preference pair (:func:`revision_pairs`). *RL-CAI*: sample two answers and
  let a judge pick by a drawn principle (:func:`constitutional_comparisons`).
* **OAIF** — "Direct Language Model Alignment from Online AI Feedback", Guo et al. 2024,
  arXiv 2402.04792: each step, sample two completions per prompt from the *current* policy, let the
  judge pick, and train a DPO-family loss on the pairs (:func:`oaif_batch` returns them collated as
  :func:`alignlab.data.pairs.collate_preference` does, chosen rows first, ready for
  :func:`alignlab.losses.fused_preference.fused_linear_dpo`).

Randomness (principle draws, sampling) comes from explicit seeds: the same seed gives the same data.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from alignlab._checks import (ArgumentTypeError, as_bool, check_count, check_finite_number, check_positive_int,
                              check_template_fields, check_token_id)
from alignlab.data.packing import collate_padded
from alignlab.data.pairs import Generate, PreferencePair, _as_messages, _batched, _call_generate
from alignlab.data.sft import IGNORE_INDEX, Message
from alignlab.eval.eval_mode import eval_mode
from alignlab.eval.judge import PAIRWISE_TEMPLATE, PairwiseJudgement, judge_pairwise

__all__ = [
    "CONSTITUTION_COMPARISON_TEMPLATE",
    "ConstitutionalRecord",
    "OAIFBatch",
    "Principle",
    "constitutional_comparisons",
    "constitutional_revisions",
    "hf_generator",
    "lm_preference",
    "oaif_batch",
    "revision_pairs",
    "revision_sft_examples",
    "sample_completions",
]

Prefer = Callable[[str, str, str], "str | PairwiseJudgement"]


@dataclass(frozen=True)
class Principle:
    """One constitutional principle: how to ask for a critique and how to ask for a revision
    (the paper's "critique request" / "revision request" pairs)."""

    critique: str
    revision: str

    def __post_init__(self):
        for name in ("critique", "revision"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                kind = ValueError if isinstance(getattr(self, name), str) else ArgumentTypeError
                raise kind(f"Principle.{name}: expected a non-empty string, got {getattr(self, name)!r}")


@dataclass
class ConstitutionalRecord:
    """One prompt's critique → revision trajectory: ``responses[0]`` the initial answer, ``responses[k]``
    the revision of round ``k``; ``critiques[k-1]`` and ``principles[k-1]`` (indices into the
    constitution) produced it."""

    prompt: list[dict[str, Any]]
    responses: list[str] = field(default_factory=list)
    critiques: list[str] = field(default_factory=list)
    principles: list[int] = field(default_factory=list)

    @property
    def initial(self) -> str:
        return self.responses[0]

    @property
    def final(self) -> str:
        return self.responses[-1]


def _check_principles(principles: Sequence[Principle]) -> list[Principle]:
    principles = list(principles)
    if not principles or not all(isinstance(p, Principle) for p in principles):
        raise ValueError("principles: expected a non-empty sequence of Principle")
    return principles


def constitutional_revisions(
    prompts: Iterable[str | Sequence[Message]],
    generate: Generate,
    principles: Sequence[Principle],
    *,
    rounds: int = 1,
    seed: int = 0,
    batch_size: int = 8,
) -> Iterator[ConstitutionalRecord]:
    """SL-CAI critique → revision loop (arXiv 2212.08073 §3.1), one record per prompt, lazily.

    Per prompt: ``r0 = generate(prompt)``; for round ``k = 1..rounds`` draw a principle uniformly
    (``random.Random(seed)``, in prompt order: a prompt's ``rounds`` draws before the next prompt's, so
    ``batch_size`` does not change them), then, continuing the chat,

        critique_k = generate(prompt + [assistant r_{k-1}, user principle.critique])
        r_k        = generate(prompt + [assistant r_{k-1}, user principle.critique,
                                        assistant critique_k, user principle.revision])

    Raises:
        ValueError: empty or non-:class:`Principle` ``principles``; ``rounds < 1``; a bad prompt;
            ``generate`` returning the wrong number of answers.
        TypeError: ``generate`` returning non-strings; ``rounds`` not an int (an
            :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """
    principles = _check_principles(principles)
    check_count(rounds, "rounds")
    rng = random.Random(seed)
    for batch in _batched((_as_messages(p) for p in prompts), batch_size):
        records = [ConstitutionalRecord(prompt=m) for m in batch]
        for rec, answer in zip(records, _call_generate(generate, batch)):
            rec.responses.append(answer)
        # every round's principle of a prompt is drawn before the next prompt's: the draws (and so the data) do
        # not depend on batch_size (drawn round by round across the batch, batch_size=1 and 8 gave other data)
        plan = [[rng.randrange(len(principles)) for _ in range(rounds)] for _ in records]
        for k in range(rounds):
            draws = [p[k] for p in plan]
            asks = [rec.prompt + [{"role": "assistant", "content": rec.final},
                                  {"role": "user", "content": principles[d].critique}]
                    for rec, d in zip(records, draws)]
            critiques = _call_generate(generate, asks)
            asks = [a + [{"role": "assistant", "content": c}, {"role": "user", "content": principles[d].revision}]
                    for a, c, d in zip(asks, critiques, draws)]
            for rec, d, c, r in zip(records, draws, critiques, _call_generate(generate, asks)):
                rec.principles.append(d)
                rec.critiques.append(c)
                rec.responses.append(r)
        yield from records


def revision_sft_examples(records: Iterable[ConstitutionalRecord]) -> Iterator[dict[str, list[dict[str, Any]]]]:
    """SL-CAI SFT data: ``{"messages": prompt + [assistant final revision]}`` per record (the critiques
    are not trained on), ready for :func:`alignlab.data.sft.tokenize_chats` (``tokenize_chat`` takes
    ``record["messages"]``)."""
    for rec in records:
        yield {"messages": rec.prompt + [{"role": "assistant", "content": rec.final}]}


def revision_pairs(records: Iterable[ConstitutionalRecord], skip_identical: bool = True) -> Iterator[PreferencePair]:
    """Preference pairs ``chosen = final revision``, ``rejected = initial answer``; pairs whose two texts
    are equal (after stripping) are dropped when ``skip_identical`` (a bool; ``TypeError`` otherwise)."""
    skip_identical = as_bool(skip_identical, "skip_identical")
    for rec in records:
        if skip_identical and rec.final.strip() == rec.initial.strip():
            continue
        yield {"prompt": rec.prompt, "chosen": rec.final, "rejected": rec.initial}


CONSTITUTION_COMPARISON_TEMPLATE = """Consider the following question to an AI assistant and two possible answers.
{principle}
Explain briefly, then give your choice on the last line in exactly this format: "[[A]]" for answer A, "[[B]]" for answer B, "[[C]]" if they are equally good.

[User question]
{{question}}

[Answer A]
{{answer_a}}
[End of answer A]

[Answer B]
{{answer_b}}
[End of answer B]"""


def _last_user(messages: list[dict[str, Any]]) -> str:
    return next((str(m["content"]) for m in reversed(messages) if m["role"] == "user"), "")


def _literal_braces(text: str) -> str:
    """``text`` with its braces doubled, so that it survives the template's second ``str.format``
    (question and answers) as written instead of being read as placeholders."""
    return text.replace("{", "{{").replace("}", "}}")


def constitutional_comparisons(
    prompts: Iterable[str | Sequence[Message]],
    generate: Generate,
    judge: Callable[[str], str],
    principles: Sequence[str],
    *,
    swap: bool = True,
    seed: int = 0,
    batch_size: int = 8,
    template: str = CONSTITUTION_COMPARISON_TEMPLATE,
) -> Iterator[PreferencePair]:
    """RL-CAI AI-labelled comparisons (arXiv 2212.08073 §4.1), lazily.

    Samples two answers per prompt (``generate`` is called twice per batch; it should sample), draws a
    principle (a question such as "Which answer is less harmful?") per prompt from ``random.Random(seed)``
    and asks ``judge`` which answer is better by it, in both orders when ``swap``
    (:func:`alignlab.eval.judge.judge_pairwise`). Ties, inconsistent verdicts and identical answers
    give no pair. ``template`` has a ``{principle}`` placeholder and doubled braces for the rest.

    Raises:
        ValueError: empty ``principles`` or a principle that is not a non-empty string; a ``template``
            without ``{principle}`` or the doubled ``{{question}}``, ``{{answer_a}}``, ``{{answer_b}}``.
        TypeError: ``judge`` not callable or replying with a non-string; a principle that is not a string
            (an :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """
    principles = list(principles)
    if not principles or not all(isinstance(p, str) and p.strip() for p in principles):
        kind = ValueError if all(isinstance(p, str) for p in principles) else ArgumentTypeError
        raise kind("principles: expected a non-empty sequence of non-empty strings")
    if not callable(judge):
        raise TypeError(f"judge: expected a callable prompt -> reply, got {type(judge).__name__}")
    check_template_fields(template, ("principle",))  # format() would drop the principle silently
    check_template_fields(template.format(principle=""), ("question", "answer_a", "answer_b"))
    rng = random.Random(seed)
    for batch in _batched((_as_messages(p) for p in prompts), batch_size):
        first, second = _call_generate(generate, batch), _call_generate(generate, batch)
        for messages, a, b in zip(batch, first, second):
            principle = principles[rng.randrange(len(principles))]
            if a.strip() == b.strip():
                continue
            verdict = judge_pairwise(judge, _last_user(messages), a, b, swap=swap,
                                     template=template.format(principle=_literal_braces(principle)))
            if verdict.winner == "tie":
                continue
            chosen, rejected = (a, b) if verdict.winner == "a" else (b, a)
            yield {"prompt": messages, "chosen": chosen, "rejected": rejected}


def lm_preference(judge: Callable[[str], str], *, swap: bool = True, template: str = PAIRWISE_TEMPLATE) -> Prefer:
    """A pairwise preference ``prefer(question, a, b) -> PairwiseJudgement`` from an LM judge
    ``prompt -> reply``, position-swap debiased when ``swap`` (:func:`alignlab.eval.judge.judge_pairwise`:
    a side wins only if it wins in both orders). ``TypeError`` if ``judge`` is not callable or ``swap``
    not a bool."""
    if not callable(judge):
        raise TypeError(f"judge: expected a callable prompt -> reply, got {type(judge).__name__}")
    swap = as_bool(swap, "swap")  # now, not at the first comparison

    def prefer(question: str, answer_a: str, answer_b: str) -> PairwiseJudgement:
        return judge_pairwise(judge, question, answer_a, answer_b, swap=swap, template=template)

    return prefer


def hf_generator(model: Any, tokenizer: Any, **generate_kwargs: Any) -> Generate:
    """A :data:`~alignlab.data.pairs.Generate` from a ``transformers`` causal LM and its chat tokenizer:
    chat template with the generation prompt, left padding, ``model.generate(**generate_kwargs)``, the
    new tokens decoded without special tokens. For seeded sampling call ``transformers.set_seed`` first
    (``generate`` draws from the global generator). The model generates in eval mode (no dropout), every
    submodule's own mode put back after, as in :func:`sample_completions` (a generator made mid-training sampled
    with dropout on)."""

    def generate(batch: list[list[dict[str, Any]]]) -> list[str]:
        texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in batch]
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tokenizer.padding_side = side
        enc = {k: v.to(model.device) for k, v in enc.items()}
        with torch.no_grad(), eval_mode(model):
            out = model.generate(**enc, **generate_kwargs)
        return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    return generate


# ---- OAIF: online pairs from the current policy ------------------------------------------------------------

def _check_token_ids(pad_token_id, eos_token_id) -> None:
    # pad None failed inside torch.full; pad 1.5 was read as 1; eos "2" never matched, so no sample ended
    check_token_id(pad_token_id, "pad_token_id")
    check_token_id(eos_token_id, "eos_token_id", allow_none=True)


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    num_samples: int = 2,
    *,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    seed: int = 0,
) -> list[list[list[int]]]:
    """``num_samples`` sampled completions per prompt from a causal LM, seeded: ``out[i][j]`` the token ids
    of sample ``j`` of prompt ``i`` (ending with ``eos_token_id`` when it was drawn).

    A plain reference sampler: left-padded batch, ``model(input_ids, attention_mask, position_ids).logits``
    recomputed over the whole prefix each token (no KV cache; fine for small models and tests -- pass
    :func:`oaif_batch` a ``sample`` callable backed by ``generate`` or vLLM for real runs). Draws come from
    a ``torch.Generator`` seeded with ``seed``, so the same seed gives the same completions: the model
    samples in eval mode (no dropout), every submodule's own mode put back after.
    ``temperature=0`` is greedy.

    Raises:
        ValueError: empty prompts or prompt, ``num_samples < 1``, ``max_new_tokens < 1``, a negative,
            NaN or infinite ``temperature``, ``top_k < 1``, a negative ``pad_token_id`` or ``eos_token_id``.
        TypeError: ``num_samples``, ``max_new_tokens``, ``top_k`` (None allowed) or the token ids (None allowed
            for ``eos_token_id``) not ints (a bool is no count), ``temperature`` not a real number (an
            :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
    """
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):  # len: a (P, L) tensor has no truth value
        raise ValueError("prompts: expected a non-empty list of non-empty token id lists")
    for name, value in (("num_samples", num_samples), ("max_new_tokens", max_new_tokens)):
        check_count(value, name)
    temperature = check_finite_number(temperature, "temperature", minimum=0)
    check_positive_int(top_k, "top_k", allow_none=True)
    _check_token_ids(pad_token_id, eos_token_id)
    with eval_mode(model):  # dropout in train mode would make the same seed draw other tokens
        return _sample(model, prompts, num_samples, max_new_tokens, temperature, top_k, eos_token_id, pad_token_id,
                       seed)


def _sample(model, prompts, num_samples, max_new_tokens, temperature, top_k, eos_token_id, pad_token_id,
            seed) -> list[list[list[int]]]:
    device = next(model.parameters()).device
    rows = [list(map(int, p)) for p in prompts for _ in range(num_samples)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for r, toks in enumerate(rows):
        ids[r, width - len(toks):] = torch.tensor(toks, device=device)
        mask[r, width - len(toks):] = 1
    gen = torch.Generator(device=device).manual_seed(seed)
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in rows]
    for _ in range(max_new_tokens):
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1].float()
        if temperature == 0:
            tok = logits.argmax(-1)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            tok = torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)
        tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
        for r in (~done).nonzero().flatten().tolist():
            out[r].append(int(tok[r]))
        ids = torch.cat([ids, tok[:, None]], dim=1)
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
        if eos_token_id is not None:
            done |= tok == eos_token_id
        if bool(done.all()):
            break
    return [out[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]


@dataclass
class OAIFBatch:
    """What :func:`oaif_batch` returns.

    Attributes:
        batch: ``input_ids``, ``labels`` (``-100`` off the completion and on padding),
            ``attention_mask``, each ``(2P, seq)``, chosen rows ``[:P]`` then rejected ``[P:]``, right-padded,
            labels *not* shifted; ``None`` when no pair was kept.
        prompt_index: ``(P,)`` which prompt each kept pair came from.
        chosen, rejected: the completion texts of the kept pairs.
        judgements: per prompt, what ``prefer`` returned (``"a"``: the first sample won).
        completions: per prompt, the two sampled completions as token ids.
    """

    batch: dict[str, torch.Tensor] | None
    prompt_index: list[int]
    chosen: list[str]
    rejected: list[str]
    judgements: list[Any]
    completions: list[list[list[int]]]

    @property
    def num_pairs(self) -> int:
        return len(self.prompt_index)


def _winner(verdict: Any, i: int) -> str:
    winner = verdict.winner if isinstance(verdict, PairwiseJudgement) else verdict
    if winner not in ("a", "b", "tie"):
        raise ValueError(f"prefer: expected 'a', 'b', 'tie' or a PairwiseJudgement for prompt {i}, got {verdict!r}")
    return winner


def oaif_batch(
    policy: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    prefer: Prefer,
    decode: Callable[[list[int]], str],
    *,
    questions: Sequence[str] | None = None,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    seed: int = 0,
    sample: Callable[[Sequence[Sequence[int]]], list[list[list[int]]]] | None = None,
) -> OAIFBatch:
    """One OAIF step's data (arXiv 2402.04792, Algorithm 1): two completions per prompt from the current
    ``policy``, the judge's choice as chosen, the other as rejected.

    ``prefer(question, text_a, text_b)`` sees ``questions[i]`` (default ``decode(prompts[i])``) and the
    decoded completions, sample 0 as ``a``; it returns ``"a"``, ``"b"``, ``"tie"`` or a
    :class:`~alignlab.eval.judge.PairwiseJudgement` (:func:`lm_preference` for an LM judge with
    position-swap debiasing). Ties and identical completions give no pair. The batch feeds the
    DPO-family losses as in ``examples/oaif.py``::

        hidden = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        loss, _ = fused_linear_dpo(hidden[:, :-1], model.lm_head.weight, b["labels"][:, 1:], ref_hidden=...)

    Args:
        policy: the causal LM being trained (sampled under ``no_grad`` in eval mode, also by a ``sample``
            callable; each submodule's own mode is put back after).
        prompts: ``P`` prompts as token id lists.
        sample: ``sample(prompts) -> out[i][j]`` token ids, replacing :func:`sample_completions` (which
            is called with ``max_new_tokens``, ``temperature``, ``top_k``, ``eos_token_id``,
            ``pad_token_id`` and ``seed`` otherwise); must return two completions per prompt.

    Raises:
        ValueError: ``questions`` of the wrong length, a sampler not returning two completions per
            prompt, ``prefer`` returning something else than the above, bad ``pad_token_id`` /
            ``eos_token_id`` (as in :func:`sample_completions`; checked before sampling).
        TypeError: ``prefer`` or ``decode`` not callable.
    """
    if not callable(prefer):
        raise TypeError(
            f"prefer: expected a callable (question, a, b) -> 'a' | 'b' | 'tie', got {type(prefer).__name__}")
    if not callable(decode):
        raise TypeError(f"decode: expected a callable token ids -> str, got {type(decode).__name__}")
    if questions is not None and len(questions) != len(prompts):
        raise ValueError(f"questions: expected {len(prompts)} strings (one per prompt), got {len(questions)}")
    _check_token_ids(pad_token_id, eos_token_id)  # the batch is padded only after sampling and judging
    if sample is None:
        completions = sample_completions(policy, prompts, 2, max_new_tokens=max_new_tokens, temperature=temperature,
                                         top_k=top_k, eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed)
    else:
        with eval_mode(policy):
            completions = [[list(map(int, c)) for c in cs] for cs in sample(prompts)]
        if len(completions) != len(prompts) or any(len(c) != 2 for c in completions):
            raise ValueError("sample: expected two completions for every prompt")
    rows_c, rows_r, index, chosen, rejected, judgements = [], [], [], [], [], []
    for i, (prompt, (ca, cb)) in enumerate(zip(prompts, completions)):
        text_a, text_b = decode(ca), decode(cb)
        question = questions[i] if questions is not None else decode(list(prompt))
        verdict = prefer(question, text_a, text_b) if ca != cb else "tie"
        judgements.append(verdict)
        winner = _winner(verdict, i)
        if winner == "tie":
            continue
        first, second = (ca, text_a), (cb, text_b)
        (win, win_text), (lose, lose_text) = (first, second) if winner == "a" else (second, first)
        prompt = list(map(int, prompt))
        rows_c.append({"input_ids": prompt + win, "labels": [IGNORE_INDEX] * len(prompt) + win})
        rows_r.append({"input_ids": prompt + lose, "labels": [IGNORE_INDEX] * len(prompt) + lose})
        index.append(i)
        chosen.append(win_text)
        rejected.append(lose_text)
    batch = collate_padded(rows_c + rows_r, pad_token_id) if index else None
    return OAIFBatch(batch=batch, prompt_index=index, chosen=chosen, rejected=rejected,
                     judgements=judgements, completions=completions)
