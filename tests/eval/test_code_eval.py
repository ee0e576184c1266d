import math
import os
import signal
import sys
import time
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


@pytest.mark.parametrize(
    "n,c,k,error,match",
    [
        (5.5, 2, 1, ValueError, "n: expected whole numbers"),
        (5, 2.5, 1, ValueError, "c: expected whole numbers"),
        ([5, 5.5], [1, 1], 1, ValueError, "n: expected whole"),
        (float("nan"), 1, 1, ValueError, "n: expected whole"),
        (True, 1, 1, TypeError, "n: expected integer"),
        ("5", 1, 1, TypeError, "n: expected integer"),
        (5, 1, 1.0, TypeError, "k: expected an int"),
        (5, 1, True, TypeError, "k: expected an int"),
        ([5, 5], [1], 1, ValueError, r"n/c: .*shapes \(2,\) and \(1,\)"),
        ([5, 5, 5], [1, 2], 1, ValueError, "n/c"),
        ([5, 5], 1, 1, ValueError, "c: expected one count per problem"),
    ],
)
def test_pass_at_k_refuses_fractional_counts_and_silent_broadcasting(n, c, k, error, match):
    with pytest.raises(error, match=match):
        pass_at_k(n, c, k)


def test_pass_at_k_whole_floats_and_a_shared_n_are_accepted():
    assert pass_at_k(5.0, np.float64(2.0), 1) == pytest.approx(0.4)
    np.testing.assert_allclose(pass_at_k(10, [3, 0, 10], 2), [float(_exact(10, c, 2)) for c in (3, 0, 10)])


PROGRAMS = [
    "def add(a, b):\n    return a + b",  # pass
    "def add(a, b):\n    return a - b",  # wrong answer
    "def add(a, b):\n    while True:\n        pass",  # hangs
    "import os\ndef add(a, b):\n    os.abort()",  # crashes the interpreter (SIGABRT)
    "def add(a, b):\n    return a +",  # syntax error
]
TEST = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"


def test_runner_pass_fail_timeout_crash():
    results = run_tests(PROGRAMS, TEST, timeout=1.5, max_workers=len(PROGRAMS))
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
            "import os\n"
            f"assert {marker!r} not in os.environ\n"
            "open('scratch.txt', 'w').write('x')\n"
            "assert os.path.basename(os.getcwd()).startswith('alignlab_exec_')"
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
    # a month: poll() inside subprocess raised "OverflowError: timeout is too large", naming nothing
    with pytest.raises(ValueError, match=r"timeout must be a number in \(0, 1e\+06\]"):
        run_tests(["a"], "", timeout=3e6)
    assert run_tests(["a = 1"], "", timeout=1e6)[0].passed
    with pytest.raises(ValueError, match="max_workers"):
        run_tests(["a"], "", max_workers=0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line for line in f)  # zombies are dead
    except FileNotFoundError:
        return False


