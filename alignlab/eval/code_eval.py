"""Functional correctness of generated code: pass@k and a subprocess runner.

pass@k, the unbiased estimator of "Evaluating Large Language Models Trained
on Code" (Chen et al., 2021, arXiv:2107.03374): with ``n`` samples of which
``c`` pass,

.. math::

    \\mathrm{pass@}k = 1 - \\binom{n-c}{k} \\Big/ \\binom{n}{k}
                   = 1 - \\prod_{i=n-c+1}^{n} \\Big(1 - \\frac{k}{i}\\Big)

The product form never builds the huge binomials, so it stays accurate in
float64 for any ``n``.

:func:`run_tests` runs each candidate in its own process tree, away from the
caller's process:

- a small *supervisor* (a fresh ``python -I`` in a new session, in a
  temporary working directory) forks the *candidate* process, which applies
  the address-space limit, executes the program as a module named
  ``__candidate__`` (so an ``if __name__ == "__main__":`` block does not run) that also stands as
  ``sys.modules["__main__"]`` (``unittest.main(exit=False)``, ``doctest.testmod()`` find its tests),
  then executes the tests in the same namespace. The candidate passes only
  when both ran to the end: any exception, ``SystemExit`` included (as in
  HumanEval's harness), or an ``os._exit`` before the tests finished is a
  failure, so an early exit can never skip the tests;
- on Linux the supervisor is a child subreaper (``PR_SET_CHILD_SUBREAPER``):
  every process the candidate starts stays its descendant, even one that
  calls ``setsid()`` or double-forks, and all of them are SIGKILLed when the
  candidate process ends or times out (found by walking ``/proc``). Elsewhere
  on POSIX only the candidate's process group is killed.

This is isolation against accidents (infinite loops, crashes, memory
blow-ups, stray files, leftover processes), **not** a security boundary: the
candidate can still use the network, read and write the file system, and
signal other processes of the same user. Run untrusted model output inside a
container or VM (e.g. ``docker run --network none --read-only``, or
``bwrap``/``nsjail``) that runs this function.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from alignlab._checks import check_count, check_number_in_range, check_positive_int

# poll() and the selectors under subprocess take milliseconds as a C int (2**31 ms is about 24.8 days): a longer
# timeout was an OverflowError from inside subprocess
_MAX_TIMEOUT = 1e6

__all__ = ["ExecutionResult", "pass_at_k", "run_tests"]


def _counts(name: str, value) -> np.ndarray:
    """``value`` as an int64 array of whole numbers, or a TypeError/ValueError naming ``name``."""
    arr = np.asarray(value)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{name}: expected integer counts, got {value!r}")
    if np.issubdtype(arr.dtype, np.floating) and not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
        raise ValueError(f"{name}: expected whole numbers, got {value!r}")
    return arr.astype(np.int64)


def pass_at_k(n: int | Sequence[int] | np.ndarray, c: int | Sequence[int] | np.ndarray, k: int) -> float | np.ndarray:
    """Unbiased pass@k for ``n`` samples with ``c`` correct (numerically stable).

    Args:
        n: samples per problem: an int, or one count per problem. A single
            int is used for every problem.
        c: correct samples per problem: an int, or one count per problem
            (same shape as ``n`` when both are arrays; nothing else is
            broadcast).
        k: budget, an int with ``1 <= k <= min(n)``.

    Counts may be integer or whole-valued float arrays (``5.0``); ``5.5``
    and bools are refused.

    Returns:
        A float for scalar inputs, else a float64 array of per-problem values
        (take ``.mean()`` for the benchmark number).

    Raises:
        TypeError: ``n``, ``c`` or ``k`` are not integers (or whole floats for
            ``n``, ``c``).
        ValueError: fractional counts, ``n`` and ``c`` of different shapes,
            ``k < 1``, ``k > n``, ``c < 0`` or ``c > n``.
    """
    check_count(k, "k")
    n_arr, c_arr = _counts("n", n), _counts("c", c)
    scalar = n_arr.ndim == 0 and c_arr.ndim == 0
    if n_arr.ndim and c_arr.ndim and n_arr.shape != c_arr.shape:
        raise ValueError(f"n/c: expected one count per problem in both, got shapes {n_arr.shape} and {c_arr.shape}")
    if c_arr.ndim == 0 and n_arr.ndim:
        raise ValueError(f"c: expected one count per problem (shape {n_arr.shape}), got a single number")
    n_arr, c_arr = np.broadcast_arrays(n_arr, c_arr)  # only a scalar n is spread over the problems
    if np.any(n_arr < k):
        raise ValueError(f"n: every n must be >= k={k}, got min n={int(n_arr.min())}")
    if np.any(c_arr < 0) or np.any(c_arr > n_arr):
        raise ValueError("c: expected 0 <= c <= n for every problem")
    out = np.ones(n_arr.shape, dtype=np.float64)
    for idx in np.ndindex(n_arr.shape):
        ni, ci = int(n_arr[idx]), int(c_arr[idx])
        if ni - ci >= k:  # otherwise every k-subset contains a correct sample
            out[idx] = 1.0 - np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1, dtype=np.float64))
    return float(out) if scalar else out


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one candidate.

    Attributes:
        passed: the program and then its tests ran to the end in the
            candidate process, without an exception (``SystemExit`` counts as
            one), before ``timeout``.
        status: ``"passed"``, ``"failed"`` (exception, ``SystemExit``, an exit
            before the tests finished, a crash, a signal) or ``"timeout"``.
        returncode: the candidate process's exit status (negative = killed by
            that signal), ``None`` on timeout.
        stderr: the last 2000 characters of the candidate's standard error.
        leftover_processes: processes the candidate started that were still
            alive when it ended (or timed out); all were killed. They do not
            change the verdict. Counted on Linux only (0 elsewhere).
    """

    passed: bool
    status: str
    returncode: int | None
    stderr: str
    leftover_processes: int = 0


