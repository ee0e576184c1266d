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


_OVERLAP_SCRIPT = r"""
import sys, torch
sys.path.insert(0, "benchmarks")
import nf4_sass
import alignlab.kernels.nf4_configs as configs
import alignlab.kernels.nf4_small as small
from alignlab.kernels import launch, lora_decode
from alignlab.kernels.nf4_dequant import _state_args
from alignlab.quant.nf4 import nf4_quantize

small.RANK_OVERLAP = True
launch.dependent_launch = small.dependent_launch = lambda index: True
configs.device_key = lambda device: "H100"
N, K, M, R = 1024, 4096, int(sys.argv[1]), 16
t = nf4_quantize(torch.randn(N, K), blocksize=64)
x = torch.randn(M, K, dtype=torch.bfloat16)
which, grid, split, scalars, meta = small._plan(M, N, K, x.dtype, torch.device("cuda", 0), t, False, *(None,) * 7,
                                                rank=R)
assert meta["PDL"] and meta["launch_pdl"], meta
y = torch.empty(M, N, dtype=x.dtype)
ws, cnt = torch.empty(split, M, N), torch.zeros(grid[0], dtype=torch.int32)
args = small._kernel_args(which, x, _state_args(t), y, ws, cnt, None, M, x.stride(0), scalars,
                          (torch.empty(M, R, dtype=x.dtype), torch.empty(N, R)))
with nf4_sass._offline():
    product = small._KERNELS[which].run(*args, grid=grid, warmup=True, enable_fp_fusion=True, **meta)
lora_decode._split_buffers = lambda x, n: (torch.empty(n), torch.zeros(1, dtype=torch.int32), None)
dgrid, dargs, dmeta, _ = lora_decode._split_launch(x, torch.empty(R, K), torch.empty(M, R, dtype=x.dtype), 2.0)
dmeta.update(IEEE=False, PDL=True)  # (the rule asks for a CUDA x)
with nf4_sass._offline():
    down = lora_decode._lora_down_kernel.run(*dargs, grid=dgrid, warmup=True, enable_fp_fusion=True, **dmeta)
print(which, "wait" if "griddepcontrol.wait" in product.asm["ptx"] else "-",
      "launch" if "griddepcontrol.launch_dependents" in down.asm["ptx"] else "-",
      "pdl" if product.metadata.launch_pdl else "-")
"""


@pytest.mark.parametrize("rows", [1, 16])
def test_rank_overlap_kernels_compile_for_sm90(rows):
    """``RANK_OVERLAP``: the small-M NF4 product with a rank term compiles for sm_90 with ``griddepcontrol.wait``
    before its epilogue and as a programmatic-dependent launch, and the decode down kernel with
    ``griddepcontrol.launch_dependents`` (the GEMV at one row, a tensor-core kernel at 16)."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "ptxas").exists():
        pytest.skip("this Triton wheel ships no NVIDIA tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _OVERLAP_SCRIPT, str(rows)], capture_output=True, text=True, env=env,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    kernel, *flags = out.stdout.split()[-4:]
    assert flags == ["wait", "launch", "pdl"] and (kernel == "gemv") == (rows == 1), out.stdout
