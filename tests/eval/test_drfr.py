import pytest

from alignlab.eval import drfr, parse_yes_no


def test_drfr_pools_requirements_across_instructions():
    judgements = [[True, True, False], ["YES", "no"], [1, 1, 1, 0, 1]]
    # satisfied 2 + 1 + 4 = 7 of 3 + 2 + 5 = 10 requirements
    assert drfr(judgements) == pytest.approx(7 / 10)
    score, per = drfr(judgements, per_instruction=True)
    assert per == pytest.approx([2 / 3, 1 / 2, 4 / 5])
    # pooled ratio differs from the mean of per-instruction ratios
    assert score != pytest.approx(sum(per) / 3)


def test_parse_yes_no():
    assert parse_yes_no("Yes, the response is in French.") is True
    assert parse_yes_no("  NO.") is False
    assert parse_yes_no(0) is False and parse_yes_no(True) is True
    for bad in ["maybe", "", 2, None]:
        with pytest.raises(ValueError, match="answer"):
            parse_yes_no(bad)


def test_drfr_errors():
    with pytest.raises(ValueError, match="judgements"):
        drfr([])
    with pytest.raises(ValueError, match=r"judgements\[1\]"):
        drfr([[True], []])
    with pytest.raises(ValueError, match="answer"):
        drfr([["unsure"]])
    with pytest.raises(TypeError, match=r"judgements\[0\]: expected a non-empty sequence .* got True"):
        drfr([True, False])  # flat: was "object of type 'bool' has no len()"


def test_drfr_error_names_the_offending_judgement():
    with pytest.raises(ValueError, match=r"judgements\[1\]\[2\]: .*'unsure'"):
        drfr([["yes"], ["yes", "no", "unsure"]])
    with pytest.raises(ValueError, match=r"judgements\[0\]\[0\]"):
        drfr([[2]])


def test_parse_yes_no_numpy_integers():
    np = pytest.importorskip("numpy")
    assert parse_yes_no(np.int64(1)) is True and parse_yes_no(np.uint8(0)) is False
    assert drfr([[np.int64(1), np.int64(0)]]) == drfr([[1, 0]]) == 0.5
    with pytest.raises(ValueError, match="answer"):
        parse_yes_no(np.int64(2))


def test_numpy_bool_judgements_count_as_bools():
    """``judge_scores > 0.5`` gives np.bool_ entries; they were refused as unparsable."""
    np = pytest.importorskip("numpy")
    rows = [list(np.array([0.9, 0.2]) > 0.5), list(np.array([0.7, 0.8, 0.1]) > 0.5)]
    assert drfr(rows) == drfr([[True, False], [True, True, False]]) == pytest.approx(3 / 5)
    assert parse_yes_no(np.bool_(False)) is False


@pytest.mark.parametrize("flag", ["no", 0, 1, None])
def test_per_instruction_must_be_a_bool(flag):
    """per_instruction="no" was truthy and returned the tuple."""
    with pytest.raises(TypeError, match="per_instruction must be a bool"):
        drfr([[True, False]], per_instruction=flag)


def test_per_instruction_takes_a_numpy_bool():
    np = pytest.importorskip("numpy")
    assert drfr([[True, False]], per_instruction=np.bool_(True)) == (0.5, [0.5])


def test_a_numpy_judgement_matrix_is_accepted():
    """drfr(np.array(...)) failed on the array's truth value before reading a judgement."""
    np = pytest.importorskip("numpy")
    assert drfr(np.array([[1, 0], [1, 1]])) == pytest.approx(3 / 4)
    assert drfr(np.array([[True, False], [True, True]]), per_instruction=True) == (0.75, [0.5, 1.0])
    with pytest.raises(ValueError, match="judgements: expected a non-empty"):
        drfr(np.zeros((0, 2)))


def test_parse_yes_no_reads_through_markdown_emphasis():
    """LLM judges often bold or code-format the verdict ("**Yes**, the response ..."); that raised ValueError
    for a plain yes. Emphasis marks around the first word are ignored like punctuation; other words still raise."""
    assert parse_yes_no("**Yes**, the response lists three items.") is True
    assert parse_yes_no("__No__") is False
    assert parse_yes_no("`yes`") is True
    assert parse_yes_no("*No.*") is False
    assert drfr([["**Yes**", "**No**"]]) == 0.5
    with pytest.raises(ValueError, match="yes/no"):
        parse_yes_no("**Maybe**")
