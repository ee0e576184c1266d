"""Static look at the decode-sized NF4 kernels: compile them for sm_90 without a GPU, report the SASS of their loop.

The small-M kernels (``alignlab.kernels.nf4_small``) are issue-bound on an H100 / H200 (Nsight Compute: the
M = 1 GEMV issues on ~60% of cycles with ~1.2 eligible warps per scheduler), so the number of instructions
its loop spends per packed weight byte bounds its speed: an H200 issues about 33e12 thread-instructions per
second (132 SMs x 4 schedulers x 32 lanes x ~1.98 GHz) against 4.2e12 bytes per second of copy bandwidth, so
a loop of ``n`` instructions per byte cannot stream the weight faster than about ``8 / n`` of a copy.

This script compiles each kernel at the configuration the H200 table (``--table H100``: the H100's) gives it
(``nf4_configs.TABLES``), with
the Triton installed here and its bundled ``ptxas`` / ``nvdisasm``, on a machine without a GPU (Triton's driver
is replaced by a stand-in that names an sm_90 target; nothing is launched), then prints per (shape, M):
registers per thread, spilled bytes, the loop's instructions per packed byte and the most frequent opcodes.
``--regs 0,1`` compiles both variants of the in-register codebook (immediates / register operands, see
``nf4_small._decode4_asm``) for an A/B of the instruction count. These are counts, not times: the GPU decides.
``--row-norm`` compiles QDoRA's row-norm kernel (``alignlab.kernels.dora``) instead, at each shape with the per-byte
and the per-block scale lookup (``dora.NORM_BLOCK_SCALES``), split off and on, and prints its K loop's length and
loads.

``--lora-gemm`` compiles ``kernels.lora_gemm.adapted_matmul``'s two kernels (pointers, tensor descriptors) at each tile
configuration of ``adapter_epilogue.SWEEP``, forward (``Wᵀ`` read in place) and backward (``W``) operand layouts, and
prints shared memory, registers, spills and the counts of the instructions that tell how tiles move (``LDGSTS``
asynchronous copies or ``UTMALDG`` bulk tensor copies against plain ``LDG``) and multiply (``HGMMA``).

    python benchmarks/nf4_sass.py --shapes 4096x4096,14336x4096 --m 1,8,16,32 --regs 0,1
    python benchmarks/nf4_sass.py --row-norm --shapes 4096x4096
    python benchmarks/nf4_sass.py --lora-gemm [--configs default]
    python benchmarks/nf4_sass.py --rank-update

``--rank-update`` compiles ``kernels.lora_gemm.rank_update_``'s kernel at its default tiles and at each configuration of
``rank_update.SWEEP``, both layouts of ``d``, and prints registers, spills and the MMA / load / store counts.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

SHAPES = "4096x4096,14336x4096,4096x14336,8192x8192,28672x8192,1024x4096"


class _OfflineDriver:
    """Just enough of Triton's active driver for ``JITFunction.run(..., warmup=True)`` to compile for sm_90."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def _offline():
    """Triton's active driver replaced by :class:`_OfflineDriver` for the block (compiles for sm_90 without a GPU)."""
    driver = triton.runtime.driver
    previous = driver._active  # None until first used; reading .active would fail on a machine without a GPU
    driver.set_active(_OfflineDriver())
    try:
        yield
    finally:
        driver._active = previous


def _tools() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_small(N: int, K: int, M: int, regs: str = "auto", dtype=torch.bfloat16, table: str = "H200",
                  kernel: str | None = None, config: tuple | None = None, knobs: dict | None = None):
    """``(kernel name, meta, compiled kernel)`` of the small-M product ``table``'s device picks for ``(N, K, M)``, or of
    ``kernel`` at ``config`` (``(block_n, nb, split, num_warps, num_stages)``) where given; ``knobs``: switches of
    ``nf4_small`` set for the compile (``{"PREFETCH": True}``, the flat kernel's), restored after."""
    import alignlab.kernels.nf4_configs as configs
    import alignlab.kernels.nf4_small as small
    from alignlab.kernels.nf4_dequant import _state_args
    from alignlab.quant.nf4 import nf4_quantize

    key, configs.device_key = configs.device_key, lambda device: table
    old_regs, small.TABLE_REGS = small.TABLE_REGS, regs
    knobs = knobs or {}
    old_knobs = {name: getattr(small, name) for name in knobs}
    for name, value in knobs.items():
        setattr(small, name, value)
    try:
        t = nf4_quantize(torch.randn(N, K), blocksize=64)
        x = torch.randn(M, K, dtype=dtype)
        which, grid, split, scalars, meta = small._plan(M, N, K, dtype, torch.device("cuda", 0), t, False, kernel,
                                                        *(config or (None,) * 5), None)
    finally:
        configs.device_key, small.TABLE_REGS = key, old_regs
        for name, value in old_knobs.items():
            setattr(small, name, value)
    y = torch.empty(M, N, dtype=dtype)
    ws = torch.empty(split, M, N) if split > 1 else y
    cnt = torch.zeros(grid[0], dtype=torch.int32) if split > 1 else y
    args = small._kernel_args(which, x, _state_args(t), y, ws, cnt, None, M, x.stride(0), scalars)
    with _offline():
        kernel = small._KERNELS[which].run(*args, grid=grid, warmup=True, enable_fp_fusion=True, **meta)
    return which, meta, kernel


