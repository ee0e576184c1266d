"""AI-feedback loops (alignlab.data.ai_feedback) with deterministic stub generators and judges, and a tiny
random Llama as the OAIF policy (no downloads)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from alignlab.data.ai_feedback import (
    CONSTITUTION_COMPARISON_TEMPLATE,
    ConstitutionalRecord,
    Principle,
    constitutional_comparisons,
    constitutional_revisions,
    lm_preference,
    oaif_batch,
    revision_pairs,
    revision_sft_examples,
    sample_completions,
)
from alignlab.eval.judge import PairwiseJudgement

PRINCIPLES = [Principle(critique=f"Critique by rule {k}.", revision=f"Rewrite by rule {k}.") for k in range(3)]


class StubChat:
    """Answers from the conversation alone: an answer to a prompt, a critique naming the rule, a revision
    wrapping the previous answer. Records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, batch):
        self.calls.append(batch)
        out = []
        for msgs in batch:
            last = msgs[-1]["content"]
            if last.startswith("Critique"):
                out.append(f"critique[{last[-2]}] of {msgs[-2]['content']}")
            elif last.startswith("Rewrite"):
                out.append(f"rev{last[-2]}({msgs[-4]['content']})")
            else:
                out.append(f"answer to {last}")
        return out


def test_revisions_follow_the_critique_revision_chat():
    gen = StubChat()
    recs = list(constitutional_revisions(["q1", "q2", "q3"], gen, PRINCIPLES, rounds=2, seed=0, batch_size=2))
    assert [r.prompt for r in recs] == [[{"role": "user", "content": q}] for q in ("q1", "q2", "q3")]
    for rec in recs:
        q = rec.prompt[0]["content"]
        k1, k2 = rec.principles
        assert rec.initial == f"answer to {q}"
        assert rec.critiques[0] == f"critique[{k1}] of answer to {q}"
        assert rec.responses[1] == f"rev{k1}(answer to {q})"
        assert rec.critiques[1] == f"critique[{k2}] of {rec.responses[1]}"
        assert rec.final == f"rev{k2}(rev{k1}(answer to {q}))"
    # the revision request continues the critique conversation: prompt, answer, critique ask, critique, revision ask
    revision_call = gen.calls[2][0]
    assert [m["role"] for m in revision_call] == ["user", "assistant", "user", "assistant", "user"]
    assert revision_call[-1]["content"].startswith("Rewrite")
    # per batch of 2: one answer call + 2 rounds x (critique, revision); then the last batch
    assert len(gen.calls) == 2 * (1 + 2 * 2)


