"""Functional correctness of generated code: pass@k and a subprocess runner.

pass@k, the unbiased estimator of "Evaluating Large Language Models Trained
on Code" (Chen et al., 2021, arXiv:2107.03374): with ``n`` samples of which
``c`` pass,

.. math::

    \\mathrm{pass@}k = 1 - \\binom{n-c}{k} \\Big/ \\binom{n}{k}
                   = 1 - \\prod_{i=n-c+1}^{n} \\Big(1 - \\frac{k}{i}\\Big)

The product form never builds the huge binomials, so it stays accurate in
float64 for any ``n``.

:func:`run_tests` executes each candidate program followed by its test code
in a fresh Python interpreter (``python -I``: no user site, no ``PYTHON*``
variables) in a temporary working directory, with a wall-clock limit, an
address-space limit and its own process group (killed whole on timeout).
Nothing runs in the caller's process. This is isolation against accidents
(infinite loops, crashes, memory blow-ups, stray files), **not** a security
boundary: the child can still use the network and read the file system. Run
untrusted model output inside a container or VM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

__all__ = ["ExecutionResult", "pass_at_k", "run_tests"]


def pass_at_k(n: int | Sequence[int] | np.ndarray, c: int | Sequence[int] | np.ndarray, k: int) -> float | np.ndarray:
    """Unbiased pass@k for ``n`` samples with ``c`` correct (numerically stable).

    Args:
        n: samples per problem (int or array).
        c: correct samples per problem (int or array broadcastable with ``n``).
        k: budget, ``1 <= k <= min(n)``.

    Returns:
        A float for scalar inputs, else a float64 array of per-problem values
        (take ``.mean()`` for the benchmark number).

    Raises:
        ValueError: ``k < 1``, ``k > n``, ``c < 0`` or ``c > n``.
    """
    scalar = np.ndim(n) == 0 and np.ndim(c) == 0
    n_arr, c_arr = np.broadcast_arrays(np.asarray(n, dtype=np.int64), np.asarray(c, dtype=np.int64))
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
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
        passed: the program and its tests exited with status 0 in time.
        status: ``"passed"``, ``"failed"`` (non-zero exit: assertion, exception,
            crash, signal) or ``"timeout"``.
        returncode: the exit status (negative = killed by that signal), ``None``
            on timeout.
        stderr: the last 2000 characters of the child's standard error.
    """

    passed: bool
    status: str
    returncode: int | None
    stderr: str


# The child applies its own limits, then runs the candidate as __main__; doing
# this in the child (not via preexec_fn) keeps Popen safe to call from threads.
_BOOTSTRAP = """
import resource, runpy, sys
limit = int(sys.argv[2])
if limit > 0:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.argv = sys.argv[1:2]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run_one(source: str, timeout: float, max_memory_bytes: int | None) -> ExecutionResult:
    with tempfile.TemporaryDirectory(prefix="alignlab_exec_") as workdir:
        path = os.path.join(workdir, "candidate.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        env = {"PATH": os.environ.get("PATH", ""), "HOME": workdir, "TMPDIR": workdir, "PYTHONHASHSEED": "0"}
        posix = os.name == "posix"
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _BOOTSTRAP, path, str(max_memory_bytes or 0)]
            if posix
            else [sys.executable, "-I", "-B", path],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=posix,
        )
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            if posix:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it spawned
                except ProcessLookupError:
                    pass
            else:
                proc.kill()
            try:
                _, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a process that left the group still holds the pipe
                proc.kill()
                proc.wait()
                err = b""
            return ExecutionResult(False, "timeout", None, err.decode("utf-8", "replace")[-2000:])
    stderr = err.decode("utf-8", "replace")[-2000:]
    ok = proc.returncode == 0
    return ExecutionResult(ok, "passed" if ok else "failed", proc.returncode, stderr)


def run_tests(
    programs: Sequence[str],
    tests: str | Sequence[str],
    *,
    timeout: float = 10.0,
    max_memory_bytes: int | None = 2 * 1024**3,
    max_workers: int = 1,
) -> list[ExecutionResult]:
    """Execute each ``program + "\\n" + test`` in its own subprocess.

    A candidate passes when the process exits with status 0 before
    ``timeout`` seconds (write tests as ``assert`` statements or anything that
    raises on failure).

    Args:
        programs: candidate sources, e.g. the ``n`` samples of one problem.
        tests: one test source for all programs, or one per program.
        timeout: wall-clock seconds per candidate (> 0).
        max_memory_bytes: address-space limit of the child (POSIX only;
            ``None`` = unlimited).
        max_workers: candidates run concurrently (threads that wait on
            subprocesses).

    Returns:
        One :class:`ExecutionResult` per program, in order.

    Raises:
        ValueError: bad ``timeout`` / ``max_workers`` or mismatched ``tests``.
        TypeError: a program or test is not a string.
    """
    if isinstance(programs, str):
        raise TypeError("programs: expected a sequence of source strings, got a single string")
    programs = list(programs)
    tests = [tests] * len(programs) if isinstance(tests, str) else list(tests)
    if len(tests) != len(programs):
        raise ValueError(f"tests: expected one string or {len(programs)} strings, got {len(tests)}")
    if not all(isinstance(s, str) for s in programs + tests):
        raise TypeError("programs/tests: every entry must be a str")
    if not timeout > 0:
        raise ValueError(f"timeout: expected seconds > 0, got {timeout!r}")
    if not isinstance(max_workers, int) or max_workers < 1:
        raise ValueError(f"max_workers: expected an int >= 1, got {max_workers!r}")
    sources = [p + "\n\n" + t + "\n" for p, t in zip(programs, tests)]
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(lambda s: _run_one(s, timeout, max_memory_bytes), sources))
