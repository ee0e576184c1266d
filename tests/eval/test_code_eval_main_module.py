"""`run_tests` runs the candidate as `__main__`: docs/eval.md suggests `unittest.main(exit=False)`, which looked for the
tests in the runner script and ran none (a wrong candidate passed); `doctest.testmod()` the same. A helper's find."""

import pytest

from alignlab.eval import run_tests

UNITTEST_TESTS = (
    "import unittest\n"
    "class TestAdd(unittest.TestCase):\n"
    "    def test_add(self):\n"
    "        self.assertEqual(add(2, 3), 5)\n"
    "result = unittest.main(exit=False)\n"
    "assert result.result.testsRun == 1 and result.result.wasSuccessful()\n"
)


@pytest.mark.parametrize("body, passed", [("a + b", True), ("a - b", False)])
def test_unittest_main_exit_false_runs_the_candidates_tests(body, passed):
    # docs/eval.md recommends unittest.main(exit=False): it must find the TestCase of the tests
    r = run_tests([f"def add(a, b):\n    return {body}\n"], UNITTEST_TESTS, timeout=20)[0]
    assert r.passed is passed, r.stderr


def test_main_block_still_skipped_with_main_alias():
    r = run_tests(["if __name__ == '__main__':\n    raise SystemExit(1)\nX = 1\n"], "assert X == 1", timeout=20)[0]
    assert r.passed, r.stderr


@pytest.mark.parametrize("body, passed", [("a + b", True), ("a - b", False)])
def test_doctest_testmod_runs_the_candidates_doctests(body, passed):
    program = f'def add(a, b):\n    """\n    >>> add(2, 3)\n    5\n    """\n    return {body}\n'
    tests = "import doctest\nr = doctest.testmod()\nassert r.attempted == 1 and r.failed == 0, r\n"
    assert run_tests([program], tests, timeout=20)[0].passed is passed