def test_revisions_are_seeded():
    runs = [[r.principles for r in constitutional_revisions([f"q{i}" for i in range(12)], StubChat(), PRINCIPLES,
                                                             rounds=2, seed=s)] for s in (5, 5, 6)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert {k for ks in runs[0] for k in ks} == {0, 1, 2}


def test_sft_examples_and_revision_pairs():
    recs = list(constitutional_revisions(["q1"], StubChat(), PRINCIPLES))
    (ex,) = revision_sft_examples(recs)
    assert ex["messages"] == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": recs[0].final}]
    (pair,) = revision_pairs(recs)
    assert pair == {"prompt": recs[0].prompt, "chosen": recs[0].final, "rejected": recs[0].initial}
    same = list(constitutional_revisions(["q1"], lambda b: ["same"] * len(b), PRINCIPLES))
    assert list(revision_pairs(same)) == [] and len(list(revision_pairs(same, skip_identical=False))) == 1


def _answers(prompt):
    a = re.search(r"\[Answer A\]\n(.*)\n\[End of answer A\]", prompt, re.S).group(1)
    b = re.search(r"\[Answer B\]\n(.*)\n\[End of answer B\]", prompt, re.S).group(1)
    return a, b


def polite_judge(prompt):
    a, b = _answers(prompt)
    pa, pb = "please" in a, "please" in b
    return "[[A]]" if pa and not pb else "[[B]]" if pb and not pa else "[[C]]"


def test_constitutional_comparisons_pick_by_the_judge_and_debias_position():
    counter = iter(range(10**6))

    def gen(batch):  # alternately polite and rude, so both orders occur
        return [("please " if next(counter) % 3 == 0 else "") + f"reply {len(m)}" for m in batch]

    seen = []

    def judge(prompt):
        seen.append(prompt)
        return polite_judge(prompt)

    pairs = list(constitutional_comparisons([f"q{i}" for i in range(8)], gen, judge, ["Which is politer?"], seed=0))
    assert pairs and all("please" in p["chosen"] and "please" not in p["rejected"] for p in pairs)
    assert all("Which is politer?" in s for s in seen)
    # a judge that always says "A": every verdict flips with the order, so position-swap leaves no pair
    always_a = list(constitutional_comparisons([f"q{i}" for i in range(8)], gen, lambda p: "[[A]]", ["x"]))
    assert always_a == []
    # without the swap the biased judge decides: the first sample always wins
    calls = iter(range(10**6))
    no_swap = list(constitutional_comparisons(["q1", "q2"], lambda b: [f"s{next(calls)}" for _ in b],
                                              lambda p: "[[A]]", ["x"], swap=False))
    assert no_swap == [{"prompt": [{"role": "user", "content": "q1"}], "chosen": "s0", "rejected": "s2"},
                       {"prompt": [{"role": "user", "content": "q2"}], "chosen": "s1", "rejected": "s3"}]
    assert "{principle}" in CONSTITUTION_COMPARISON_TEMPLATE


def test_lm_preference_position_swap():
    prefer = lm_preference(polite_judge)
    v = prefer("q", "no", "please yes")
    assert isinstance(v, PairwiseJudgement) and v.winner == "b" and v.consistent
    biased = lm_preference(lambda p: "[[A]]")
    assert biased("q", "x", "y").winner == "tie"
    assert lm_preference(lambda p: "[[A]]", swap=False)("q", "x", "y").winner == "a"
    with pytest.raises(TypeError, match="judge"):
        lm_preference("not callable")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="principles"):
        next(constitutional_revisions(["q"], StubChat(), []))
    with pytest.raises(ValueError, match="rounds"):
        next(constitutional_revisions(["q"], StubChat(), PRINCIPLES, rounds=0))
    with pytest.raises(ValueError, match="critique"):
        Principle(critique=" ", revision="r")
    with pytest.raises(ValueError, match="principles"):
        next(constitutional_comparisons(["q"], StubChat(), polite_judge, [""]))


# ---- OAIF on a tiny random Llama --------------------------------------------------------------------------

EOS, PAD = 1, 0


def decode(ids):
    return " ".join(f"t{i}" for i in ids)


@pytest.fixture(scope="module")
def policy():
    from conftest import make_tiny_llama

    return make_tiny_llama(seed=0, vocab_size=16, hidden_size=32, num_layers=2)


PROMPTS = [[2, 3, 4], [5, 6], [7, 8, 9, 10], [11], [12, 13]]


def test_sample_completions_shapes_eos_and_seed(policy):
    out = sample_completions(policy, PROMPTS, 3, max_new_tokens=6, eos_token_id=EOS, seed=1)
    assert len(out) == len(PROMPTS) and all(len(o) == 3 for o in out)
    for samples in out:
        for c in samples:
            assert 1 <= len(c) <= 6
            assert EOS not in c[:-1]  # stops at the first eos
    assert out == sample_completions(policy, PROMPTS, 3, max_new_tokens=6, eos_token_id=EOS, seed=1)
    assert out != sample_completions(policy, PROMPTS, 3, max_new_tokens=6, eos_token_id=EOS, seed=2)


def test_sampling_runs_in_eval_mode_and_puts_back_each_submodules_mode():
    # GPT-2 with dropout 0.5 in train mode: dropout while sampling made greedy draws differ per call
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=16, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=1,
                                     eos_token_id=1, resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    model = transformers.GPT2LMHeadModel(config).train()
    model.transformer.h[0].eval()
    modes = {n: m.training for n, m in model.named_modules()}
    kwargs = dict(temperature=0.0, pad_token_id=0, seed=0)
    first = sample_completions(model, [[1, 2, 3], [4, 5]], **kwargs)
    assert first == sample_completions(model, [[1, 2, 3], [4, 5]], **kwargs)
    assert {n: m.training for n, m in model.named_modules()} == modes

    seen = []
    ob = oaif_batch(model, [[2], [3]], shorter, decode,
                    sample=lambda ps: seen.append(model.training) or [[[4, 5], [6]] for _ in ps])
    assert ob.num_pairs == 2 and seen == [False]
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_greedy_sampling_equals_transformers_generate(policy):
    """Left padding and position ids handled as HF does: greedy completions equal ``model.generate``'s."""
    ours = sample_completions(policy, PROMPTS, 1, max_new_tokens=5, temperature=0.0)
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in PROMPTS])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in PROMPTS])[:, None]).long()
    ref = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=PAD,
                          eos_token_id=None)[:, width:]
    assert [o[0] for o in ours] == ref.tolist()


