"""Chat-template SFT: completion-only labels, streaming, errors."""

import pytest

from alignlab.data.sft import (IGNORE_INDEX, SequenceTooLongError, render_chat, tokenize_chat, tokenize_chats,
                               tokenize_prompt_completion)

CONV = [
    {"role": "system", "content": "be nice"},
    {"role": "user", "content": "hello how are you ?"},
    {"role": "assistant", "content": "i am fine thanks"},
    {"role": "user", "content": "what is two plus two ?"},
    {"role": "assistant", "content": "four"},
]


def supervised(example):
    return [t for t, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE_INDEX]


def test_labels_are_exactly_assistant_turns(chat_tokenizer):
    tok = chat_tokenizer
    ex = tokenize_chat(CONV, tok)
    # oracle: the whole rendering, tokenised without special tokens
    text = tok.apply_chat_template(CONV, tokenize=False)
    assert ex["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    # supervised tokens = each assistant content followed by the end-of-turn marker
    expected = tok("i am fine thanks <|end|>", add_special_tokens=False)["input_ids"] + tok(
        "four <|end|>", add_special_tokens=False)["input_ids"]
    assert supervised(ex) == expected
    # labels copy input ids where supervised
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ex["input_ids"], ex["labels"]))
    last = tokenize_chat(CONV, tok, train_on="last")
    assert supervised(last) == tok("four <|end|>", add_special_tokens=False)["input_ids"]
    assert last["input_ids"] == ex["input_ids"]


class SlowView:
    """The same tokenizer seen as a slow one (no offsets): exercises the span-by-span path."""

    is_fast = False

    def __init__(self, tok):
        self.tok = tok
        self.chat_template = tok.chat_template

    def apply_chat_template(self, *a, **k):
        return self.tok.apply_chat_template(*a, **k)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.tok(text, add_special_tokens=add_special_tokens)["input_ids"]}


def test_slow_path_agrees_with_offsets_path(chat_tokenizer):
    assert tokenize_chat(CONV, SlowView(chat_tokenizer)) == tokenize_chat(CONV, chat_tokenizer)


def test_streaming_and_overflow(chat_tokenizer):
    convs = ({"messages": CONV[:3]} if i % 2 else CONV for i in range(5))  # a generator
    out = list(tokenize_chats(convs, chat_tokenizer))
    assert len(out) == 5
    n_long = len(out[0]["input_ids"])
    n_short = len(out[1]["input_ids"])
    assert n_short < n_long
    kept = list(tokenize_chats([CONV, CONV[:3]], chat_tokenizer, max_length=n_short, overflow="skip"))
    assert [len(e["input_ids"]) for e in kept] == [n_short]
    with pytest.raises(SequenceTooLongError, match=r"conversation 0: sequence has \d+ tokens, longer than max_length"):
        list(tokenize_chats([CONV], chat_tokenizer, max_length=n_short))
    cut = tokenize_chat(CONV, chat_tokenizer, max_length=n_short + 1, overflow="truncate")
    assert len(cut["input_ids"]) == n_short + 1 and len(cut["labels"]) == n_short + 1


def test_errors(chat_tokenizer, make_chat_tokenizer):
    with pytest.raises(ValueError, match="conversation 1: conversation has no assistant turn"):
        list(tokenize_chats([CONV, CONV[:2]], chat_tokenizer, overflow="skip"))  # skip only skips long ones
    with pytest.raises(ValueError, match="no assistant turn"):
        tokenize_chat(CONV[:2], chat_tokenizer)
    with pytest.raises(ValueError, match="chat_template"):
        tokenize_chat(CONV, make_chat_tokenizer(chat_template=None))
    with pytest.raises(ValueError, match="role"):
        tokenize_chat([{"content": "hi"}], chat_tokenizer)
    with pytest.raises(ValueError, match="non-empty"):
        tokenize_chat([], chat_tokenizer)
    with pytest.raises(ValueError, match="follow"):
        tokenize_chat([{"role": "assistant", "content": "hello"}], chat_tokenizer)
    with pytest.raises(TypeError, match="tokenizer"):
        tokenize_chat(CONV, object())
    # a template that drops history when a generation prompt is added is not prefix-consistent
    bad = make_chat_tokenizer(
        "{% if add_generation_prompt %}<|assistant|> {% else %}{% for m in messages %}{{ m['content'] }} "
        "{% endfor %}{% endif %}")
    with pytest.raises(ValueError, match="prefix-consistent"):
        tokenize_chat(CONV, bad)
    with pytest.raises(ValueError, match="supervised"):
        tokenize_chat(CONV, chat_tokenizer, max_length=3, overflow="truncate")
    assert render_chat(CONV[:2], chat_tokenizer, add_generation_prompt=True).endswith("<|assistant|> ")


