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
