"""Every benchmark script compiles: they run only on a lent GPU, so a syntax error would otherwise first show there,
costing device time (one did: an edit of benchmarks/lora_dy_pass.py left a loop after its function's return)."""

from __future__ import annotations

import py_compile
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


def test_there_are_benchmark_scripts():
    assert len(BENCHMARKS) > 10


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_script_compiles(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "out.pyc"), doraise=True)