def test_chatml_byte_level_bpe(chatml_tokenizer):
    """A Qwen/ChatML-style template over byte-level BPE: answers (with their end-of-turn) are supervised."""
    tok = chatml_tokenizer
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And two plus two?"},
            {"role": "assistant", "content": "Four, thanks!"}]
    ex = tokenize_chat(conv, tok)
    assert ex["input_ids"] == tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
    # decode each supervised run: exactly the answers followed by the template's end of turn
    runs, cur = [], []
    for t, lab in zip(ex["input_ids"], ex["labels"]):
        if lab != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    assert [tok.decode(r) for r in runs] == ["Paris.<|im_end|>\n", "Four, thanks!<|im_end|>\n"]


def test_prompt_completion_rows(chat_tokenizer):
    rows = [{"prompt": "hello how are you ?", "completion": "i am fine"},
            {"prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello"}],
             "completion": "yes"}]
    out = list(tokenize_chats(rows, chat_tokenizer))
    assert supervised(out[0]) == chat_tokenizer("i am fine <|end|>", add_special_tokens=False)["input_ids"]
    assert out[1] == tokenize_chat([{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello"},
                                    {"role": "assistant", "content": "yes"}], chat_tokenizer)
    with pytest.raises(ValueError, match="conversation 0: a row must hold"):
        list(tokenize_chats([{"text": "hello"}], chat_tokenizer))


# --------------------------------------------------------------------------- prompt/completion rows (issue 27)

MULTI_TURN_PROMPT = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello how are you ?"},
                     {"role": "assistant", "content": "i am fine thanks"}, {"role": "user", "content": "two plus two ?"}]


def _trl_completion_only(tok, prompt, completion):
    """TRL's SFT tokenisation of a conversational prompt/completion row with completion_only_loss:
    its own helpers where this TRL has them, else the same steps written out."""
    try:
        from trl.data_utils import _tokenize, common_prefix_length
    except ImportError:
        def _tokenize(t, messages, **kw):
            out = t.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
            return {"input_ids": list(out["input_ids"])}

        def common_prefix_length(a, b):
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            return n
    prompt_ids = _tokenize(tok, prompt, add_generation_prompt=True)["input_ids"]
    ids = list(_tokenize(tok, prompt + completion)["input_ids"])
    n = common_prefix_length(prompt_ids, ids)
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * n + ids[n:]}


@pytest.mark.parametrize("completion_as", ["str", "messages"])
def test_prompt_completion_rows_train_on_the_completion_only_as_trl(chat_tokenizer, chatml_tokenizer, completion_as):
    completion = [{"role": "assistant", "content": "four"}]
    row = {"prompt": MULTI_TURN_PROMPT, "completion": "four" if completion_as == "str" else completion}
    for tok in (chat_tokenizer, chatml_tokenizer):
        (got,) = tokenize_chats([row], tok)
        assert got == _trl_completion_only(tok, MULTI_TURN_PROMPT, completion)
        assert tok.decode(supervised(got)).strip().startswith("four")
        # the old behaviour on request: every assistant turn, the prompt's included
        (both,) = tokenize_chats([row], tok, completion_only_loss=False)
        assert both == tokenize_chat(MULTI_TURN_PROMPT + completion, tok)
        assert len(supervised(both)) > len(supervised(got))
        (last,) = tokenize_chats([row], tok, completion_only_loss=False, train_on="last")
        assert last == got