# Runs in a fresh `python -I` (the supervisor); reads its job as JSON on stdin and answers as
# JSON on stdout. The forked candidate gets /dev/null for stdin/stdout and the stderr file on fd 2,
# so no process of the candidate's tree holds the supervisor's pipes: the verdict never waits for
# a lingering descendant to close them.
_SUPERVISOR = r'''
import ctypes, json, linecache, os, select, signal, sys, time, traceback, types

job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
PR_SET_CHILD_SUBREAPER = 36


def run_candidate(marker_fd, err_fd):
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(err_fd, 2)
    os.close(null)
    os.close(err_fd)
    if job["max_memory_bytes"]:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (job["max_memory_bytes"], job["max_memory_bytes"]))
    module = types.ModuleType("__candidate__")  # importable by name, so fork-started workers can pickle
    sys.modules["__candidate__"] = module
    # unittest.main() and doctest.testmod() look for the tests in __main__: here that was this runner script,
    # so `unittest.main(exit=False)` ran 0 tests and reported success. The candidate's namespace is __main__.
    sys.modules["__main__"] = module
    sys.argv = ["candidate.py"]
    stage = "program"
    try:
        for stage, name in (("program", "<program>"), ("tests", "<tests>")):
            source = job[stage]
            linecache.cache[name] = (len(source), None, source.splitlines(True), name)
            exec(compile(source, name, "exec"), module.__dict__)
    except SystemExit as exit_:
        sys.stderr.write(f"SystemExit({exit_.code!r}) raised while running the {stage}: counted as a failure\n")
        sys.stderr.flush()
        os._exit(1)
    except BaseException as error:
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)  # skip this runner frame
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.write(marker_fd, f"{os.getpid()}\n".encode())
    except OSError:
        sys.stderr.write("[runner] the candidate closed the runner's result pipe: the tests' outcome is unknown\n")
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def wait_for(pid, seconds):
    deadline = time.monotonic() + seconds
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.poll(max(0.0, seconds) * 1000.0)
        os.close(pidfd)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.005)


def descendants(root):
    """Pids below `root` (zombies included) from one pass over /proc."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append((int(name), fields[0] == b"Z"))
    found, stack = [], [root]
    while stack:
        for pid, zombie in children.get(stack.pop(), ()):
            found.append((pid, zombie))
            stack.append(pid)
    return found


def reap():
    while True:
        try:
            done, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not done:
            return


def kill_tree(candidate_pid, deadline):
    """SIGKILL every descendant until none is left; returns the pids killed."""
    killed = set()
    while time.monotonic() < deadline:
        reap()
        found = descendants(os.getpid())
        if not found:
            break
        for pid, zombie in found:
            if not zombie:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
        time.sleep(0.002)
    return killed - {candidate_pid}


subreaper = False
if sys.platform.startswith("linux"):
    try:
        subreaper = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        pass
use_proc = subreaper and os.path.isdir("/proc")
marker_r, marker_w = os.pipe()
err_fd = os.open(job["stderr_path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
pid = os.fork()
if pid == 0:
    try:
        os.close(marker_r)
        if not use_proc:
            os.setpgid(0, 0)
        run_candidate(marker_w, err_fd)
    finally:
        os._exit(1)
os.close(marker_w)
os.close(err_fd)
if not use_proc:
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass  # the child did it first, or already exited
status = wait_for(pid, job["timeout"])
leftover = 0
if use_proc:
    leftover = len(kill_tree(pid, time.monotonic() + 10.0))
else:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
if status is None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass  # kill_tree already killed and reaped it
reap()
os.set_blocking(marker_r, False)
try:
    marker = os.read(marker_r, 4096)
except BlockingIOError:
    marker = b""
sys.stdout.write(json.dumps({
    "timed_out": status is None,
    "returncode": None if status is None else os.waitstatus_to_exitcode(status),
    "tests_finished": str(pid).encode() in marker.split(b"\n"),  # a forked copy may have written too
    "leftover": leftover,
}))
'''

