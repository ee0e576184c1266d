"""benchmarks/nf4_sass.py: compiles the GEMV for sm_90 on a machine without a GPU and reports its loop.

Run in a subprocess: the test process has the Triton interpreter on (conftest), under which kernels cannot be
compiled. Only the report's structure is checked here; the counts themselves are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
triton = pytest.importorskip("triton")


def test_offline_sass_report():
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not all((tools / t).exists() for t in ("ptxas", "nvdisasm", "cuobjdump")):
        pytest.skip("this Triton wheel ships no NVIDIA tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nf4_sass.py"), "--shapes", "1024x4096",
                          "--m", "1", "--regs", "0,1"], capture_output=True, text=True, env=env, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("M=")]
    assert len(rows) == 1 and "gemv" in rows[0], out.stdout
    cells = re.findall(r"\[(imm|R)\] ([0-9.]+) instr/B, (\d+) regs, (\d+) B spill \((PRMT:\d+)", rows[0])
    # both codebook variants compiled, each a loop of the lookup's prmt instructions at a plausible count
    assert [c[0] for c in cells] == ["imm", "R"], rows[0]
    assert all(4 < float(c[1]) < 40 and 0 < int(c[2]) <= 255 for c in cells), rows[0]


def test_offline_sass_of_the_epilogue_gemm():
    """``--lora-gemm --configs default``: both kernels at the GPU tiles compile for sm_90 to warpgroup MMAs with no
    spills, the pointer kernel moving its tiles by asynchronous copies in both operand layouts. A first version
    clamped out-of-range columns, which hid their contiguity: backward's tiles (contiguous along the columns) then
    compiled to plain loads into registers, with spills."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not all((tools / t).exists() for t in ("ptxas", "nvdisasm", "cuobjdump")):
        pytest.skip("this Triton wheel ships no NVIDIA tools")
    from alignlab.kernels import lora_gemm

    if lora_gemm.TensorDescriptor is None:
        pytest.skip("this Triton has no host-side tensor descriptors (3.4 on)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nf4_sass.py"), "--lora-gemm", "--configs",
                          "default"], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("(")]
    assert len(rows) == 4, out.stdout  # pointers / descriptors x forward / backward
    for row in rows:
        assert " 0 B spill" in row and "HGMMA:" in row, row
        assert ("UTMALDG:" if "descriptors" in row else "LDGSTS:") in row, row


def test_offline_sass_of_the_rank_update():
    """``--rank-update``: the kernel compiles for sm_90 at its default tiles and every swept one, both layouts of ``d``,
    to tensor-core MMAs with no spills."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not all((tools / t).exists() for t in ("ptxas", "nvdisasm", "cuobjdump")):
        pytest.skip("this Triton wheel ships no NVIDIA tools")
    from alignlab.kernels.lora_gemm import RANK_UPDATE_CONFIG

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nf4_sass.py"), "--rank-update"],
                         capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("(")]
    assert rows[0].startswith(str(RANK_UPDATE_CONFIG)) and len(rows) >= 2, out.stdout
    for row in rows:
        assert " 0 B spill" in row and ("HGMMA:" in row or "HMMA:" in row), row