def shorter(question, a, b):
    """Rule judge: fewer tokens wins."""
    na, nb = len(a.split()), len(b.split())
    return "a" if na < nb else "b" if nb < na else "tie"


def test_oaif_batch_shapes_masks_and_judge_decides(policy):
    ob = oaif_batch(policy, PROMPTS, shorter, decode, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, seed=3)
    b, n = ob.batch, ob.num_pairs
    assert n >= 2 and b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    assert b["input_ids"].shape[0] == 2 * n
    for row, (i, side) in enumerate([(i, "c") for i in ob.prompt_index] + [(i, "r") for i in ob.prompt_index]):
        ca, cb = ob.completions[i]
        verdict = shorter("", decode(ca), decode(cb))
        win, lose = (ca, cb) if verdict == "a" else (cb, ca)
        completion = win if side == "c" else lose
        prompt = PROMPTS[i]
        length = len(prompt) + len(completion)
        assert b["input_ids"][row, :length].tolist() == prompt + completion
        assert b["labels"][row, :len(prompt)].eq(-100).all()
        assert b["labels"][row, len(prompt):length].tolist() == completion
        assert b["labels"][row, length:].eq(-100).all() and b["attention_mask"][row].tolist() == [1] * length + [0] * (
            b["input_ids"].shape[1] - length)
        assert b["input_ids"][row, length:].eq(PAD).all()
    assert all(len(c.split()) < len(r.split()) for c, r in zip(ob.chosen, ob.rejected))


def test_oaif_judge_choice_and_ties(policy):
    first = oaif_batch(policy, PROMPTS, lambda q, a, b: "a", decode, max_new_tokens=4, seed=0)
    second = oaif_batch(policy, PROMPTS, lambda q, a, b: "b", decode, max_new_tokens=4, seed=0)
    distinct = [i for i, (a, b) in enumerate(first.completions) if a != b]
    assert first.prompt_index == second.prompt_index == distinct
    assert first.chosen == second.rejected and first.rejected == second.chosen
    assert first.chosen == [decode(first.completions[i][0]) for i in distinct]
    ties = oaif_batch(policy, PROMPTS, lambda q, a, b: "tie", decode, max_new_tokens=4, seed=0)
    assert ties.batch is None and ties.num_pairs == 0 and ties.judgements == ["tie"] * len(PROMPTS)


def test_oaif_with_an_lm_judge_debiased_by_position_swap(policy):
    """An LM judge biased to position A gives no pairs; one that reads the answers decides them."""
    biased = oaif_batch(policy, PROMPTS, lm_preference(lambda p: "[[A]]"), decode, max_new_tokens=4, seed=0)
    assert biased.num_pairs == 0 and all(isinstance(j, PairwiseJudgement) and not j.consistent
                                         for j, (a, b) in zip(biased.judgements, biased.completions) if a != b)

    def fewer_words(prompt):
        a, b = _answers(prompt)
        return "[[A]]" if len(a.split()) < len(b.split()) else "[[B]]" if len(b.split()) < len(a.split()) else "[[C]]"

    lm = oaif_batch(policy, PROMPTS, lm_preference(fewer_words), decode, max_new_tokens=8, eos_token_id=EOS, seed=3,
                    questions=[f"question {i}" for i in range(len(PROMPTS))])
    rule = oaif_batch(policy, PROMPTS, shorter, decode, max_new_tokens=8, eos_token_id=EOS, seed=3)
    assert lm.prompt_index == rule.prompt_index and lm.chosen == rule.chosen


def test_oaif_seeds_give_identical_data(policy):
    kw = dict(max_new_tokens=6, eos_token_id=EOS)
    first = lambda q, a, b: "a"  # noqa: E731
    a = oaif_batch(policy, PROMPTS, first, decode, seed=7, **kw)
    b = oaif_batch(policy, PROMPTS, first, decode, seed=7, **kw)
    c = oaif_batch(policy, PROMPTS, first, decode, seed=8, **kw)
    assert a.num_pairs > 0
    assert a.completions == b.completions and all(torch.equal(a.batch[k], b.batch[k]) for k in a.batch)
    assert a.completions != c.completions


def test_oaif_batch_feeds_fused_linear_dpo(policy):
    """At the reference (policy == reference) sigmoid DPO is log 2 on the batch."""
    from alignlab.losses.fused_preference import fused_linear_dpo

    ob = oaif_batch(policy, PROMPTS, shorter, decode, max_new_tokens=6, eos_token_id=EOS, seed=3)
    b = ob.batch
    with torch.no_grad():
        hidden = policy.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    loss, _ = fused_linear_dpo(hidden[:, :-1], policy.lm_head.weight, b["labels"][:, 1:], ref_hidden=hidden[:, :-1])
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)