_STDERR_TAIL = 2000


def _run_one(program: str, tests: str, timeout: float, max_memory_bytes: int | None) -> ExecutionResult:
    with tempfile.TemporaryDirectory(prefix="alignlab_run_") as root:
        workdir = tempfile.mkdtemp(prefix="alignlab_exec_", dir=root)
        stderr_path = os.path.join(root, "stderr.txt")
        job = {
            "program": program,
            "tests": tests,
            "timeout": timeout,
            "max_memory_bytes": max_memory_bytes or 0,
            "stderr_path": stderr_path,
        }
        env = {"PATH": os.environ.get("PATH", ""), "HOME": workdir, "TMPDIR": workdir, "PYTHONHASHSEED": "0"}
        supervisor = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _SUPERVISOR],
            cwd=workdir,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            # The supervisor enforces `timeout` itself; this is a backstop should it hang.
            out, supervisor_err = supervisor.communicate(json.dumps(job).encode("utf-8"), timeout=timeout + 60.0)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(supervisor.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, supervisor_err = supervisor.communicate()
        try:
            with open(stderr_path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 4 * _STDERR_TAIL))  # a flood of output stays on disk
                stderr = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            stderr = ""
    try:
        report = json.loads(out)
    except ValueError:
        try:  # what is left of the candidate's tree still holds the supervisor's process group
            os.killpg(supervisor.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        note = supervisor_err.decode("utf-8", "replace") or f"exit status {supervisor.returncode}"
        stderr += "\n[runner] the supervisor died: " + note
        return ExecutionResult(False, "failed", None, stderr[-_STDERR_TAIL:])
    if report["timed_out"]:
        return ExecutionResult(False, "timeout", None, stderr[-_STDERR_TAIL:], report["leftover"])
    passed = bool(report["tests_finished"])
    if not passed and report["returncode"] == 0:
        stderr += "\n[runner] the process exited with status 0 before the tests finished: counted as a failure\n"
    return ExecutionResult(
        passed, "passed" if passed else "failed", report["returncode"], stderr[-_STDERR_TAIL:], report["leftover"]
    )


def run_tests(
    programs: Sequence[str],
    tests: str | Sequence[str],
    *,
    timeout: float = 10.0,
    max_memory_bytes: int | None = 2 * 1024**3,
    max_workers: int = 1,
) -> list[ExecutionResult]:
    """Execute each program, then its tests, in a fresh supervised process tree.

    The program runs as a module named ``__candidate__`` (its
    ``if __name__ == "__main__":`` block does not run), then the tests run in
    the same namespace. A candidate passes when both ran to the end without
    an exception before ``timeout`` seconds: write tests as ``assert``
    statements or anything that raises on failure. ``SystemExit`` from the
    program or the tests (``exit()``, ``sys.exit(0)``, ``unittest.main()``)
    and ``os._exit`` before the tests end are failures. Processes the
    candidate leaves behind are killed when it ends and do not change the
    verdict (see the module docstring for what is and is not isolated).

    Args:
        programs: candidate sources, e.g. the ``n`` samples of one problem.
        tests: one test source for all programs, or one per program.
        timeout: wall-clock seconds per candidate for program + tests, in ``(0, 1e6]`` (about 11.6 days).
        max_memory_bytes: address-space limit of the candidate and its
            children (``None`` = unlimited).
        max_workers: candidates run concurrently (threads that wait on
            subprocesses).

    Returns:
        One :class:`ExecutionResult` per program, in order.

    Raises:
        ValueError: bad ``timeout`` / ``max_memory_bytes`` / ``max_workers``
            or mismatched ``tests``.
        TypeError: a program or test is not a string; ``timeout`` not a real number, ``max_memory_bytes`` /
            ``max_workers`` not ints (an :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
        OSError: not a POSIX system with ``fork`` (Windows).
    """
    if isinstance(programs, str):
        raise TypeError("programs: expected a sequence of source strings, got a single string")
    programs = list(programs)
    tests = [tests] * len(programs) if isinstance(tests, str) else list(tests)
    if len(tests) != len(programs):
        raise ValueError(f"tests: expected one string or {len(programs)} strings, got {len(tests)}")
    if not all(isinstance(s, str) for s in programs + tests):
        raise TypeError("programs/tests: every entry must be a str")
    check_number_in_range(timeout, "timeout", 0, _MAX_TIMEOUT, low_open=True)  # seconds
    # a Python int: it travels to the supervisor as JSON
    max_memory_bytes = check_positive_int(max_memory_bytes, "max_memory_bytes", allow_none=True)
    max_workers = check_count(max_workers, "max_workers")
    if not hasattr(os, "fork"):
        raise OSError("run_tests: needs a POSIX system with fork(); run it under WSL or in a Linux container")
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(lambda pt: _run_one(pt[0], pt[1], float(timeout), max_memory_bytes), zip(programs, tests)))
