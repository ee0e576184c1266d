"""Triton kernels: decode-shaped products ``y = x W^T`` with an NF4 weight and few rows of ``x``.

With ``M <= 16`` rows the product is bound by reading the weight (0.5 byte per
weight plus a share of the block scales, against ``2 M`` flop), so both kernels
read each packed byte once, dequantize it in registers and never write the
weight back (QLoRA, Dettmers et al. 2023, arXiv 2305.14314):

    y[m, n] = sum_b s[n, b] * sum_{i in block b} q[c(n, i)] * x[m, i]   (+ tau[n, b] * sum_{i in b} x[m, i])

* :func:`_gemv_kernel` (``M = 1``, CUDA cores).  A step reads a ``(BLOCK_N, NB,
  BLOCKSIZE / 2)`` tile of bytes: NB whole quantization blocks per row, so the
  scale is one value per ``(row, block)`` that broadcasts.  High nibbles meet
  the even elements of ``x``, low nibbles the odd ones (no interleaving), and
  the products add into an accumulator of the tile's shape, reduced once after
  the loop.
* :func:`_dot_kernel` (``2 <= M <= 16``, tensor cores): the same tile, scaled
  and cast to ``x.dtype``, feeds two ``tl.dot`` calls (even and odd halves of
  K), so the work per weight does not grow with ``M``.

* :func:`_late_kernel` (``2 <= M <= 32``, tensor cores, the default on the H200 where its table says so):
  the raw levels in x's dtype go into ``tl.dot`` unscaled, one quantization block at a time, and each
  block's fp32 product is multiplied by its scale column -- the lookup is the only per-weight work.
* :func:`_swap_kernel` (``2 <= M <= 64``, tensor cores): the late kernel's product with the operands
  swapped, ``y^T = W x^T``, so that on Hopper the levels are ``wgmma``'s left operand, read from registers.
* :func:`_flat_kernel` (``kernel="swap_flat"``): the swapped kernel with the levels scaled early and a step's
  quantization blocks as one ``tl.dot`` operand (the H100 table's choice at 64 rows).

All of them split K over a second grid axis (the output rows alone give too few
programs to keep the memory system busy). Each K slice stores its fp32 partial
in a workspace and counts itself in; the last slice of an output tile to
arrive adds the partials in slice order (plus the bias) and writes ``y`` in
the activation dtype. One launch per product, no zero-filled accumulator, no
cast afterwards, and the sum is deterministic (fixed order, unlike atomic
adds); eagerly it also saves two of three launches. The arrival counters stay
allocated (a row per CUDA stream) and each launch leaves them at zero. With
the GEMV's x read as 32-bit pairs and the per-N tiles below, this made the
M = 16 products 1.03-1.16x and M = 1 1.06-1.12x faster on an H100 (CUDA graphs,
the five benchmark shapes) than the atomic-add version.

The levels: on an NVIDIA GPU with 16-bit activations, :func:`nf4_levels` looks
the 16-entry codebook up *in registers* (inline PTX ``prmt`` byte permutes, see
:func:`_decode4_asm`) instead of gathering from memory; measured on an H100 this
made the M = 16 kernel 1.4-1.6x and the GEMV 1.2-1.35x faster.  The table holds
the levels in fp16, within 3e-4 (relative) of the fp32 codebook -- below one
rounding step of bf16 -- as in bitsandbytes' own GEMV.  fp32 activations and the
Triton interpreter gather the exact fp32 levels.

The torch reference is ``x @ nf4_dequantize(W).T``
(:func:`alignlab.quant.nf4.nf4_dequantize`); dispatch lives in
:func:`alignlab.kernels.nf4_matmul.nf4_matmul`, measurements in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import threading

import torch

from alignlab._checks import env_switch, is_int
from alignlab._keep import keep
from alignlab.kernels.dispatch import interpreting
from alignlab.kernels.launch import bind, cdiv, dependent_launch, launch, next_power_of_2, pointers
from alignlab.kernels.nf4_configs import ALTERNATIVES, m_bucket, small_choice, small_config
from alignlab.kernels.nf4_dequant import _state_args, code_planes
from alignlab.quant.nf4 import NF4Tensor

try:
    import triton
    import triton.language as tl

    from alignlab.kernels.nf4_dequant import nf4_block_scale
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None

__all__ = ["small_m_matmul", "small_m_runner", "MAX_M"]


def _decode4_asm(dtype: torch.dtype | None = torch.float16) -> str:
    """PTX for ``tl.inline_asm_elementwise(..., pack=4)`` on packed bytes: 4 bytes -> 4 high and 4 low levels.

    ``$4`` holds four bytes; ``$0, $1`` get the 16-bit levels of their high nibbles (as two pairs, byte
    order kept), ``$2, $3`` those of the low nibbles. The codebook is eight words, two byte planes (low and
    high bytes of the 16-bit levels, :func:`~alignlab.kernels.nf4_dequant.code_planes`); ``prmt`` looks up four
    codes per instruction in an 8-entry half, a third ``prmt`` picks the half by each code's top bit, and a
    last one pairs the two bytes of each level. No memory access.

    With ``dtype`` (fp16 or bf16 levels) the words are immediates written into the string. With
    ``dtype=None`` they are operands, loaded once per program by :func:`nf4_table` and passed four times each
    by the ``pack=4`` call: ``L_i`` is ``$(5 + 4i)``, ``H_i`` is ``$(21 + 4i)``. Why both: with immediates
    ptxas keeps the words in uniform registers and, at most configurations, copies one back into a regular
    register before each lookup (``prmt`` takes one table operand from a register), about two extra
    instructions per packed byte; register operands remove those copies but hold eight more registers,
    which at the largest tiles spills (SASS for sm_90 compiled offline; ``benchmarks/RESULTS.md``).
    """
    if dtype is None:
        L = [f"${5 + 4 * i}" for i in range(4)]
        H = [f"${21 + 4 * i}" for i in range(4)]
        out = ["{", ".reg .b32 s, m, s2, m2, t0, t1, pl0, pl1, ph0, ph1;"]
    else:
        words = code_planes(dtype)  # ValueError for other dtypes
        L, H = [f"L{i}" for i in range(4)], [f"H{i}" for i in range(4)]
        out = ["{", ".reg .b32 s, m, s2, m2, t0, t1, pl0, pl1, ph0, ph1, L0, L1, L2, L3, H0, H1, H2, H3;"]
        out += [f"mov.b32 {name}, {w & 0xFFFFFFFF};" for name, w in zip(L + H, words)]
    out += [
        "and.b32 s, $4, 2004318071;", "and.b32 m, $4, -2004318072;", "shr.u32 m, m, 1;", "or.b32 m, m, 839922192;",
        "shr.u32 s2, s, 16;", "shr.u32 m2, m, 16;",
        f"prmt.b32 t0, {L[0]}, {L[1]}, s; prmt.b32 t1, {L[2]}, {L[3]}, s; prmt.b32 pl0, t0, t1, m;",
        f"prmt.b32 t0, {H[0]}, {H[1]}, s; prmt.b32 t1, {H[2]}, {H[3]}, s; prmt.b32 ph0, t0, t1, m;",
        f"prmt.b32 t0, {L[0]}, {L[1]}, s2; prmt.b32 t1, {L[2]}, {L[3]}, s2; prmt.b32 pl1, t0, t1, m2;",
        f"prmt.b32 t0, {H[0]}, {H[1]}, s2; prmt.b32 t1, {H[2]}, {H[3]}, s2; prmt.b32 ph1, t0, t1, m2;",
        # pl0 / ph0 bytes: codes of (b0 lo, b0 hi, b1 lo, b1 hi); pl1 / ph1 the same for bytes 2, 3
        "prmt.b32 $0, pl0, ph0, 29521;",   # 0x7351: (b0 hi, b1 hi)
        "prmt.b32 $1, pl1, ph1, 29521;",   # (b2 hi, b3 hi)
        "prmt.b32 $2, pl0, ph0, 25152;",   # 0x6240: (b0 lo, b1 lo)
        "prmt.b32 $3, pl1, ph1, 25152;",   # (b2 lo, b3 lo)
        "}",
    ]
    # one line: torch.compile (Inductor) copies the string into generated Python source, where a line break
    # inside the literal is a syntax error
    return " ".join(out)


if triton is not None:
    _ASM_DECODE4 = tl.constexpr(_decode4_asm(torch.float16))
    _ASM_DECODE4_BF16 = tl.constexpr(_decode4_asm(torch.bfloat16))
    _ASM_DECODE4_REGS = tl.constexpr(_decode4_asm(None))
    _ASM_OPERANDS = tl.constexpr("=r,=r,=r,=r,r" + ",r" * 32)  # four outputs; the bytes; 8 table words x 4

    @triton.jit
    def nf4_table(code_ptr, DTYPE: tl.constexpr, REGS: tl.constexpr, ROWS):
        """The eight words of the in-register codebook of ``DTYPE`` levels (fp16 / bf16) for a byte tile whose
        rows are ``ROWS`` (row indices shaped to broadcast against the tile), for ``_decode4_asm(None)``; zeros
        (unused) without ``REGS``. Called once per program, before the loop.

        The words come from the kernel code table (:func:`~alignlab.kernels.nf4_dequant.kernel_code`), which
        holds 32 copies of them: row ``r`` reads copy ``r % 32``. Read from one address, the words were
        uniform across the warp, and ptxas kept them in uniform registers and copied one back before every
        lookup at some configurations (the same ~2 extra instructions per packed byte as immediates); read
        from per-row addresses they are ordinary registers, held through the loop.
        """
        if REGS:
            words = code_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + (16 + 256 if DTYPE == tl.bfloat16 else 16)
            words = words + (ROWS % 32) * 8
            return (tl.load(words), tl.load(words + 1), tl.load(words + 2), tl.load(words + 3),
                    tl.load(words + 4), tl.load(words + 5), tl.load(words + 6), tl.load(words + 7))
        else:
            return (0, 0, 0, 0, 0, 0, 0, 0)

    @triton.jit
    def _lookup(byte, table, DTYPE: tl.constexpr, REGS: tl.constexpr):
        """``(high, low)`` nibble levels of ``byte`` in ``DTYPE`` (fp16 / bf16): from ``table``'s registers with
        ``REGS`` (:func:`nf4_table`), else from the immediates of :func:`_decode4_asm`."""
        if REGS:
            args = [byte, table[0], table[1], table[2], table[3], table[4], table[5], table[6], table[7]]
            if DTYPE == tl.bfloat16:
                return tl.inline_asm_elementwise(_ASM_DECODE4_REGS, _ASM_OPERANDS, args,
                                                 dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
            else:
                return tl.inline_asm_elementwise(_ASM_DECODE4_REGS, _ASM_OPERANDS, args,
                                                 dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        else:
            if DTYPE == tl.bfloat16:
                return tl.inline_asm_elementwise(_ASM_DECODE4_BF16, "=r,=r,=r,=r,r", [byte],
                                                 dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
            else:
                return tl.inline_asm_elementwise(_ASM_DECODE4, "=r,=r,=r,=r,r", [byte],
                                                 dtype=(tl.float16, tl.float16), is_pure=True, pack=4)

    @triton.jit
    def _pin(v):
        """``v`` unchanged, through an inline-asm move marked as having side effects: Triton does not move a layout
        conversion above it, so the ops that made ``v`` stay in the layout they were loaded in (16-bit ``v``)."""
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [v], dtype=v.dtype, is_pure=False, pack=2)

    @triton.jit
    def nf4_levels(byte, code_ptr, ASM: tl.constexpr, table, REGS: tl.constexpr):
        """fp32 NF4 levels of the high and low nibbles of a uint8 tensor (in-register fp16 table when ``ASM``;
        ``table`` and ``REGS`` as :func:`_lookup` takes them)."""
        if ASM:
            hi, lo = _lookup(byte, table, tl.float16, REGS)
            return hi.to(tl.float32), lo.to(tl.float32)
        else:
            b = byte.to(tl.int32)
            return tl.load(code_ptr + (b >> 4)), tl.load(code_ptr + (b & 15))

    @triton.jit
    def nf4_levels_as(byte, code_ptr, ASM: tl.constexpr, DTYPE: tl.constexpr, table, REGS: tl.constexpr):
        """NF4 levels of the high and low nibbles of a uint8 tensor in ``DTYPE`` (fp16 / bf16 from the
        in-register table when ``ASM``, no fp32 round trip; else gathered in fp32 and cast)."""
        if ASM:
            return _lookup(byte, table, DTYPE, REGS)
        else:
            b = byte.to(tl.int32)
            return tl.load(code_ptr + (b >> 4)).to(DTYPE), tl.load(code_ptr + (b & 15)).to(DTYPE)

    @triton.jit
    def _byte_tile(data_ptr, rows, nmask, half_k, k0, k_end, BLOCKSIZE: tl.constexpr, NB: tl.constexpr):
        """The ``(rows, NB, BLOCKSIZE / 2)`` packed bytes of the NB blocks starting at column ``k0``."""
        HB: tl.constexpr = BLOCKSIZE // 2
        rb = tl.arange(0, NB)
        rj = tl.arange(0, HB)
        m3 = (nmask[:, None] & (k0 + rb * BLOCKSIZE < k_end)[None, :])[:, :, None]
        off = rows[:, None, None] * half_k + (k0 // 2 + rb * HB)[None, :, None] + rj[None, None, :]
        return tl.load(data_ptr + off, mask=m3, other=0)

    @triton.jit
    def _x_pairs(x_ptr, k0, rb, rj, bmask, BLOCKSIZE: tl.constexpr):
        """fp32 ``(x[2j], x[2j+1])`` of the NB blocks from ``k0``, each ``(NB, BLOCKSIZE / 2)``.

        16-bit x is read as 32-bit words (one per pair) and split with integer ops: the words load in
        the layout the byte tile needs, where a split of ``(NB, HB, 2)`` values went through shared memory.
        """
        HB: tl.constexpr = BLOCKSIZE // 2
        if x_ptr.dtype.element_ty == tl.float32:
            rt = tl.arange(0, 2)
            xoff = k0 + rb[:, None, None] * BLOCKSIZE + 2 * rj[None, :, None] + rt[None, None, :]
            xe, xo = tl.split(tl.load(x_ptr + xoff, mask=bmask[:, None, None], other=0.0))
        else:
            words = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + (k0 // 2 + rb[:, None] * HB + rj[None, :])
            xw = tl.load(words, mask=bmask[:, None], other=0)
            if x_ptr.dtype.element_ty == tl.bfloat16:  # bf16 -> fp32 is the 16 bits moved to the top
                xe = (xw << 16).to(tl.float32, bitcast=True)
                xo = (xw & -65536).to(tl.float32, bitcast=True)
            else:
                xe = (xw & 65535).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                xo = (xw >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return xe, xo

    @triton.jit
    def split_total(part, offs, mask, ws_ptr, cnt_ptr, tile, k, n_split, n_out):
        """Split-K in one launch: store ``part`` as slice ``k``'s partial of ``tile`` (``ws[k, offs]``, rows of
        ``n_out``) and count the arrival; returns ``(last, total)``: whether this program arrived last and, if so,
        the partials summed in fixed order (deterministic; ``part`` otherwise). The last one then finishes the tile
        and resets the count (``tl.atomic_xchg(cnt_ptr + tile, 0)``) for the next launch.

        Arrival count per tile in ``cnt_ptr`` (zero before the launch): all threads store, a CTA barrier, then one
        release/acquire atomic -- the ordering CUTLASS's split-K semaphore relies on; the partials are then read
        through L2 (``.cg``), past the L1. Also the DoRA row norm's (``alignlab.kernels.dora``)."""
        tl.store(ws_ptr + k * n_out + offs, part, mask=mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        last = arrived == n_split - 1
        if last:
            part = tl.zeros_like(part)
            for j in range(0, n_split):
                part += tl.load(ws_ptr + j * n_out + offs, mask=mask, other=0.0, cache_modifier=".cg")
        return last, part

    @triton.jit
    def grid_wait():
        """``griddepcontrol.wait``: block until the kernel launched before this one on the stream has finished and
        its writes are visible (a no-op unless this kernel was launched as a programmatic dependent)."""
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0 unused", "=r", [], dtype=tl.int32, is_pure=False,
                                  pack=1)

    @triton.jit
    def launch_dependents():
        """``griddepcontrol.launch_dependents``: let the kernel launched after this one as a programmatic dependent
        start now, alongside this one."""
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0 unused", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)

    @triton.jit
    def _rank_term(part, xa_ptr, lb_ptr, R, stride_lb, rm, m_ok, rn, n_ok, OUT: tl.constexpr, LAYOUT: tl.constexpr,
                   BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
        """``part + xa[rm] c(B[rn])ᵀ`` in fp32, ``c`` = ``OUT`` (the factor rounded to the output dtype, as a cast
        would): ``xa (M, R)`` contiguous in ``OUT``, ``B (N, R)`` rows ``stride_lb`` apart in any float dtype. ``part``
        is ``(BLOCK_N,)`` for x's one row (``LAYOUT`` 0, the GEMV), ``(BLOCK_M, BLOCK_N)`` (1) or ``(BLOCK_N,
        BLOCK_M)`` (2, the swapped kernels); ``rm`` / ``rn`` are its row and column indices with their masks.

        ``B``'s ``(BLOCK_N, BLOCK_R)`` tile and ``xa``'s rows in one load each, multiplied by ``tl.dot`` (a broadcast
        product summed over the rank for the GEMV): 0.3-3.2 µs less GPU time per QLoRA decode call on an H100 than
        one rank step (two dependent loads) at a time (RESULTS.md, issue 24)."""
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < R
        b = tl.load(lb_ptr + rn[:, None].to(tl.int64) * stride_lb + rr[None, :], mask=n_ok[:, None] & r_ok[None, :],
                    other=0.0).to(OUT)
        if LAYOUT == 0:
            xa = tl.load(xa_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)
            out = part + tl.sum(b.to(tl.float32) * xa[None, :], axis=1)
        else:
            xa = tl.load(xa_ptr + rm[:, None] * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            if IEEE:  # fp32 x, and the interpreter (its tl.dot is wrong for 16-bit operands)
                xa = xa.to(tl.float32)
                b = b.to(tl.float32)
                if LAYOUT == 1:
                    out = tl.dot(xa, tl.trans(b), part, input_precision="ieee")
                else:
                    out = tl.dot(b, tl.trans(xa), part, input_precision="ieee")
            elif LAYOUT == 1:
                out = tl.dot(xa, tl.trans(b), part)
            else:
                out = tl.dot(b, tl.trans(xa), part)
        return out

    @triton.jit
    def _finish(part, offs, mask, n_out, y_ptr, ws_ptr, cnt_ptr, bias_ptr, bias_offs, pid_n, pid_k, n_split,
                SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, xa_ptr, lb_ptr, R, stride_lb, rm, m_ok, rn, n_ok,
                HAS_RANK: tl.constexpr, LAYOUT: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
                PDL: tl.constexpr):
        """Write ``part`` (+ bias) (+ the rank-r term, :func:`_rank_term`) to ``y``, or, with ``SPLIT``, this K
        slice's partial to the workspace; the last slice of a tile to arrive sums the partials in fixed order
        and writes ``y`` (one launch, no zero-filled accumulator, deterministic: :func:`split_total`). ``PDL``: this
        kernel runs alongside the one that writes ``xa`` (launched as its programmatic dependent), so the rank term
        waits for it (:func:`grid_wait`)."""
        if SPLIT:
            last, part = split_total(part, offs, mask, ws_ptr, cnt_ptr, pid_n, pid_k, n_split, n_out)
            if last:
                if HAS_BIAS:
                    part += tl.load(bias_ptr + bias_offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_RANK:
                    if PDL:
                        grid_wait()
                    part = _rank_term(part, xa_ptr, lb_ptr, R, stride_lb, rm, m_ok, rn, n_ok,
                                      y_ptr.dtype.element_ty, LAYOUT, BLOCK_R, IEEE)
                tl.store(y_ptr + offs, part.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + pid_n, 0)
        else:
            if HAS_BIAS:
                part += tl.load(bias_ptr + bias_offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_RANK:
                if PDL:
                    grid_wait()
                part = _rank_term(part, xa_ptr, lb_ptr, R, stride_lb, rm, m_ok, rn, n_ok, y_ptr.dtype.element_ty,
                                  LAYOUT, BLOCK_R, IEEE)
            tl.store(y_ptr + offs, part.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gemv_kernel(
        x_ptr, data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr, y_ptr,
        ws_ptr, cnt_ptr, bias_ptr, N, K, half_k, k_per_split, n_split, xa_ptr, lb_ptr, R, stride_lb,
        BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RANK: tl.constexpr, BLOCK_R: tl.constexpr,
        PDL: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
        ASM: tl.constexpr, REGS: tl.constexpr,
    ):
        """y[N] (+)= W[N, K] x[K] for one row of x; K % BLOCKSIZE == 0."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        HB: tl.constexpr = BLOCKSIZE // 2
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rows = rn.to(tl.int64)
        rb = tl.arange(0, NB)
        rj = tl.arange(0, HB)
        nb_row = K // BLOCKSIZE
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        table = nf4_table(code_ptr, tl.float16, ASM and REGS, rn[:, None, None])
        acc = tl.zeros((BLOCK_N, NB, HB), dtype=tl.float32)
        for k0 in range(k_start, k_end, NB * BLOCKSIZE):
            bmask = k0 + rb * BLOCKSIZE < k_end
            m2 = nmask[:, None] & bmask[None, :]
            byte = _byte_tile(data_ptr, rows, nmask, half_k, k0, k_end, BLOCKSIZE, NB)
            hi, lo = nf4_levels(byte, code_ptr, ASM, table, REGS)
            bidx = rows[:, None] * nb_row + (k0 // BLOCKSIZE + rb)[None, :]
            s = nf4_block_scale(absmax_ptr, nested_ptr, offset_ptr, code2_ptr, bidx, m2, DOUBLE, NESTED_BS)
            xe, xo = _x_pairs(x_ptr, k0, rb, rj, bmask, BLOCKSIZE)
            acc += (hi * xe[None, :, :] + lo * xo[None, :, :]) * s[:, :, None]
            if HAS_SHIFT:
                tau = tl.load(shift_ptr + bidx, mask=m2, other=0.0)
                acc += tau[:, :, None] * (xe + xo)[None, :, :]
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
        _finish(y, rn, nmask, N, y_ptr, ws_ptr, cnt_ptr, bias_ptr, rn, pid_n, pid_k, n_split, SPLIT, HAS_BIAS,
                xa_ptr, lb_ptr, R, stride_lb, rn * 0, nmask, rn, nmask, HAS_RANK, 0, BLOCK_R, False, PDL)

    @triton.jit
    def _dot_kernel(
        x_ptr, data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr, y_ptr,
        ws_ptr, cnt_ptr, bias_ptr, M, N, K, half_k, stride_xm, k_per_split, n_split, xa_ptr, lb_ptr, R, stride_lb,
        BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        IEEE: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RANK: tl.constexpr, BLOCK_R: tl.constexpr,
        PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, ASM: tl.constexpr, REGS: tl.constexpr,
    ):
        """y[M, N] (+)= x[M, K] W[N, K]^T for M <= BLOCK_M; K % BLOCKSIZE == 0."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        HB: tl.constexpr = BLOCKSIZE // 2
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rows = rn.to(tl.int64)
        rm = tl.arange(0, BLOCK_M)
        mmask = rm < M
        rb = tl.arange(0, NB)
        rj = tl.arange(0, HB)
        rt = tl.arange(0, 2)
        nb_row = K // BLOCKSIZE
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        x_rows = x_ptr + rm.to(tl.int64)[:, None, None, None] * stride_xm
        table = nf4_table(code_ptr, tl.float16, ASM and REGS, rn[:, None, None])
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_end, NB * BLOCKSIZE):
            bmask = k0 + rb * BLOCKSIZE < k_end
            m2 = nmask[:, None] & bmask[None, :]
            byte = _byte_tile(data_ptr, rows, nmask, half_k, k0, k_end, BLOCKSIZE, NB)
            bidx = rows[:, None] * nb_row + (k0 // BLOCKSIZE + rb)[None, :]
            s = nf4_block_scale(absmax_ptr, nested_ptr, offset_ptr, code2_ptr, bidx, m2, DOUBLE, NESTED_BS)
            hi, lo = nf4_levels(byte, code_ptr, ASM, table, REGS)
            hi = hi * s[:, :, None]
            lo = lo * s[:, :, None]
            if HAS_SHIFT:
                tau = tl.load(shift_ptr + bidx, mask=m2, other=0.0)
                hi += tau[:, :, None]
                lo += tau[:, :, None]
            xoff = k0 + rb[None, :, None, None] * BLOCKSIZE + 2 * rj[None, None, :, None] + rt[None, None, None, :]
            xv = tl.load(x_rows + xoff, mask=mmask[:, None, None, None] & bmask[None, :, None, None], other=0.0)
            xe, xo = tl.split(xv)
            xe = tl.reshape(xe, (BLOCK_M, NB * HB))
            xo = tl.reshape(xo, (BLOCK_M, NB * HB))
            hi = tl.reshape(hi, (BLOCK_N, NB * HB))
            lo = tl.reshape(lo, (BLOCK_N, NB * HB))
            if IEEE:
                acc += tl.dot(xe.to(tl.float32), tl.trans(hi), input_precision="ieee")
                acc += tl.dot(xo.to(tl.float32), tl.trans(lo), input_precision="ieee")
            else:
                acc += tl.dot(xe, tl.trans(hi.to(xe.dtype)))
                acc += tl.dot(xo, tl.trans(lo.to(xo.dtype)))
        offs = rm[:, None].to(tl.int64) * N + rn[None, :]  # y and each workspace slice are (M, N), contiguous
        omask = mmask[:, None] & nmask[None, :]
        _finish(acc, offs, omask, M * N, y_ptr, ws_ptr, cnt_ptr, bias_ptr, rn[None, :], pid_n, pid_k, n_split,
                SPLIT, HAS_BIAS, xa_ptr, lb_ptr, R, stride_lb, rm, mmask, rn, nmask, HAS_RANK, 1, BLOCK_R,
                IEEE, PDL)

    @triton.jit
    def _late_kernel(
        x_ptr, data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr, y_ptr,
        ws_ptr, cnt_ptr, bias_ptr, M, N, K, half_k, stride_xm, k_per_split, n_split, xa_ptr, lb_ptr, R, stride_lb,
        BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        IEEE: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RANK: tl.constexpr, BLOCK_R: tl.constexpr,
        PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, ASM: tl.constexpr, REGS: tl.constexpr,
    ):
        """y[M, N] (+)= x[M, K] W[N, K]^T for M <= BLOCK_M, scales applied late; K % BLOCKSIZE == 0.

        Per quantization block: the raw levels (in x's dtype, straight from the in-register table) go into
        ``tl.dot`` unscaled, and the block's ``(BLOCK_M, BLOCK_N)`` fp32 product is multiplied by its scale
        column (``y = sum_b s_b * (x_b q_b^T)``). The per-weight work is the lookup alone; the scaling costs
        ``BLOCK_M / BLOCKSIZE`` multiply-adds per weight instead of a convert, a multiply and a convert back.
        """
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        HB: tl.constexpr = BLOCKSIZE // 2
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rows = rn.to(tl.int64)
        rm = tl.arange(0, BLOCK_M)
        mmask = rm < M
        rj = tl.arange(0, HB)
        rt = tl.arange(0, 2)
        nb_row = K // BLOCKSIZE
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        x_rows = x_ptr + rm.to(tl.int64)[:, None, None] * stride_xm
        w_rows = data_ptr + rows[:, None] * half_k + rj[None, :]
        table = nf4_table(code_ptr, x_ptr.dtype.element_ty, ASM and REGS and not IEEE, rn[:, None])
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_end, NB * BLOCKSIZE):
            for b in tl.static_range(NB):
                kb = k0 + b * BLOCKSIZE
                nok = nmask & (rn * 0 + kb < k_end)  # (vector masks: the interpreter takes no scalar one)
                mok = mmask & (rm * 0 + kb < k_end)
                byte = tl.load(w_rows + kb // 2, mask=nok[:, None], other=0)
                bidx = rows * nb_row + kb // BLOCKSIZE
                s = nf4_block_scale(absmax_ptr, nested_ptr, offset_ptr, code2_ptr, bidx, nok, DOUBLE, NESTED_BS)
                xv = tl.load(x_rows + (kb + 2 * rj[None, :, None] + rt[None, None, :]),
                             mask=mok[:, None, None], other=0.0)
                xe, xo = tl.split(xv)
                if IEEE:  # fp32 activations, and the Triton interpreter (its tl.dot is wrong for bf16)
                    hi, lo = nf4_levels_as(byte, code_ptr, False, tl.float32, table, REGS)
                    part = tl.dot(xe.to(tl.float32), tl.trans(hi), input_precision="ieee")
                    part = tl.dot(xo.to(tl.float32), tl.trans(lo), part, input_precision="ieee")
                else:
                    hi, lo = nf4_levels_as(byte, code_ptr, ASM, x_ptr.dtype.element_ty, table, REGS)
                    part = tl.dot(xe, tl.trans(hi))
                    part = tl.dot(xo, tl.trans(lo), part)
                acc += part * s[None, :]
                if HAS_SHIFT:
                    tau = tl.load(shift_ptr + bidx, mask=nok, other=0.0)
                    acc += tl.sum(xe.to(tl.float32) + xo.to(tl.float32), axis=1)[:, None] * tau[None, :]
        offs = rm[:, None].to(tl.int64) * N + rn[None, :]  # y and each workspace slice are (M, N), contiguous
        omask = mmask[:, None] & nmask[None, :]
        _finish(acc, offs, omask, M * N, y_ptr, ws_ptr, cnt_ptr, bias_ptr, rn[None, :], pid_n, pid_k, n_split,
                SPLIT, HAS_BIAS, xa_ptr, lb_ptr, R, stride_lb, rm, mmask, rn, nmask, HAS_RANK, 1, BLOCK_R,
                IEEE, PDL)

    @triton.jit
    def _x_pair_pointers(x_ptr, rm, rj, stride_xm):
        """The swapped kernels' x pointers for rows ``rm`` and pairs ``rj``: ``(len(rj), len(rm))`` to ``x[m, 2j]``
        and ``(len(rm), len(rj))`` to the 32-bit words ``(x[m, 2j], x[m, 2j + 1])`` (``stride_xm`` is even where
        their ``X_WORDS`` reads them)."""
        x_cols = x_ptr + rm.to(tl.int64)[None, :] * stride_xm + 2 * rj[:, None]
        x_words = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + (rm.to(tl.int64)[:, None] * (stride_xm // 2)
                                                                     + rj[None, :])
        return x_cols, x_words

    @triton.jit
    def _swap_kernel(
        x_ptr, data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr, y_ptr,
        ws_ptr, cnt_ptr, bias_ptr, M, N, K, half_k, stride_xm, k_per_split, n_split, xa_ptr, lb_ptr, R, stride_lb,
        BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        IEEE: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RANK: tl.constexpr, BLOCK_R: tl.constexpr,
        PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, ASM: tl.constexpr, REGS: tl.constexpr, EARLY: tl.constexpr,
        X_WORDS: tl.constexpr, LOOKUP_FIRST: tl.constexpr,
    ):
        """y[M, N]^T (+)= W[N, K] x[M, K]^T for M <= BLOCK_M: the weight is the *first* operand of ``tl.dot``.

        The same product as :func:`_late_kernel` with the operands swapped: the output tile is
        ``(BLOCK_N, BLOCK_M)``, so the dequantized weight is the dot's left operand and x's transposed tile its
        right one. On Hopper that is the shape of ``wgmma`` with its left operand in registers (x's small tile
        is staged in shared memory; for the layout change Triton sends the packed bytes, or with ``LOOKUP_FIRST``
        the 16-bit levels, through shared memory once), and the accumulator is ``BLOCK_N x BLOCK_M`` (64 fp32
        per thread at 128 x 64 with 4 warps, where the late kernel's ``tl.dot`` form ran out of registers at
        32 rows). With ``EARLY`` each
        block's levels are scaled in x's dtype before the dot (one accumulator chain over K, like a
        dequantize-then-multiply); without, each block's fp32 product is scaled as in the late kernel.

        ``X_WORDS`` (16-bit x whose rows start 4-byte aligned): x is read as 32-bit words, one per pair
        ``(x[2j], x[2j + 1])``, contiguous along the row, and split into the even and odd halves with integer
        ops -- one load per pair instead of two strided 16-bit loads. The x tile is ``(HB, M)`` per block
        against ``(BLOCK_N, HB)`` packed bytes, so at ``M = 64`` x's loads outnumbered the weight's.
        """
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        HB: tl.constexpr = BLOCKSIZE // 2
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rows = rn.to(tl.int64)
        rm = tl.arange(0, BLOCK_M)
        mmask = rm < M
        rj = tl.arange(0, HB)
        nb_row = K // BLOCKSIZE
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        x_cols, x_words = _x_pair_pointers(x_ptr, rm, rj, stride_xm)
        w_rows = data_ptr + rows[:, None] * half_k + rj[None, :]
        table = nf4_table(code_ptr, x_ptr.dtype.element_ty, ASM and REGS and not IEEE, rn[:, None])
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(k_start, k_end, NB * BLOCKSIZE):
            for b in tl.static_range(NB):
                kb = k0 + b * BLOCKSIZE
                nok = nmask & (rn * 0 + kb < k_end)  # (vector masks: the interpreter takes no scalar one)
                mok = mmask & (rm * 0 + kb < k_end)
                byte = tl.load(w_rows + kb // 2, mask=nok[:, None], other=0)
                bidx = rows * nb_row + kb // BLOCKSIZE
                s = nf4_block_scale(absmax_ptr, nested_ptr, offset_ptr, code2_ptr, bidx, nok, DOUBLE, NESTED_BS)
                if X_WORDS:
                    xw = tl.load(x_words + kb // 2, mask=mok[:, None], other=0)
                    xe = tl.trans((xw & 65535).to(tl.int16).to(x_ptr.dtype.element_ty, bitcast=True))
                    xo = tl.trans((xw >> 16).to(tl.int16).to(x_ptr.dtype.element_ty, bitcast=True))
                else:
                    xe = tl.load(x_cols + kb, mask=mok[None, :], other=0.0)
                    xo = tl.load(x_cols + (kb + 1), mask=mok[None, :], other=0.0)
                if IEEE:  # fp32 activations, and the Triton interpreter (its tl.dot is wrong for bf16)
                    hi, lo = nf4_levels_as(byte, code_ptr, False, tl.float32, table, REGS)
                    if EARLY:
                        acc = tl.dot(hi * s[:, None], xe.to(tl.float32), acc, input_precision="ieee")
                        acc = tl.dot(lo * s[:, None], xo.to(tl.float32), acc, input_precision="ieee")
                    else:
                        part = tl.dot(hi, xe.to(tl.float32), input_precision="ieee")
                        part = tl.dot(lo, xo.to(tl.float32), part, input_precision="ieee")
                        acc += part * s[:, None]
                else:
                    hi, lo = nf4_levels_as(byte, code_ptr, ASM, x_ptr.dtype.element_ty, table, REGS)
                    if LOOKUP_FIRST:
                        hi, lo = _pin(hi), _pin(lo)
                    if EARLY:
                        sc = s.to(x_ptr.dtype.element_ty)[:, None]
                        acc = tl.dot(hi * sc, xe, acc)
                        acc = tl.dot(lo * sc, xo, acc)
                    else:
                        part = tl.dot(hi, xe)
                        part = tl.dot(lo, xo, part)
                        acc += part * s[:, None]
                if HAS_SHIFT:
                    tau = tl.load(shift_ptr + bidx, mask=nok, other=0.0)
                    acc += tau[:, None] * tl.sum(xe.to(tl.float32) + xo.to(tl.float32), axis=0)[None, :]
        offs = rm[None, :].to(tl.int64) * N + rn[:, None]  # y and each workspace slice are (M, N), contiguous
        omask = mmask[None, :] & nmask[:, None]
        _finish(acc, offs, omask, M * N, y_ptr, ws_ptr, cnt_ptr, bias_ptr, rn[:, None], pid_n, pid_k, n_split,
                SPLIT, HAS_BIAS, xa_ptr, lb_ptr, R, stride_lb, rm, mmask, rn, nmask, HAS_RANK, 2, BLOCK_R,
                IEEE, PDL)

    @triton.jit
    def _flat_step(data_ptr, absmax_ptr, nested_ptr, offset_ptr, code2_ptr, rows, nmask, half_k, nb_row, k0, k_end,
                   BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE: tl.constexpr, NB: tl.constexpr):
        """The ``(rows, NB, BLOCKSIZE / 2)`` packed bytes of the NB blocks from column ``k0`` and their
        ``(rows, NB)`` fp32 scales; blocks from ``k_end`` on (past the K slice) are masked, read as zeros."""
        rb = tl.arange(0, NB)
        m2 = nmask[:, None] & (k0 + rb * BLOCKSIZE < k_end)[None, :]
        byte = _byte_tile(data_ptr, rows, nmask, half_k, k0, k_end, BLOCKSIZE, NB)
        bidx = rows[:, None] * nb_row + (k0 // BLOCKSIZE + rb)[None, :]
        s = nf4_block_scale(absmax_ptr, nested_ptr, offset_ptr, code2_ptr, bidx, m2, DOUBLE, NESTED_BS)
        return byte, s

    @triton.jit
    def _flat_kernel(
        x_ptr, data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr, y_ptr,
        ws_ptr, cnt_ptr, bias_ptr, M, N, K, half_k, stride_xm, k_per_split, n_split, xa_ptr, lb_ptr, R, stride_lb,
        BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        IEEE: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RANK: tl.constexpr, BLOCK_R: tl.constexpr,
        PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, ASM: tl.constexpr, REGS: tl.constexpr,
        X_WORDS: tl.constexpr, PREFETCH: tl.constexpr, INTERLEAVE: tl.constexpr,
    ):
        """y[M, N]^T (+)= W[N, K] x[M, K]^T for M <= BLOCK_M: ``_swap_kernel``'s early-scaled form (``swap_early``)
        with a step's NB quantization blocks as one operand.

        Per step the ``(BLOCK_N, NB * BLOCKSIZE / 2)`` packed bytes are looked up, scaled per block in x's dtype
        and multiplied by x's ``(NB * BLOCKSIZE / 2, M)`` even and odd halves in one ``tl.dot`` each (the swapped
        kernel: two per block, each over 32 columns), so the tensor-core chain per step is NB times as long.
        ``PREFETCH``: the next step's bytes and block scales are loaded before this step's lookup and products, so
        that their loads are in flight while the warp computes (one step of registers more; the swapped kernels'
        tuned tiles run one pipeline stage and at up to 255 registers one CTA per SM, where nothing else hides a
        load's latency). ``INTERLEAVE``: the high and low levels joined back into the weight's column order and x's
        ``(M, NB * BLOCKSIZE)`` tile read as stored, one ``tl.dot`` per step (at 64 rows x's tile is 4x the packed
        weight's bytes per step, and without it each x word is split into its halves and both transposed)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        HB: tl.constexpr = BLOCKSIZE // 2
        KB: tl.constexpr = NB * HB  # packed bytes of a row per step
        STEP: tl.constexpr = NB * BLOCKSIZE
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rows = rn.to(tl.int64)
        rm = tl.arange(0, BLOCK_M)
        mmask = rm < M
        rk = tl.arange(0, KB)
        rb = tl.arange(0, NB)
        nb_row = K // BLOCKSIZE
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        x_cols, x_words = _x_pair_pointers(x_ptr, rm, rk, stride_xm)
        rk2 = tl.arange(0, 2 * KB)
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk2[None, :]  # (BLOCK_M, 2 KB): x as stored
        table = nf4_table(code_ptr, x_ptr.dtype.element_ty, ASM and REGS and not IEEE, rn[:, None, None])
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        if PREFETCH:
            byte_next, s_next = _flat_step(data_ptr, absmax_ptr, nested_ptr, offset_ptr, code2_ptr, rows, nmask,
                                           half_k, nb_row, k_start, k_end, BLOCKSIZE, NESTED_BS, DOUBLE, NB)
        for k0 in range(k_start, k_end, STEP):
            if PREFETCH:
                byte, s = byte_next, s_next
                byte_next, s_next = _flat_step(data_ptr, absmax_ptr, nested_ptr, offset_ptr, code2_ptr, rows, nmask,
                                               half_k, nb_row, k0 + STEP, k_end, BLOCKSIZE, NESTED_BS, DOUBLE, NB)
            else:
                byte, s = _flat_step(data_ptr, absmax_ptr, nested_ptr, offset_ptr, code2_ptr, rows, nmask, half_k,
                                     nb_row, k0, k_end, BLOCKSIZE, NESTED_BS, DOUBLE, NB)
            kok = k0 + (rk // HB) * BLOCKSIZE < k_end  # (KB,): columns of blocks inside the K slice
            if INTERLEAVE:
                kok2 = k0 + (rk2 // BLOCKSIZE) * BLOCKSIZE < k_end
                xt = tl.load(x_rows + k0, mask=mmask[:, None] & kok2[None, :], other=0.0)
            elif X_WORDS:
                xw = tl.load(x_words + k0 // 2, mask=mmask[:, None] & kok[None, :], other=0)
                xe = tl.trans((xw & 65535).to(tl.int16).to(x_ptr.dtype.element_ty, bitcast=True))
                xo = tl.trans((xw >> 16).to(tl.int16).to(x_ptr.dtype.element_ty, bitcast=True))
            else:
                xe = tl.load(x_cols + k0, mask=kok[:, None] & mmask[None, :], other=0.0)
                xo = tl.load(x_cols + (k0 + 1), mask=kok[:, None] & mmask[None, :], other=0.0)
            if IEEE:  # fp32 activations, and the Triton interpreter (its tl.dot is wrong for bf16)
                hi, lo = nf4_levels_as(byte, code_ptr, False, tl.float32, table, REGS)
                sc = s[:, :, None]
            else:
                hi, lo = nf4_levels_as(byte, code_ptr, ASM, x_ptr.dtype.element_ty, table, REGS)
                sc = s.to(x_ptr.dtype.element_ty)[:, :, None]
            if INTERLEAVE:  # (high, low) of byte j are columns 2j, 2j + 1
                w = tl.reshape(tl.reshape(tl.join(hi, lo), (BLOCK_N, NB, BLOCKSIZE)) * sc, (BLOCK_N, 2 * KB))
                if IEEE:
                    acc = tl.dot(w, tl.trans(xt).to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(w, tl.trans(xt), acc)
            elif IEEE:
                acc = tl.dot(tl.reshape(hi * sc, (BLOCK_N, KB)), xe.to(tl.float32), acc, input_precision="ieee")
                acc = tl.dot(tl.reshape(lo * sc, (BLOCK_N, KB)), xo.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(tl.reshape(hi * sc, (BLOCK_N, KB)), xe, acc)
                acc = tl.dot(tl.reshape(lo * sc, (BLOCK_N, KB)), xo, acc)
            if HAS_SHIFT:
                bidx = rows[:, None] * nb_row + (k0 // BLOCKSIZE + rb)[None, :]
                bok = nmask[:, None] & (k0 + rb * BLOCKSIZE < k_end)[None, :]
                tau = tl.load(shift_ptr + bidx, mask=bok, other=0.0)  # (BLOCK_N, NB)
                if INTERLEAVE:  # (NB, BLOCK_M) sums of x over each block
                    xs = tl.trans(tl.sum(tl.reshape(xt.to(tl.float32), (BLOCK_M, NB, BLOCKSIZE)), axis=2))
                else:
                    xs = tl.sum(tl.reshape(xe.to(tl.float32) + xo.to(tl.float32), (NB, HB, BLOCK_M)), axis=1)
                acc += tl.sum(tau[:, :, None] * xs[None, :, :], axis=1)
        offs = rm[None, :].to(tl.int64) * N + rn[:, None]  # y and each workspace slice are (M, N), contiguous
        omask = mmask[None, :] & nmask[:, None]
        _finish(acc, offs, omask, M * N, y_ptr, ws_ptr, cnt_ptr, bias_ptr, rn[:, None], pid_n, pid_k, n_split,
                SPLIT, HAS_BIAS, xa_ptr, lb_ptr, R, stride_lb, rm, mmask, rn, nmask, HAS_RANK, 2, BLOCK_R,
                IEEE, PDL)


_SLOTS, _SLOT_SIZE = 64, 4096
_LAST_COUNTERS = 16  # the end of each row, for _arrival_counters(..., last=True)
_POOLS: dict = {}
_SLOT_OF: dict = {}
_VIEWS: dict = {}
_SLOT_LOCK = threading.Lock()


def _arrival_counters(device: torch.device, n: int, last: bool = False) -> torch.Tensor:
    """``n`` int32 zeros for the split-K arrival counts of one launch (``last``: the row's last ``n`` counters,
    which the first-``n`` views never reach -- for the decode down kernel, which may run alongside the NF4 product
    that follows it).

    Every launch leaves its counters at zero again, so they are not filled per call: each device
    has one zeroed pool, made at its first call, with a row of counters per CUDA stream (two
    launches running at once must not share counters). A stream gets its row on first sight, also
    during CUDA-graph capture, so captured graphs need no fill either (a graph keeps the row of the
    stream it was captured on: replay it where no eager call on that stream runs at the same time).
    Without a pool yet during capture, beyond 64 streams or 4080 tiles, the counters are a fresh
    zero-filled tensor instead (correct, one small fill kernel more). The views handed out are
    remembered per (device, stream, n, last): later calls cost one dictionary lookup.
    """
    if device.type != "cuda" or n > _SLOT_SIZE - _LAST_COUNTERS or (last and n > _LAST_COUNTERS):
        return torch.zeros(n, dtype=torch.int32, device=device)
    key = (device.index, torch._C._cuda_getCurrentRawStream(device.index), n, last)
    view = _VIEWS.get(key)
    if view is not None:
        return view
    with _SLOT_LOCK:  # threads launching on different streams must get different rows
        pool = _POOLS.get(device.index)
        if pool is None:
            if torch.cuda.is_current_stream_capturing():  # a fill made now would only run inside the graph
                return torch.zeros(n, dtype=torch.int32, device=device)
            pool = _POOLS[device.index] = keep(
                lambda: torch.zeros(_SLOTS, _SLOT_SIZE, dtype=torch.int32, device=device), device)
        stream = key[:2]
        slot = _SLOT_OF.get(stream)
        if slot is None:
            used = sum(1 for k in _SLOT_OF if k[0] == device.index)
            if used >= _SLOTS:
                return torch.zeros(n, dtype=torch.int32, device=device)
            slot = _SLOT_OF[stream] = used
        view = _VIEWS[key] = pool[slot, _SLOT_SIZE - n:] if last else pool[slot, :n]
    return view


def small_m_matmul(
    x2: torch.Tensor,
    t: NF4Tensor,
    bias: torch.Tensor | None = None,
    *,
    kernel: str | None = None,
    block_n: int | None = None,
    nb: int | None = None,
    split: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    asm: bool | None = None,
    rank_term: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``x2 @ W^T (+ bias) (+ xa c(b)^T)`` for ``x2`` of shape ``(M, K)`` with ``1 <= M <= MAX_M`` (64).

    Args:
        x2: ``(M, K)`` activations with a contiguous last dimension.
        t: the NF4 weight, logical shape ``(N, K)``, ``K % t.blocksize == 0`` and
            ``t.blocksize <= 256`` (the caller,
            :func:`alignlab.kernels.nf4_matmul.nf4_matmul`, checks both).
        bias: optional ``(N,)``, added in fp32 before the cast to ``x2.dtype``.
        kernel: ``"gemv"`` (``M == 1`` only), ``"dot"``, ``"late"`` (scales on the accumulator),
            ``"swap"`` / ``"swap_early"`` (the weight as the dot's left operand, scaled after / before it),
            ``"swap_flat"`` (``"swap_early"`` with a step's blocks as one operand); default by ``M`` and this GPU's
            table.
        block_n, nb, split, num_warps, num_stages: launch configuration (rows per program,
            quantization blocks per step, K slices, warps, pipeline stages).  Defaults: the
            measured table of this GPU (:mod:`alignlab.kernels.nf4_configs`), else the H100 rules.
        asm: in-register codebook; default on for 16-bit ``x`` on NVIDIA GPUs.
        rank_term: ``(xa, b)``, ``xa (M, r)`` in ``x2``'s dtype and ``b (N, r)`` in any float dtype: their product,
            ``b`` rounded to ``x2``'s dtype and the sum in fp32, is added in the kernel's epilogue, before the one
            rounding of the result (a LoRA layer's ``(s·x Aᵀ) Bᵀ`` at decode sizes: no pass over ``y`` of its own).

    Returns:
        ``(M, N)`` in ``x2.dtype``.

    Raises:
        TypeError: ``t`` not an NF4Tensor, ``x2`` not a float32/float16/bfloat16 tensor, ``bias`` not a tensor, ``asm``
            not a bool or None.
        ValueError: ``x2`` not ``(M, K)`` with ``K`` the weight's in-features and ``1 <= M <= 64``, a weight
            whose in-features are not whole blocks, a ``bias`` not ``(N,)``, a ``rank_term`` whose ``xa`` is not
            ``(M, r)`` in ``x2``'s dtype or whose ``b`` is not ``(N, r)`` of a float dtype, or either on another device,
            a ``kernel`` or launch parameter the kernels cannot take (``block_n``, ``nb``, ``num_warps``
            positive powers of two, ``split``, ``num_stages`` positive ints). A wrong ``K``, a strided last
            dimension, a negative ``split`` or partial blocks gave wrong numbers without an error.
    """
    _check_inputs(x2, t, bias)
    if x2.stride(1) != 1 and x2.shape[1] > 1:  # the kernels read each row as contiguous
        x2 = x2.contiguous()
    if bias is not None and bias.stride(0) != 1 and t.shape[0] > 1:
        bias = bias.contiguous()
    if rank_term is not None:
        rank_term = _checked_rank_term(rank_term, x2, t)
    return _small_m_matmul(x2, t, bias, (kernel, block_n, nb, split, num_warps, num_stages, asm), rank_term)


def _checked_rank_term(rank_term, x2: torch.Tensor, t: NF4Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rank_term`` of :func:`small_m_matmul` checked, in the layouts the kernels read (both contiguous)."""
    if not (isinstance(rank_term, (tuple, list)) and len(rank_term) == 2
            and all(isinstance(v, torch.Tensor) for v in rank_term)):
        raise TypeError(f"rank_term must be a pair of tensors (xa, b) or None, got {type(rank_term).__name__}")
    xa, b = rank_term
    if xa.dim() != 2 or xa.shape[0] != x2.shape[0] or xa.dtype != x2.dtype:
        raise ValueError(f"rank_term's xa must be (M, r) = ({x2.shape[0]}, r) in {x2.dtype}, got "
                         f"{tuple(xa.shape)} in {xa.dtype}")
    if b.dim() != 2 or b.shape != (t.shape[0], xa.shape[1]) or not b.is_floating_point():
        raise ValueError(f"rank_term's b must be (N, r) = ({t.shape[0]}, {xa.shape[1]}) of a float dtype, got "
                         f"{tuple(b.shape)} in {b.dtype}")
    if xa.device != x2.device or b.device != x2.device:
        raise ValueError(f"rank_term must be on x2's device {x2.device}, got {xa.device} and {b.device}")
    return xa.contiguous(), b.contiguous()


def _small_m_matmul(x2: torch.Tensor, t: NF4Tensor, bias: torch.Tensor | None, overrides: tuple = (None,) * 7,
                    rank_term: tuple[torch.Tensor, torch.Tensor] | None = None):
    """:func:`small_m_matmul` on arguments checked already (contiguous rows, bias and rank-term factors): what
    ``nf4_matmul``, the fused QLoRA decode path and the custom op call, so the per-call checks run once per product,
    not twice (host time per decode call)."""
    M, K = x2.shape
    N = t.shape[0]
    rank = None if rank_term is None else rank_term[1].shape[1]
    key = _plan_key(M, N, K, x2, t, bias, overrides, rank)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _plan(M, N, K, x2.dtype, x2.device, t, bias is not None, *overrides, rank=rank)
    which, grid, split, scalars, meta = plan
    if not _x_aligned(which, x2, meta):
        x2 = x2.clone()  # 16-bit x read as 32-bit pairs (_x_pairs, X_WORDS): every row must start 4-byte aligned
    y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    if split > 1:
        ws = torch.empty(split, M, N, device=x2.device, dtype=torch.float32)
        cnt = _arrival_counters(x2.device, grid[0])
    else:
        ws = cnt = y
    args = _kernel_args(which, x2, _state_args(t), y, ws, cnt, bias, M, x2.stride(0), scalars, rank_term)
    launch(_KERNELS[which], grid, args, meta)
    return y


# Under torch.compile the small-M product runs inside an opaque op: Dynamo cannot trace the address check of
# small_m_matmul nor launch its kernels with symbolic row counts, and Inductor would see the kept split-K
# counters as mutated graph inputs (no CUDA graph then). The packed weight's parts are plain arguments.
@torch.library.custom_op("alignlab::nf4_small_matmul", mutates_args=())
def _small_m_op(x2: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                nested_offset: torch.Tensor | None, shift: torch.Tensor | None, bias: torch.Tensor | None,
                shape: list[int], dtype: torch.dtype, blocksize: int, nested_blocksize: int) -> torch.Tensor:
    t = NF4Tensor(data=data, absmax=absmax, shape=torch.Size(shape), dtype=dtype, blocksize=blocksize,
                  nested_absmax=nested_absmax, nested_offset=nested_offset, shift=shift,
                  nested_blocksize=nested_blocksize)
    return _small_m_matmul(x2, t, bias)  # called by nf4_matmul, which checked the arguments


@_small_m_op.register_fake
def _(x2, data, absmax, nested_absmax, nested_offset, shift, bias, shape, dtype, blocksize, nested_blocksize):
    return x2.new_empty(x2.shape[0], shape[0])


def small_m_matmul_op(x2: torch.Tensor, t: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`small_m_matmul` (default configuration) as the custom op ``alignlab::nf4_small_matmul``, for
    traced code (``torch.compile``); no autograd (the weight is frozen, callers handle ``x``'s gradient)."""
    return torch.ops.alignlab.nf4_small_matmul(x2, t.data, t.absmax, t.nested_absmax, t.nested_offset, t.shift,
                                               bias, list(t.shape), t.dtype, t.blocksize, t.nested_blocksize)


def _check_inputs(x2, t, bias) -> None:
    """The per-call checks of :func:`small_m_matmul` (the launch plan checks the rest once per shape)."""
    if not isinstance(t, NF4Tensor):
        raise TypeError(f"t must be an NF4Tensor, got {type(t).__name__}")
    if not isinstance(x2, torch.Tensor) or x2.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x2 must be a float32/float16/bfloat16 tensor, got {getattr(x2, 'dtype', type(x2).__name__)}")
    if len(t.shape) != 2 or x2.dim() != 2 or x2.shape[1] != t.shape[1]:
        raise ValueError(f"x2 must be (M, K) for a weight of shape (N, K) = {tuple(t.shape)}, got {tuple(x2.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (t.shape[0],):  # the kernels read N values from its start
            raise ValueError(f"bias must have shape ({t.shape[0]},), got {tuple(bias.shape)}")


def _check_launch(t: NF4Tensor, K: int, block_n, nb, split, num_warps, num_stages) -> None:
    """What the kernels take: rows of whole quantization blocks (a partial last block was read as a whole one: wrong
    numbers), and launch parameters that are positive ints (powers of two where a tile is sized by them)."""
    if K % t.blocksize:
        raise ValueError(f"t must hold whole quantization blocks per row, got blocksize {t.blocksize} for {K} "
                         "in-features (nf4_matmul takes such weights)")
    for name, v, pow2 in (("block_n", block_n, True), ("nb", nb, True), ("split", split, False),
                          ("num_warps", num_warps, True), ("num_stages", num_stages, False)):
        if v is not None and (not is_int(v) or v < 1 or (pow2 and v & (v - 1))):
            kind = "a positive power of two" if pow2 else "a positive int"
            raise ValueError(f"{name} must be {kind} or None, got {v!r}")


def _plan_key(M: int, N: int, K: int, x: torch.Tensor, t: NF4Tensor, bias, overrides: tuple,
              rank: int | None = None) -> tuple:
    """What a launch plan of :func:`_plan` depends on (``rank``: that of a rank term in the epilogue, else None)."""
    return (M, N, K, x.dtype, x.device, t.blocksize, t.nested_blocksize, t.double_quant, t.shift is not None,
            bias is not None, interpreting(), overrides, rank, rank is not None and RANK_OVERLAP)


def _x_aligned(which: str, x: torch.Tensor, meta: dict, row: int | None = None) -> bool:
    """Whether ``x`` suits a kernel that reads 16-bit x as 32-bit pairs (the GEMV's ``_x_pairs``, the swapped
    kernels' ``X_WORDS``): its start, and for more than one row its row stride (``row``, else ``x.stride(0)``),
    4-byte aligned. Other kernels and dtypes take any ``x``."""
    if x.element_size() != 2 or not (which == "gemv" or meta.get("X_WORDS")):
        return True
    if x.data_ptr() % 4:
        return False
    row = x.stride(0) if row is None else row
    return which == "gemv" or x.numel() <= x.shape[-1] or row % 2 == 0


def _kernel_args(which: str, x, state: tuple, y, ws, cnt, bias, M: int, row: int, scalars: tuple,
                 rank_term: tuple | None = None) -> tuple:
    """The runtime arguments of :func:`_gemv_kernel` / :func:`_dot_kernel` (a missing bias or rank term is passed
    as ``y``, unused under ``HAS_BIAS`` / ``HAS_RANK`` False; ``row`` is the stride between rows of ``x``)."""
    return (x, *state, y, ws, cnt, bias if bias is not None else y, *_scalar_args(which, M, row, scalars),
            *_rank_args(y, rank_term))


def _rank_args(y, rank_term: tuple | None) -> tuple:
    """``(xa, b, r, b's row stride)`` after the int arguments; placeholders without a rank term."""
    if rank_term is None:
        return y, y, 0, 0
    xa, b = rank_term
    return xa, b, b.shape[1], b.stride(0)


def _scalar_args(which: str, M: int, row: int, scalars: tuple) -> tuple:
    """The int arguments after the pointers in :func:`_kernel_args`' tuple."""
    return scalars if which == "gemv" else (M, *scalars[:3], row, *scalars[3:])


def small_m_runner(x: torch.Tensor, t: NF4Tensor, bias: torch.Tensor | None, rank_b: torch.Tensor | None = None):
    """``run(x, bias) -> y`` doing what :func:`small_m_matmul` does for calls like this one, at less host cost.
    With ``rank_b`` (``(N, r)``, unit column stride): ``run(x, bias, xa) -> y``, the product with
    ``rank_term=(xa, rank_b)`` (``xa (M, r)`` contiguous in ``x``'s dtype), valid while ``rank_b`` is this tensor
    at this address (the caller keys its cache by it).

    Valid for inputs ``x`` of ``x``'s shape, strides, dtype, device and 16-byte alignment class, with a
    bias of ``bias``'s presence and dtype, launched on the current CUDA stream; the caller keys its
    cache by those (``NF4Linear``'s decode path). ``x`` is ``(..., K)`` with rows at one stride and
    ``y`` comes back ``(..., N)``. Per call: one ``torch.empty`` for ``y`` and the launch; the split-K
    workspace of up to 16 MiB is a buffer kept per stream (fresh during CUDA-graph capture; launches on
    one stream run in order, so they can share it). None where the fast launch is not available
    (Triton interpreter, ``torch.compile``, unchecked Triton versions), before :func:`small_m_matmul`
    ran this shape once (which compiles), or for an ``x`` whose rows are not at one stride.
    """
    K = x.shape[-1]
    lead = x.shape[:-1]
    M, N = x.numel() // max(K, 1), t.shape[0]
    if (x.dim() < 2 or x.stride(-1) != 1 or M == 0 or torch.cuda.is_current_stream_capturing()
            or (rank_b is not None and (rank_b.dim() != 2 or rank_b.shape[0] != N or rank_b.stride(-1) != 1))):
        return None
    row = x.stride(-2)
    for i in range(x.dim() - 2):  # all leading dims must collapse onto one row stride
        if x.shape[i] != 1 and x.stride(i) != x.stride(i + 1) * x.shape[i + 1]:
            return None
    plan = _PLANS.get(_plan_key(M, N, K, x, t, bias, (None,) * 7, None if rank_b is None else rank_b.shape[1]))
    if plan is None:
        return None
    which, grid, split, scalars, meta = plan
    if not _x_aligned(which, x, meta, row):
        return None
    device, dtype, out_shape = x.device, x.dtype, (*lead, N)
    state = _state_args(t)
    y0 = torch.empty(out_shape, device=device, dtype=dtype)
    pooled = None
    if split > 1:
        cnt = _arrival_counters(device, grid[0])
        if split * M * N <= _WS_MAX:
            pooled = _workspace(device, split * M * N)
        ws0 = pooled if pooled is not None else torch.empty(split * M * N, device=device, dtype=torch.float32)
    else:
        cnt = ws0 = y0
    rank0 = None if rank_b is None else (torch.empty(M, rank_b.shape[1], device=device, dtype=dtype), rank_b)
    go = bind(_KERNELS[which], grid, _kernel_args(which, x, state, y0, ws0, cnt, bias, M, row, scalars, rank0),
              meta)
    if go is None:
        return None
    # the arguments as go takes them: pointers, those of the weight's tensors and of the kept counters and workspace
    # once here (the tensors are held by run.keep below: a kept workspace outgrown by a larger call is replaced in
    # _WS, and this runner's must stay allocated)
    state_ptrs, rest = pointers(state), _scalar_args(which, M, row, scalars)
    cnt_ptr = None if split == 1 else cnt.data_ptr()
    ws_ptr = None if pooled is None else pooled.data_ptr()
    stream = torch._C._cuda_getCurrentRawStream(device.index)
    capturing = torch.cuda.is_current_stream_capturing
    rank_tail = () if rank_b is None else (rank_b.data_ptr(), rank_b.shape[1], rank_b.stride(0))
    empty = torch.empty
    f32 = torch.float32

    def run(xx: torch.Tensor, b: torch.Tensor | None, xa: torch.Tensor | None = None) -> torch.Tensor:
        y = xx.new_empty(out_shape)  # x's dtype and device (the key's), fewer arguments to parse than torch.empty
        yp = y.data_ptr()
        if split == 1:  # no workspace and no counters: the kernel is given y in their places
            ws = cnt_ = yp
        else:
            ws, cnt_ = ws_ptr, cnt_ptr
            if ws is None or capturing():
                wt = empty(split * M * N, device=device, dtype=f32)  # alive until the launch is enqueued
                ws = wt.data_ptr()
        go(stream, (xx.data_ptr(), *state_ptrs, yp, ws, cnt_, yp if b is None else b.data_ptr(), *rest,
                    *((yp, yp, 0, 0) if xa is None else (xa.data_ptr(), *rank_tail))))
        return y

    run.keep = (state, cnt, pooled, rank_b)
    return run


_WS_MAX = 1 << 22  # fp32 elements (16 MiB) of split-K workspace kept per stream
_WS: dict = {}


def _workspace(device: torch.device, numel: int, name: str = "") -> torch.Tensor | None:
    """A view of ``numel`` fp32 elements of this stream's kept workspace ``name`` (grown to the largest asked: one
    per kind of kernel that may run alongside another on the stream, the decode down kernel's apart); None while
    capturing a CUDA graph (the caller then allocates in the graph's pool)."""
    if torch.cuda.is_current_stream_capturing():
        return None
    key = (device.index, torch._C._cuda_getCurrentRawStream(device.index), name)
    buf = _WS.get(key)
    if buf is None or buf.numel() < numel:
        buf = _WS[key] = keep(lambda: torch.empty(numel, device=device, dtype=torch.float32), device)
    return buf[:numel]


MAX_M = 64
_PLANS: dict = {}
_KERNELS = ({"gemv": _gemv_kernel, "dot": _dot_kernel, "late": _late_kernel, "swap": _swap_kernel,
             "swap_early": _swap_kernel, "swap_flat": _flat_kernel} if triton is not None else {})
KERNEL_NAMES = ("gemv", "dot", *ALTERNATIVES)  # the base kernels and the ones a device table may name instead


# Where the in-register lookup takes its table as register operands (_decode4_asm(None), nf4_table) instead of
# immediates: "auto" (the rule below), "1" everywhere, "0" nowhere -- for A/B timing on a GPU.
TABLE_REGS = env_switch("ALIGNLAB_NF4_TABLE_REGS", "auto", choices=("auto",))
TABLE_REGS = TABLE_REGS if isinstance(TABLE_REGS, str) else str(int(TABLE_REGS))  # "auto", "0" or "1"
# The swapped kernels read 16-bit x as 32-bit pairs (``X_WORDS`` of _swap_kernel); "0" reads the halves one by one
# (A/B timing).
X_WORDS = env_switch("ALIGNLAB_NF4_X_WORDS", True)
# The swapped kernels (at 4 warps or more: wgmma) look the levels up where the bytes were loaded and hand the 16-bit
# levels to the tensor cores' layout (``_pin``), instead of letting Triton move that layout change onto the packed
# bytes: "1" on, "0" off, "auto" (default) the rule of _lookup_first. Offline SASS at the H100 table's
# configurations: up to 25% fewer loop instructions with the register codebook it brings; timed on an H100
# (benchmarks/RESULTS.md, issue 24 tenth pass): mixed (0.78-1.25x the time) but for `swap` at M = 33..64.
LOOKUP_FIRST = env_switch("ALIGNLAB_NF4_LOOKUP_FIRST", "auto", choices=("auto",))
# A product with a rank-r term in its epilogue launched as a programmatic dependent of the kernel before it (the
# decode down kernel that writes xa, which lets it start at once: lora_decode): the K loop runs alongside that kernel
# and only the rank term waits for it (grid_wait). Hopper and later (launch.dependent_launch); read when a launch plan
# is made (a layer's kept launchers keep the setting they were built with). H100, 2026-12-07
# (benchmarks/qlora_decode.py, RESULTS.md): a QLoRA decode call 2.7-8.6 us less GPU time at 1-64 rows (15.3 -> 12.4
# at 4096², one row; 11.7 -> 8.8 at 4096 -> 1024), the same output bits, host time unchanged. On by default;
# ALIGNLAB_LORA_RANK_OVERLAP=0 (read at import) or this attribute set to False: the two launches in order
RANK_OVERLAP = env_switch("ALIGNLAB_LORA_RANK_OVERLAP", True)
# The flat swapped kernel (``swap_flat``, _flat_kernel) loads the next step's packed bytes and block scales before it
# computes the current step ("1"), or each step's where it uses them ("0", the default). H100, 2026-12-07
# (benchmarks/nf4_knob_ab.py --knob PREFETCH --kernel swap_flat --ms 64, the table's tiles; RESULTS.md): loading
# ahead took 0.96x the time at 14336 x 4096 and 1.01-1.19x at the other four shapes. Read when a plan is made.
PREFETCH = env_switch("ALIGNLAB_NF4_PREFETCH", False)
# The flat swapped kernel joins the high and low levels into the weight's column order and reads x as stored, one
# tl.dot per step ("1"), or multiplies the even and odd halves of x apart, x read as 32-bit pairs ("0", the default).
# H100, 2026-12-07 (benchmarks/nf4_knob_ab.py --knob INTERLEAVE --kernel swap_flat --ms 32,64; RESULTS.md): mixed,
# 0.92x the time at 14336 x 4096 and 64 rows, up to 1.05x elsewhere. Read when a plan is made.
INTERLEAVE = env_switch("ALIGNLAB_NF4_INTERLEAVE", False)


def rank_overlap(device: torch.device) -> bool:
    """Whether a decode down kernel and the NF4 product after it on ``device`` run alongside (:data:`RANK_OVERLAP` and
    a GPU that takes dependent launches); asked by both kernels' launch plans."""
    return bool(RANK_OVERLAP) and device.type == "cuda" and dependent_launch(device.index)


def _lookup_first(kernel: str, M: int, num_warps: int | None) -> bool:
    """Whether a swapped kernel's plan looks up before the layout change (:data:`LOOKUP_FIRST`): only at 4 warps or
    more (with 2, Triton emits mma.sync, where the early lookup compiled to 18-24% more instructions). The "auto"
    rule, from ``benchmarks/nf4_knob_ab.py --knob LOOKUP_FIRST`` on an H100 (2026-12-05, 4 warps, five shapes): on for
    ``swap`` above 32 rows at 4 warps, as timed (0.78-0.95x the time, geometric mean 0.89x); off elsewhere (``swap``
    at M = 2 / 16 / 32: 0.96 / 1.03 / 1.03x; ``swap_early``: 1.07 / 1.02 / 1.10 / 1.00x at M = 2 / 16 / 32 / 64;
    8 warps: not timed)."""
    if (num_warps or 0) < 4:
        return False
    if LOOKUP_FIRST == "auto":
        return kernel == "swap" and M > 32 and num_warps == 4
    return bool(LOOKUP_FIRST)


def _table_in_registers(kernel: str, block_m: int, num_stages: int | None, lookup_first: bool = False) -> bool:
    """The rule of :data:`TABLE_REGS` ``"auto"``: the codebook in registers for the GEMV only. Timed on an H100
    (``benchmarks/nf4_knob_ab.py --knob TABLE_REGS``, 2026-12-05, CUDA graphs): at ``M = 1`` registers changed the GEMV by -5% to
    +3% over the five benchmark shapes (faster at 4096 x 14336 and 8192 x 8192); at ``M = 2..16`` the
    ``tl.dot`` kernels took 1-11% longer with them (most at ``N >= 14336``), so those keep PTX immediates.
    Offline SASS for sm_90 had predicted 9-14% fewer loop instructions for both; not yet timed on an H200.
    Where ``lookup_first`` (:data:`LOOKUP_FIRST` on a swapped kernel's plan) the lookup runs where the bytes were
    loaded, as in the GEMV, and takes the registers too (offline SASS, not yet timed)."""
    if TABLE_REGS in ("0", "1"):
        return TABLE_REGS == "1"
    return kernel == "gemv" or lookup_first


def _plan(M, N, K, dtype, device, t: NF4Tensor, has_bias: bool, kernel, block_n, nb, split, num_warps, num_stages,
          asm, rank: int | None = None):
    """Kernel, grid, K split, scalar arguments and meta-parameters of one call shape (computed once per shape);
    ``rank``: that of a rank-r term in the epilogue (:func:`_rank_term`; the same configuration as without)."""
    cfg = None
    if kernel is None:
        if interpreting():
            kernel = "gemv" if M == 1 else "dot"
        else:  # this GPU's measured choice (late-scaling kernel or tl.dot) and configuration
            kernel, cfg = small_choice(M, N, K, t.blocksize, dtype, device)
    if kernel not in KERNEL_NAMES:
        raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNEL_NAMES))}, got {kernel!r}")
    if kernel == "gemv" and M != 1:
        raise ValueError(f"kernel='gemv' takes one row of x, got {M}")
    if not 1 <= M <= MAX_M:
        raise ValueError(f"x2 must have 1..{MAX_M} rows, got {M}")
    _check_launch(t, K, block_n, nb, split, num_warps, num_stages)
    if asm is not None and not isinstance(asm, bool):
        raise TypeError(f"asm must be a bool or None, got {type(asm).__name__}")
    if asm is None:
        asm = dtype != torch.float32 and torch.version.hip is None
    if interpreting():  # small tiles keep the interpreter quick and still exercise the split and the masks
        block_n, nb, split = block_n or 16, nb or 1, split or 2
    else:
        cfg = cfg or small_config(kernel, M, N, K, t.blocksize, dtype, device)
        block_n, nb = block_n or cfg[0], nb or cfg[1]
        split, num_warps, num_stages = split or cfg[2], num_warps or cfg[3], num_stages or cfg[4]
    # NumPy ints pass _check_launch; Triton takes Python ints only (block_n, nb as constexprs, split in the grid)
    block_n, nb, split = int(block_n), int(nb), int(split)
    num_warps, num_stages = (None if v is None else int(v) for v in (num_warps, num_stages))
    # `split` slices of whole NB-block steps.  The slice length goes in as an argument, not computed in
    # the kernel: Triton then knows it is a multiple of 16 (likely why computing it in the
    # kernel measured 10-20% slower for the tl.dot kernel on an H100).
    step = nb * t.blocksize
    per = cdiv(cdiv(K, step), split) * step
    split = cdiv(K, per)
    meta = dict(BLOCKSIZE=t.blocksize, NESTED_BS=t.nested_blocksize, DOUBLE=t.double_quant,
                HAS_SHIFT=t.shift is not None, SPLIT=split > 1, HAS_BIAS=has_bias, HAS_RANK=rank is not None,
                BLOCK_R=max(16, next_power_of_2(rank or 1)), BLOCK_N=block_n, NB=nb,
                ASM=bool(asm) and not interpreting())
    if kernel != "gemv":  # the interpreter's tl.dot is wrong for bf16 (Triton 3.6): fp32 there
        meta.update(IEEE=dtype == torch.float32 or interpreting(), BLOCK_M=max(16, m_bucket(M)))
    if kernel.startswith("swap"):  # x as 32-bit pairs for 16-bit x (the caller aligns x: _x_aligned); the lookup
        # before the layout change where the dot is a wgmma (warpgroups of 4 warps; with 2, mma.sync: more work)
        meta.update(X_WORDS=dtype != torch.float32 and X_WORDS)
        if kernel == "swap_flat":
            meta.update(PREFETCH=bool(PREFETCH), INTERLEAVE=bool(INTERLEAVE))
        else:
            meta.update(EARLY=kernel == "swap_early", LOOKUP_FIRST=_lookup_first(kernel, M, num_warps))
    meta.update(REGS=meta["ASM"] and _table_in_registers(kernel, meta.get("BLOCK_M", 1), num_stages,
                                                         meta.get("LOOKUP_FIRST", False)))
    pdl = rank is not None and rank_overlap(device)
    meta.update(PDL=pdl)
    if pdl:
        meta.update(launch_pdl=True)
    if not interpreting():
        meta.update(num_warps=num_warps, num_stages=num_stages)
    return kernel, (cdiv(N, block_n), split), split, (N, K, K // 2, per, split), meta