def test_oaif_custom_sampler_and_errors(policy):
    ob = oaif_batch(policy, [[2], [3]], shorter, decode, sample=lambda ps: [[[4, 5], [6]] for _ in ps])
    assert ob.chosen == ["t6", "t6"] and ob.batch["input_ids"].shape == (4, 3)
    with pytest.raises(ValueError, match="sample"):
        oaif_batch(policy, [[2]], shorter, decode, sample=lambda ps: [[[4]]])
    with pytest.raises(ValueError, match="questions"):
        oaif_batch(policy, [[2]], shorter, decode, questions=["a", "b"])
    with pytest.raises(TypeError, match="prefer"):
        oaif_batch(policy, [[2]], None, decode)
    with pytest.raises(ValueError, match="prefer"):
        oaif_batch(policy, [[2]], lambda q, a, b: "A", decode, sample=lambda ps: [[[4], [5]]])
    for kwargs, match in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
                          (dict(top_k=0), "top_k"), (dict(num_samples=0), "num_samples")]:
        with pytest.raises(ValueError, match=match):
            sample_completions(policy, [[2]], **kwargs)
    with pytest.raises(ValueError, match="prompts"):
        sample_completions(policy, [[]])


def test_hf_generator_batches_like_single_calls(chat_tokenizer):
    """Left padding inside the batch does not change a greedy answer; the tokenizer's padding side is restored."""
    from conftest import make_tiny_llama

    from alignlab.data.ai_feedback import hf_generator

    model = make_tiny_llama(seed=1, vocab_size=len(chat_tokenizer), hidden_size=32, num_layers=1)
    generate = hf_generator(model, chat_tokenizer, max_new_tokens=4, do_sample=False,
                            pad_token_id=chat_tokenizer.pad_token_id)
    convs = [[{"role": "user", "content": "hello"}],
             [{"role": "system", "content": "be nice"}, {"role": "user", "content": "what is the capital of france"}]]
    side = chat_tokenizer.padding_side
    both = generate(convs)
    assert chat_tokenizer.padding_side == side
    assert len(both) == 2 and all(isinstance(t, str) for t in both)
    assert both == [generate([c])[0] for c in convs]
    recs = list(constitutional_revisions(["hello"], generate, PRINCIPLES))
    assert len(recs[0].responses) == 2


def test_hf_generator_samples_in_eval_mode_and_puts_the_mode_back(chat_tokenizer):
    """A generator made mid-training sampled with dropout on (sample_completions and oaif_batch switch to eval)."""
    from conftest import make_tiny_llama

    from alignlab.data.ai_feedback import hf_generator

    model = make_tiny_llama(seed=1, vocab_size=len(chat_tokenizer), hidden_size=32, num_layers=1)
    model.train()
    model.model.layers[0].mlp.eval()  # a submodule in its own mode
    seen = []
    real = model.generate
    model.generate = lambda *a, **k: seen.append(model.training) or real(*a, **k)
    generate = hf_generator(model, chat_tokenizer, max_new_tokens=2, do_sample=False,
                            pad_token_id=chat_tokenizer.pad_token_id)
    generate([[{"role": "user", "content": "hello"}]])
    assert seen == [False]
    assert model.training and not model.model.layers[0].mlp.training


def test_constitutional_comparisons_principle_with_braces_reaches_the_judge_verbatim():
    # the principle is put into the template before the question and answers are: braces in it
    # (a JSON example, a set) used to be read as placeholders on the second fill (KeyError '"a"')
    principle = 'Which answer returns valid JSON such as {"a": 1} (or the empty object {})?'
    calls = iter(range(10**6))
    seen = []

    def judge(prompt):
        seen.append(prompt)
        return "[[A]]"

    pairs = list(constitutional_comparisons(["q {x}"], lambda b: [f"s{next(calls)}" for _ in b], judge,
                                            [principle], swap=False))
    assert pairs == [{"prompt": [{"role": "user", "content": "q {x}"}], "chosen": "s0", "rejected": "s1"}]
    assert principle in seen[0] and "q {x}" in seen[0]