def test_trl_conversational_completion_with_several_messages(chatml_tokenizer):
    completion = [{"role": "assistant", "content": "Four!"}, {"role": "user", "content": "thanks"},
                  {"role": "assistant", "content": "I am fine."}]
    (got,) = tokenize_chats([{"prompt": MULTI_TURN_PROMPT[:2], "completion": completion}], chatml_tokenizer)
    assert got == _trl_completion_only(chatml_tokenizer, MULTI_TURN_PROMPT[:2], completion)


def test_tokenize_prompt_completion_is_trl_completion_only(chat_tokenizer, chatml_tokenizer):
    """The one prompt + completion path (tokenize_chats' rows, tokenize_preference's answers), alone."""
    completion = [{"role": "assistant", "content": "four"}]
    for tok in (chat_tokenizer, chatml_tokenizer):
        got = tokenize_prompt_completion(MULTI_TURN_PROMPT, "four", tok)
        assert got == _trl_completion_only(tok, MULTI_TURN_PROMPT, completion)
        assert tokenize_prompt_completion(MULTI_TURN_PROMPT, completion, tok) == got
        # a string prompt is one user turn: with one assistant turn, the same labels as tokenize_chat's
        one_turn = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "four"}]
        assert tokenize_prompt_completion("hello", "four", tok) == tokenize_chat(one_turn, tok)
    full = tokenize_prompt_completion(MULTI_TURN_PROMPT, "four", chat_tokenizer)
    n = len(full["input_ids"])
    cut = tokenize_prompt_completion(MULTI_TURN_PROMPT, "four", chat_tokenizer, n - 1, "truncate")
    assert cut == {"input_ids": full["input_ids"][:-1], "labels": full["labels"][:-1]}
    with pytest.raises(SequenceTooLongError):
        tokenize_prompt_completion(MULTI_TURN_PROMPT, "four", chat_tokenizer, n - 1)
    with pytest.raises(TypeError, match=r"chosen\[0\]\['content'\] must be a str"):
        tokenize_prompt_completion("hi", [{"role": "assistant", "content": 3}], chat_tokenizer,
                                   completion_name="chosen")


@pytest.mark.parametrize("content", [3, None, 2.5, {"text": "hi"}])
def test_bad_message_content_is_our_type_error(chat_tokenizer, content):
    conv = [{"role": "user", "content": content}, {"role": "assistant", "content": "four"}]
    with pytest.raises(TypeError, match=r"messages\[0\]\['content'\] must be a str"):
        tokenize_chat(conv, chat_tokenizer)
    with pytest.raises(TypeError, match=r"conversation 1: messages\[0\]\['content'\] must be a str"):
        list(tokenize_chats([CONV, conv], chat_tokenizer))
    with pytest.raises(TypeError, match=r"conversation 0: completion\[0\]\['content'\] must be a str"):
        list(tokenize_chats([{"prompt": "hi", "completion": [{"role": "assistant", "content": content}]}],
                            chat_tokenizer))
    with pytest.raises(ValueError, match="conversation 0: completion must be a non-empty list"):
        list(tokenize_chats([{"prompt": "hi", "completion": 3}], chat_tokenizer))


def test_completion_only_loss_takes_a_numpy_bool_and_refuses_strings(chat_tokenizer):
    """A NumPy bool from a sweep was refused as not a bool; strings stay refused."""
    np = pytest.importorskip("numpy")
    row = {"prompt": MULTI_TURN_PROMPT, "completion": "four"}
    for flag in (True, False):
        assert list(tokenize_chats([row], chat_tokenizer, completion_only_loss=np.bool_(flag))) == list(
            tokenize_chats([row], chat_tokenizer, completion_only_loss=flag))
    with pytest.raises(TypeError, match="completion_only_loss must be a bool"):
        list(tokenize_chats([row], chat_tokenizer, completion_only_loss="no"))
