"""``memory=`` of ``measure`` / ``compare`` takes a bool (NumPy bools too) or ``"rss"``, nothing else.

``1 == True`` and ``0 == False``, so ``memory not in (True, False, "rss")`` let ints (and ``1.0``) through as flags."""

import numpy as np
import pytest

from alignlab import ArgumentTypeError
from alignlab.bench import compare, measure


@pytest.mark.parametrize("bad", [1, 0, 1.0, np.int64(1), None, [True]])
def test_memory_that_is_not_a_bool_or_a_str_is_a_type_error(bad):
    for call in (lambda: measure(lambda: None, device="cpu", warmup=0, rep=1, memory=bad),
                 lambda: compare({"a": lambda: None}, device="cpu", warmup=0, rep=1, memory=bad)):
        with pytest.raises(TypeError, match=r"memory must be True, False .* or the string 'rss'") as info:
            call()
        assert isinstance(info.value, ArgumentTypeError)  # still caught by `except ValueError`, as before


@pytest.mark.parametrize("bad", ["RSS", "allocator", ""])
def test_another_string_is_a_value_error(bad):
    with pytest.raises(ValueError, match="memory must be True, False") as info:
        measure(lambda: None, device="cpu", warmup=0, rep=1, memory=bad)
    assert not isinstance(info.value, TypeError)


@pytest.mark.parametrize("flag", [np.True_, np.False_, True, False])
def test_bools_numpy_bools_included_are_accepted(flag):
    m = measure(lambda: None, device="cpu", warmup=0, rep=1, memory=flag)
    assert (m.memory_method != "skipped") == bool(flag)