def compile_row_norm(N: int, K: int, block_scales: bool, split: int, double_quant: bool = True, r: int = 16,
                     dtype=torch.bfloat16):
    """The row-norm kernel with DoRA's factors, as ``dora._row_norm`` launches it on a GPU (``ROW_NORM_CONFIG``,
    blocksize-64 NF4), compiled for sm_90; ``split`` slices of the input dimension."""
    from alignlab.kernels import dora
    from alignlab.kernels.nf4_dequant import _state_args
    from alignlab.quant.nf4 import nf4_quantize

    t = nf4_quantize(torch.randn(N, K), blocksize=64, double_quant=double_quant)
    a, b = torch.randn(r, K).to(dtype), torch.randn(N, r).to(dtype)
    out, m, b_master = torch.empty(N), torch.rand(N), torch.randn(N, r)
    tail = (m, b_master, b_master.stride(0), torch.empty(N), torch.empty(N, 1), torch.empty(N, r, dtype=dtype))
    block_n, block_k, warps = dora.ROW_NORM_CONFIG
    ws = torch.empty(split, N) if split > 1 else out
    cnt = torch.zeros(-(-N // block_n), dtype=torch.int32) if split > 1 else out
    k_per = -(-K // block_k // split) * block_k
    args = (t.data, t.data, *_state_args(t)[1:], a, b, out, N, K, r, 0, a.stride(0), b.stride(0), 2.0, *tail, ws,
            cnt, k_per, split)
    meta = dict(QUANT=True, IEEE=False, FACTORS=True, SPLIT=split > 1, BLOCK_SCALES=block_scales, BLOCK_N=block_n,
                BLOCK_K=block_k, BLOCK_R=16, num_warps=warps, BLOCKSIZE=64, NESTED_BS=t.nested_blocksize,
                DOUBLE=t.double_quant, HAS_SHIFT=False)
    with _offline():
        return dora._row_norm_kernel.run(*args, grid=(-(-N // block_n), split), warmup=True, **meta)


def compile_lora_gemm(config, tma: bool, forward: bool, M=8192, K=4096, N=4096, R=16, dtype=torch.bfloat16):
    """``adapted_matmul``'s kernel at ``config`` for bf16 operands laid out as the fused layers pass them (forward:
    ``b = Wᵀ``, a view of ``(N, K)``; backward: ``b = W`` as ``(K, N)``), compiled for sm_90."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from alignlab.kernels import lora_gemm

    bm, bn, bk, group, warps, stages = config
    a, y = torch.empty(M, K, dtype=dtype), torch.empty(M, N, dtype=dtype)
    w = torch.empty(N, K, dtype=dtype) if forward else torch.empty(K, N, dtype=dtype)
    b = w.T if forward else w
    c = torch.empty(M, R, dtype=dtype)
    d = torch.empty(N, R, dtype=dtype).T if forward else torch.empty(R, N, dtype=dtype)
    meta = dict(HAS_SCALE=False, HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=16, GROUP_M=group,
                num_warps=warps, num_stages=stages, enable_fp_fusion=True)
    with _offline():
        if tma:
            descs = (TensorDescriptor.from_tensor(a, [bm, bk]),
                     TensorDescriptor.from_tensor(w, [bn, bk] if forward else [bk, bn]),
                     TensorDescriptor.from_tensor(y, [bm, bn]))
            return lora_gemm._adapted_matmul_tma_kernel.run(*descs, c, d, y, y, M, N, K, R, c.stride(0), d.stride(0),
                                                            d.stride(1), B_KN=not forward, grid=(1,), warmup=True,
                                                            **meta)
        return lora_gemm._adapted_matmul_kernel.run(a, b, c, d, y, y, y, M, N, K, R, a.stride(0), a.stride(1),
                                                    b.stride(0), b.stride(1), c.stride(0), d.stride(0), d.stride(1),
                                                    y.stride(0), IEEE=False, grid=(1,), warmup=True, **meta)


def compile_rank_update(config, forward: bool, M=2048, N=4096, R=16, dtype=torch.bfloat16):
    """``rank_update_``'s kernel at ``(BLOCK_M, BLOCK_N, num_warps)`` for bf16 operands laid out as the fused layers
    pass them (forward: ``d = Bᵀ``, a view of ``(N, R)``; backward: ``d = A`` as ``(R, N)``), compiled for sm_90."""
    from alignlab.kernels import lora_gemm

    bm, bn, warps = config
    y, c = torch.empty(M, N, dtype=dtype), torch.empty(M, R, dtype=dtype)
    d = torch.empty(N, R, dtype=dtype).T if forward else torch.empty(R, N, dtype=dtype)
    with _offline():
        return lora_gemm._rank_update_kernel.run(y, c, d, M, N, R, y.stride(0), c.stride(0), d.stride(0), d.stride(1),
                                                 IEEE=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=16, num_warps=warps,
                                                 grid=(1,), warmup=True, enable_fp_fusion=True)


def _disassemble(kernel) -> tuple[str, str]:
    """``(SASS, resource usage)`` of a compiled kernel, by the ``nvdisasm`` / ``cuobjdump`` bundled with Triton."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([os.path.join(_tools(), "nvdisasm"), "-c", "-g", path],
                              capture_output=True, text=True, check=True).stdout
        res = subprocess.run([os.path.join(_tools(), "cuobjdump"), "-res-usage", path],
                             capture_output=True, text=True, check=True).stdout
    return sass, res


def _loop(sass: str) -> list[str]:
    """The instructions of the longest backward branch's body (the kernel's K loop)."""
    ins, labels = [], {}
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            ins.append(m.group(1).strip())
    best = (0, 0)
    for i, text in enumerate(ins):
        m = re.search(r"BRA\s+(?:`\()?(\.L_x_\d+)", text)
        if m and m.group(1) in labels and labels[m.group(1)] <= i and i + 1 - labels[m.group(1)] > best[1] - best[0]:
            best = (labels[m.group(1)], i + 1)
    return ins[best[0]:best[1]]


def analyse(kernel, meta: dict) -> dict:
    """Registers, spill bytes, loop length, instructions per packed byte and opcode counts of a compiled kernel."""
    sass, res = _disassemble(kernel)
    loop = _loop(sass)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", s).split()[0].split(".")[0] for s in loop)
    per_thread = meta["BLOCK_N"] * meta.get("NB", 1) * meta["BLOCKSIZE"] // 2 / (meta["num_warps"] * 32)
    return {"regs": int(re.search(r"REG:(\d+)", res).group(1)), "spill": int(re.search(r"STACK:(\d+)", res).group(1)),
            "loop": len(loop), "per_byte": len(loop) / per_thread, "ops": ops}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=SHAPES, help="N x K pairs, comma separated")
    ap.add_argument("--m", default="1,2,4,8,16,32", help="rows of x, comma separated")
    ap.add_argument("--regs", default="auto", help="codebook variants to compile: auto, 0, 1 (comma separated)")
    ap.add_argument("--table", default="H200", help="the device table whose choices are compiled (H200, H100)")
    ap.add_argument("--kernel", default=None, help="compile this small-M kernel (e.g. swap_flat) instead of the table's")
    ap.add_argument("--config", default=None,
                    help="with --kernel: block_n,nb,split,num_warps,num_stages (default: the table's / the rules)")
    ap.add_argument("--prefetch", default=None, choices=("0", "1"), help="nf4_small.PREFETCH for the flat kernel")
    ap.add_argument("--interleave", default=None, choices=("0", "1"), help="nf4_small.INTERLEAVE for the flat kernel")
    ap.add_argument("--row-norm", action="store_true", help="QDoRA's row-norm kernel instead (see above)")
    ap.add_argument("--lora-gemm", action="store_true", help="kernels.lora_gemm's two kernels instead (see above)")
    ap.add_argument("--configs", default=None,
                    help="with --lora-gemm: BMxBNxBKxGROUPxWARPSxSTAGES tiles, comma separated, or 'default' "
                         "(lora_gemm.GPU_CONFIG); default: adapter_epilogue.SWEEP")
    ap.add_argument("--rank-update", action="store_true",
                    help="kernels.lora_gemm.rank_update_'s kernel at its default tiles and rank_update.SWEEP's")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling benchmarks' sweeps
    if args.rank_update:
        from rank_update import SWEEP

        from alignlab.kernels.lora_gemm import RANK_UPDATE_CONFIG

        print(f"Triton {triton.__version__}, sm_90, rank_update_, bf16, 2048 x 4096, r = 16")
        for config in [RANK_UPDATE_CONFIG, *(c for c in SWEEP if c != RANK_UPDATE_CONFIG)]:
            for forward in (True, False):
                sass, res = _disassemble(compile_rank_update(config, forward))
                ops = collections.Counter(re.findall(r"\b(HGMMA|HMMA|LDG|STG)\b", sass))
                counts = " ".join(f"{op}:{n}" for op, n in sorted(ops.items()))
                regs, spill = re.search(r"REG:(\d+)", res).group(1), re.search(r"STACK:(\d+)", res).group(1)
                print(f"{config} {'forward ' if forward else 'backward'}: {regs} regs, {spill} B spill, {counts}",
                      flush=True)
        return
    if args.lora_gemm:
        from adapter_epilogue import SWEEP

        from alignlab.kernels.lora_gemm import GPU_CONFIG

        configs = (SWEEP if args.configs is None else [GPU_CONFIG] if args.configs == "default" else
                   [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")])
        print(f"Triton {triton.__version__}, sm_90, adapted_matmul, bf16, 8192 x 4096 x 4096, r = 16")
        for config in configs:
            for tma in (False, True):
                for forward in (True, False):
                    kernel = compile_lora_gemm(config, tma, forward)
                    sass, res = _disassemble(kernel)
                    ops = collections.Counter(re.findall(r"\b(HGMMA|LDGSTS|UTMALDG|LDG|STG|UTMASTG)\b", sass))
                    shared = kernel.metadata.shared  # the dynamic shared memory of the pipeline stages
                    regs = re.search(r"REG:(\d+)", res).group(1)
                    spill = re.search(r"STACK:(\d+)", res).group(1)
                    counts = " ".join(f"{op}:{n}" for op, n in sorted(ops.items()))
                    print(f"{config} {'descriptors' if tma else 'pointers   '} {'forward ' if forward else 'backward'}: "
                          f"shared {shared // 1024} KiB, {regs} regs, {spill} B spill, {counts}", flush=True)
        return
    if args.row_norm:
        print(f"Triton {triton.__version__}, sm_90, row-norm kernel with factors, blocksize 64, r = 16, bf16 factors")
        for shape in args.shapes.split(","):
            N, K = (int(v) for v in shape.lower().split("x"))
            for double in (True, False):
                for split in (1, 3):
                    for block_scales in (False, True):
                        kernel = compile_row_norm(N, K, block_scales, split, double)
                        r = analyse(kernel, {"BLOCK_N": 1, "BLOCKSIZE": 2, "num_warps": 1})
                        loads = sum(n for op, n in r["ops"].items() if op.startswith("LD"))
                        print(f"{N}x{K} double_quant={int(double)} split={split} block_scales={int(block_scales)}: "
                              f"loop {r['loop']} instructions, {loads} loads ({r['ops'].get('LDG', 0)} LDG), "
                              f"{r['regs']} regs, {r['spill']} B spill", flush=True)
        return
    print(f"Triton {triton.__version__}, sm_90, bf16 x, blocksize 64 + double quant, {args.table} table configurations")
    config = tuple(int(v) for v in args.config.split(",")) if args.config else None
    knobs = {name: value == "1" for name, value in (("PREFETCH", args.prefetch), ("INTERLEAVE", args.interleave))
             if value is not None}
    for m in (int(v) for v in args.m.split(",")):
        for shape in args.shapes.split(","):
            N, K = (int(v) for v in shape.lower().split("x"))
            cells = []
            for regs in args.regs.split(","):
                which, meta, kernel = compile_small(N, K, m, regs, table=args.table, kernel=args.kernel,
                                                    config=config, knobs=knobs)
                r = analyse(kernel, meta)
                top = " ".join(f"{op}:{n}" for op, n in r["ops"].most_common(5))
                cells.append(f"regs={regs} [{'R' if meta.get('REGS') else 'imm'}] {r['per_byte']:.2f} instr/B, "
                             f"{r['regs']} regs, {r['spill']} B spill ({top})")
            cfg = tuple(meta[k] for k in ("BLOCK_N", "NB")) + (meta.get("num_warps"), meta.get("num_stages"))
            print(f"M={m:<3d}{N}x{K} {which:5s} {cfg} " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
