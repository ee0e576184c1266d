import math
import os
from fractions import Fraction

import numpy as np
import pytest

from alignlab.eval import pass_at_k, run_tests


def _exact(n, c, k):
    return Fraction(1) - Fraction(math.comb(n - c, k), math.comb(n, k))


@pytest.mark.parametrize(
    "n,c,k",
    [(1, 0, 1), (1, 1, 1), (5, 2, 1), (10, 3, 5), (10, 8, 5), (20, 0, 10), (200, 1, 1), (200, 7, 100),
     (1000, 3, 10), (2000, 1999, 1000), (500, 250, 499)],
)
def test_pass_at_k_matches_exact_combinatorial_formula(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(_exact(n, c, k)), rel=1e-12, abs=1e-15)


def test_pass_at_k_k1_is_fraction_correct_and_vectorised():
    n = np.array([10, 20, 200])
    c = np.array([3, 0, 199])
    np.testing.assert_allclose(pass_at_k(n, c, 1), c / n, rtol=1e-12)
    out = pass_at_k(n, c, 10)
    assert out.shape == (3,)
    np.testing.assert_allclose(out, [float(_exact(int(a), int(b), 10)) for a, b in zip(n, c)], rtol=1e-12)


def test_pass_at_k_large_n_where_binomials_overflow_floats():
    n, c, k = 5000, 2, 2500
    assert math.comb(n, k) > 10**308  # float(comb) would overflow
    assert pass_at_k(n, c, k) == pytest.approx(float(_exact(n, c, k)), rel=1e-12)


def test_pass_at_k_errors():
    with pytest.raises(ValueError, match="k"):
        pass_at_k(5, 1, 0)
    with pytest.raises(ValueError, match="n"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="c"):
        pass_at_k(3, 4, 1)


PROGRAMS = [
    "def add(a, b):\n    return a + b",  # pass
    "def add(a, b):\n    return a - b",  # wrong answer
    "def add(a, b):\n    while True:\n        pass",  # hangs
    "import os\ndef add(a, b):\n    os.abort()",  # crashes the interpreter (SIGABRT)
    "def add(a, b):\n    return a +",  # syntax error
]
TEST = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"


def test_runner_pass_fail_timeout_crash():
    results = run_tests(PROGRAMS, TEST, timeout=3.0, max_workers=len(PROGRAMS))
    assert [r.status for r in results] == ["passed", "failed", "timeout", "failed", "failed"]
    assert [r.passed for r in results] == [True, False, False, False, False]
    assert results[0].returncode == 0
    assert "AssertionError" in results[1].stderr
    assert results[2].returncode is None
    assert results[3].returncode == -6  # killed by SIGABRT, and the caller survived
    assert "SyntaxError" in results[4].stderr


def test_runner_isolates_caller_state_and_cwd():
    marker = "ALIGNLAB_TEST_SECRET"
    os.environ[marker] = "1"
    try:
        src = (
            "import os, sys\n"
            f"assert {marker!r} not in os.environ\n"
            "open('scratch.txt', 'w').write('x')\n"
            "sys.exit(0 if os.path.basename(os.getcwd()).startswith('alignlab_exec_') else 3)"
        )
        (r,) = run_tests([src], "")
    finally:
        del os.environ[marker]
    assert r.passed, r.stderr
    assert not os.path.exists("scratch.txt")


def test_runner_memory_limit_and_per_program_tests():
    hog = "x = bytearray(4 * 1024 ** 3)"
    (r,) = run_tests([hog], "", max_memory_bytes=512 * 1024**2)
    assert r.status == "failed" and "MemoryError" in r.stderr
    out = run_tests(["v = 1", "v = 2"], ["assert v == 1", "assert v == 2"])
    assert all(x.passed for x in out)


def test_runner_errors():
    with pytest.raises(TypeError, match="programs"):
        run_tests("x = 1", "")
    with pytest.raises(ValueError, match="tests"):
        run_tests(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="timeout"):
        run_tests(["a"], "", timeout=0)
    with pytest.raises(ValueError, match="max_workers"):
        run_tests(["a"], "", max_workers=0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line for line in f)  # zombies are dead
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to inspect processes")
def test_timeout_kills_grandchildren(tmp_path):
    pid_file = tmp_path / "pid"
    src = (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "while True:\n    pass"
    )
    (r,) = run_tests([src], "", timeout=3.0)
    assert r.status == "timeout"
    pid = int(pid_file.read_text())
    import time

    for _ in range(50):
        if not _alive(pid):
            break
        time.sleep(0.1)
    assert not _alive(pid)