@pytest.fixture
def pid_dir(tmp_path):
    """Programs write the pids of the processes they start here; any still alive after the test are killed."""
    yield tmp_path
    for f in tmp_path.glob("pid*"):
        for pid in map(int, f.read_text().split()):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _spawner(pid_dir, *, setsid: bool, daemon: bool) -> str:
    """Source that starts a sleeping child (in its own session if ``setsid``) and, if ``daemon``, a
    double-forked grandchild whose parent exits at once; the pids go to ``pid_dir/pids``."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    return (
        "import os, subprocess\n"
        f"child = subprocess.Popen({sleeper!r}, start_new_session={setsid})\n"
        "pids = [child.pid]\n"
        + (
            "r, w = os.pipe()\n"
            "first = os.fork()\n"
            "if first == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        os.write(w, str(os.getpid()).encode())\n"
            "        os.execv(" + repr(sys.executable) + ", " + repr(sleeper) + ")\n"
            "    os._exit(0)\n"
            "os.close(w)\n"
            "pids.append(int(os.read(r, 32)))\n"
            "os.waitpid(first, 0)\n"  # the middle process is gone: only the daemon is left
            if daemon
            else ""
        )
        + f"open({str(pid_dir / 'pids')!r}, 'w').write(' '.join(map(str, pids)))\n"
    )


def _wait_dead(pids, seconds=2.0):
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


ADD_TEST = "assert add(2, 3) == 5"


@pytest.mark.parametrize(
    "program",
    [
        "def add(a, b): return a - b\nexit()",
        "def add(a, b): return a - b\nimport sys\nsys.exit(0)",
        "def add(a, b): return a - b\nimport os\nos._exit(0)",
        "import sys\ndef add(a, b): return a - b\ndef main(): return 0\n"
        "if __name__ == '__main__':\n    sys.exit(main())",
        "def add(a, b):\n    raise SystemExit(0)",  # an exit inside the tested function
        "def add(a, b): return a + b\nexit()",  # right answer, but the program never lets the tests run
    ],
)
def test_an_early_exit_never_passes(program):
    (r,) = run_tests([program], ADD_TEST, timeout=5.0)
    assert r.status == "failed" and not r.passed, r


def test_failure_reports_are_specific():
    closes_pipes = "def add(a, b): return a + b\nimport os\nos.closerange(3, 1024)"
    raises = "def add(a, b): return a + b\nx = 1 / 0"
    exits = "def add(a, b): return a + b\nimport sys\nsys.exit(0)"
    r_pipe, r_raise, r_exit = run_tests([closes_pipes, raises, exits], ADD_TEST, timeout=5.0, max_workers=3)
    assert r_pipe.status == "failed" and "result pipe" in r_pipe.stderr
    assert r_raise.status == "failed" and "x = 1 / 0" in r_raise.stderr and "ZeroDivisionError" in r_raise.stderr
    assert r_exit.status == "failed" and "SystemExit(0) raised while running the program" in r_exit.stderr


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to inspect processes")
def test_a_candidate_that_kills_its_supervisor_fails_and_is_killed(pid_dir):
    program = (
        "import os, signal, time\n"
        f"open({str(pid_dir / 'pid')!r}, 'w').write(str(os.getpid()))\n"
        "os.kill(os.getppid(), signal.SIGKILL)\n"
        "time.sleep(60)"
    )
    (r,) = run_tests([program], "", timeout=5.0)
    assert r.status == "failed" and "supervisor died" in r.stderr
    assert _wait_dead([int((pid_dir / "pid").read_text())]) == []


def test_main_guard_does_not_run_and_the_tests_do():
    program = "import sys\ndef add(a, b): return a + b\nif __name__ == '__main__':\n    sys.exit(1)"
    good, bad = run_tests([program, program], [ADD_TEST, "assert add(2, 3) == 6"], timeout=5.0, max_workers=2)
    assert good.passed and good.status == "passed", good.stderr
    assert bad.status == "failed" and "AssertionError" in bad.stderr


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to inspect processes")
@pytest.mark.parametrize("setsid", [False, True])
def test_exit_with_children_left_sleeping_passes_at_once_and_kills_them(pid_dir, setsid):
    program = _spawner(pid_dir, setsid=setsid, daemon=setsid) + "def add(a, b): return a + b"
    (r,) = run_tests([program], ADD_TEST, timeout=5.0)
    pids = list(map(int, (pid_dir / "pids").read_text().split()))
    assert r.status == "passed" and r.passed, r  # the verdict did not wait for the sleeping children
    assert r.leftover_processes == len(pids)
    assert _wait_dead(pids) == []


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to inspect processes")
@pytest.mark.parametrize("setsid", [False, True])
def test_timeout_kills_every_descendant(pid_dir, setsid):
    program = _spawner(pid_dir, setsid=setsid, daemon=setsid) + "while True:\n    pass"
    start = time.monotonic()
    (r,) = run_tests([program], "", timeout=2.0)
    elapsed = time.monotonic() - start
    pids = list(map(int, (pid_dir / "pids").read_text().split()))
    assert r.status == "timeout" and r.returncode is None
    assert elapsed < 2.0 + 3.0  # nothing kept the runner waiting after the timeout
    assert _wait_dead(pids) == []


def test_pass_at_k_numpy_integer_k_matches_int_and_bool_refused():
    np = pytest.importorskip("numpy")
    assert pass_at_k(10, 3, np.int64(2)) == pass_at_k(10, 3, 2)
    with pytest.raises(TypeError, match="k"):
        pass_at_k(10, 3, True)