def test_sample_completions_refuses_nan_temperature_and_bool_counts(policy):
    # temperature=NaN passed the `< 0` check and failed inside torch.multinomial; True counted as 1
    for kwargs, match in [(dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
                          (dict(temperature="1"), "temperature"), (dict(num_samples=True), "num_samples"),
                          (dict(max_new_tokens=True), "max_new_tokens"), (dict(top_k=True), "top_k")]:
        with pytest.raises(ValueError, match=match):
            sample_completions(policy, [[2]], **kwargs)


def test_lm_preference_swap_must_be_a_bool_when_made():
    """swap="no" was truthy and only noticed (never refused) at the first comparison."""
    with pytest.raises(TypeError, match="swap must be a bool"):
        lm_preference(lambda p: "[[A]]", swap="no")
    assert lm_preference(lambda p: "[[A]]", swap=False)("q", "x", "y").winner == "a"


@pytest.mark.parametrize("kwargs", [{"pad_token_id": None}, {"pad_token_id": 1.5}, {"pad_token_id": -1},
                                    {"eos_token_id": "2"}, {"eos_token_id": True}])
def test_bad_token_ids_are_refused_before_sampling(policy, kwargs):
    """pad_token_id=None failed inside torch.full, 1.5 was read as 1, and eos_token_id="2" never matched
    (every sample ran to max_new_tokens); oaif_batch sampled and judged before its padding step noticed."""
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name}: expected"):
        sample_completions(policy, [[3, 4]], 2, max_new_tokens=2, **kwargs)
    calls = []

    def sample(prompts):
        calls.append(prompts)
        return [[[5], [6]] for _ in prompts]

    with pytest.raises(ValueError, match=f"{name}: expected"):
        oaif_batch(policy, [[3, 4]], lambda q, a, b: "a", lambda ids: str(ids), sample=sample, **kwargs)
    assert not calls


def test_revision_pairs_skip_identical_must_be_a_bool():
    """skip_identical="false" was truthy and dropped unrevised records silently."""
    rec = ConstitutionalRecord(prompt=[{"role": "user", "content": "q"}], responses=["same", "same"])
    with pytest.raises(TypeError, match="skip_identical must be a bool"):
        list(revision_pairs([rec], skip_identical="false"))
    assert len(list(revision_pairs([rec], skip_identical=False))) == 1


def test_sample_completions_builds_no_autograd_graph(policy):
    """Sampling runs under no_grad: a graph over every step's full-prefix forward would hold all activations."""
    seen = []
    hook = policy.register_forward_hook(lambda module, args, out: seen.append(out.logits.requires_grad))
    try:
        sample_completions(policy, [[3, 4]], 2, max_new_tokens=2)
    finally:
        hook.remove()
    assert seen and not any(seen)


def test_sample_completions_takes_a_prompt_tensor(policy):
    """A (P, L) tensor of equal-length prompts failed on the tensor's truth value."""
    as_lists = sample_completions(policy, [[3, 4], [5, 6]], 2, max_new_tokens=3, seed=1)
    assert sample_completions(policy, torch.tensor([[3, 4], [5, 6]]), 2, max_new_tokens=3, seed=1) == as_lists


def test_constitutional_comparisons_refuses_a_template_that_would_drop_text():
    """The template is filled twice (principle, then question and answers); one without {principle} judged
    without the principle, silently, and one with single braces around the answers failed only at the first
    comparison, after sampling."""
    from alignlab.data import constitutional_comparisons

    sampled = []

    def generate(batch):
        sampled.append(batch)
        return ["x"] * len(batch)

    for template, missing in (("{{question}} {{answer_a}} {{answer_b}} [[A]]", "principle"),
                              ("{principle} {{question}} {{answer_a}}", "answer_b")):
        with pytest.raises(ValueError, match=r"\{" + missing + r"\}"):
            next(constitutional_comparisons(["q"], generate, lambda p: "[[A]]", ["Which is kinder?"],
                                            template=template))
    assert sampled == []


def test_principle_draws_do_not_depend_on_batch_size():
    """With rounds > 1 the principles were drawn round by round across a batch: batch_size 1, 2 and 8 gave three
    different data sets from one seed. Now each prompt's rounds are drawn before the next prompt's."""
    principles = [Principle(critique=f"critique {i}", revision=f"revise {i}") for i in range(5)]

    def generate(batch):
        return [f"{len(m)}: {m[-1]['content']}" for m in batch]

    prompts = [f"prompt {i}" for i in range(6)]
    runs = [[(r.principles, r.responses) for r in constitutional_revisions(prompts, generate, principles, rounds=3,
                                                                          seed=0, batch_size=bs)]
            for bs in (1, 2, 8)]
    assert runs[0] == runs[1] == runs[2]
