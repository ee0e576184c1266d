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

Both split K over a second grid axis (the output rows alone give too few
programs to keep the memory system busy); partial sums then meet in an fp32
buffer through atomic adds.

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

import torch

from alignlab.kernels.dispatch import interpreting
from alignlab.quant.nf4 import NF4Tensor, dynamic_map, nf4_code

try:
    import triton
    import triton.language as tl

    from alignlab.kernels.nf4_dequant import nf4_block_scale
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None

__all__ = ["small_m_matmul"]


def _decode4_asm() -> str:
    """PTX for ``tl.inline_asm_elementwise(..., pack=4)`` on packed bytes: 4 bytes -> 4 high and 4 low levels.

    ``$4`` holds four bytes; ``$0, $1`` get the fp16 levels of their high nibbles
    (as two fp16 pairs, byte order kept), ``$2, $3`` those of the low nibbles.
    The codebook lives in eight registers as two byte planes (low and high bytes
    of the fp16 levels); ``prmt`` looks up four codes per instruction in an
    8-entry half, a third ``prmt`` picks the half by each code's top bit, and a
    last one pairs the two bytes of each level.  No memory access.
    """
    bits = [b & 0xFFFF for b in nf4_code(torch.device("cpu")).to(torch.float16).view(torch.int16).tolist()]
    lo = [b & 0xFF for b in bits]
    hi = [b >> 8 for b in bits]

    def word(bs, i):
        return bs[4 * i] | bs[4 * i + 1] << 8 | bs[4 * i + 2] << 16 | bs[4 * i + 3] << 24

    out = ["{", ".reg .b32 s, m, s2, m2, t0, t1, pl0, pl1, ph0, ph1, L0, L1, L2, L3, H0, H1, H2, H3;"]
    out += [f"mov.b32 L{i}, {word(lo, i)};\nmov.b32 H{i}, {word(hi, i)};" for i in range(4)]
    out += [
        "and.b32 s, $4, 2004318071;", "and.b32 m, $4, -2004318072;", "shr.u32 m, m, 1;", "or.b32 m, m, 839922192;",
        "shr.u32 s2, s, 16;", "shr.u32 m2, m, 16;",
        "prmt.b32 t0, L0, L1, s;\nprmt.b32 t1, L2, L3, s;\nprmt.b32 pl0, t0, t1, m;",
        "prmt.b32 t0, H0, H1, s;\nprmt.b32 t1, H2, H3, s;\nprmt.b32 ph0, t0, t1, m;",
        "prmt.b32 t0, L0, L1, s2;\nprmt.b32 t1, L2, L3, s2;\nprmt.b32 pl1, t0, t1, m2;",
        "prmt.b32 t0, H0, H1, s2;\nprmt.b32 t1, H2, H3, s2;\nprmt.b32 ph1, t0, t1, m2;",
        # pl0 / ph0 bytes: codes of (b0 lo, b0 hi, b1 lo, b1 hi); pl1 / ph1 the same for bytes 2, 3
        "prmt.b32 $0, pl0, ph0, 29521;",   # 0x7351: (b0 hi, b1 hi)
        "prmt.b32 $1, pl1, ph1, 29521;",   # (b2 hi, b3 hi)
        "prmt.b32 $2, pl0, ph0, 25152;",   # 0x6240: (b0 lo, b1 lo)
        "prmt.b32 $3, pl1, ph1, 25152;",   # (b2 lo, b3 lo)
        "}",
    ]
    return "\n".join(out)


if triton is not None:
    _ASM_DECODE4 = tl.constexpr(_decode4_asm())

    @triton.jit
    def nf4_levels(byte, code_ptr, ASM: tl.constexpr):
        """fp32 NF4 levels of the high and low nibbles of a uint8 tensor (in-register table when ``ASM``)."""
        if ASM:
            hi, lo = tl.inline_asm_elementwise(_ASM_DECODE4, "=r,=r,=r,=r,r", [byte],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
            return hi.to(tl.float32), lo.to(tl.float32)
        else:
            b = byte.to(tl.int32)
            return tl.load(code_ptr + (b >> 4)), tl.load(code_ptr + (b & 15))

    @triton.jit
    def _gemv_kernel(
        x_ptr, data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr, y_ptr,
        N, K, half_k, k_per_split,
        BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, ASM: tl.constexpr,
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
        rt = tl.arange(0, 2)
        nb_row = K // BLOCKSIZE
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        acc = tl.zeros((BLOCK_N, NB, HB), dtype=tl.float32)
        for k0 in range(k_start, k_end, NB * BLOCKSIZE):
            bmask = k0 + rb * BLOCKSIZE < k_end
            m2 = nmask[:, None] & bmask[None, :]
            m3 = m2[:, :, None]
            off = rows[:, None, None] * half_k + (k0 // 2 + rb * HB)[None, :, None] + rj[None, None, :]
            byte = tl.load(data_ptr + off, mask=m3, other=0)
            hi, lo = nf4_levels(byte, code_ptr, ASM)
            bidx = rows[:, None] * nb_row + (k0 // BLOCKSIZE + rb)[None, :]
            s = nf4_block_scale(absmax_ptr, nested_ptr, offset_ptr, code2_ptr, bidx, m2, DOUBLE, NESTED_BS)
            xoff = k0 + rb[:, None, None] * BLOCKSIZE + 2 * rj[None, :, None] + rt[None, None, :]
            xv = tl.load(x_ptr + xoff, mask=bmask[:, None, None], other=0.0).to(tl.float32)
            xe, xo = tl.split(xv)
            acc += (hi * xe[None, :, :] + lo * xo[None, :, :]) * s[:, :, None]
            if HAS_SHIFT:
                tau = tl.load(shift_ptr + bidx, mask=m2, other=0.0)
                acc += tau[:, :, None] * (xe + xo)[None, :, :]
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
        if ATOMIC:
            tl.atomic_add(y_ptr + rn, y, mask=nmask)
        else:
            tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)

    @triton.jit
    def _dot_kernel(
        x_ptr, data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr, y_ptr,
        M, N, K, half_k, stride_xm, stride_ym, k_per_split,
        BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        IEEE: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        NB: tl.constexpr, ASM: tl.constexpr,
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
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_end, NB * BLOCKSIZE):
            bmask = k0 + rb * BLOCKSIZE < k_end
            m2 = nmask[:, None] & bmask[None, :]
            off = rows[:, None, None] * half_k + (k0 // 2 + rb * HB)[None, :, None] + rj[None, None, :]
            byte = tl.load(data_ptr + off, mask=m2[:, :, None], other=0)
            bidx = rows[:, None] * nb_row + (k0 // BLOCKSIZE + rb)[None, :]
            s = nf4_block_scale(absmax_ptr, nested_ptr, offset_ptr, code2_ptr, bidx, m2, DOUBLE, NESTED_BS)
            hi, lo = nf4_levels(byte, code_ptr, ASM)
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
        dst = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
        omask = mmask[:, None] & nmask[None, :]
        if ATOMIC:
            tl.atomic_add(dst, acc, mask=omask)
        else:
            tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=omask)


def _state_args(t: NF4Tensor):
    dev, dummy = t.device, t.data
    return (
        t.data, t.absmax,
        t.nested_absmax if t.double_quant else dummy,
        t.nested_offset if t.double_quant else dummy,
        t.shift if t.shift is not None else dummy,
        nf4_code(dev), dynamic_map(dev),
    )


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
    asm: bool | None = None,
) -> torch.Tensor:
    """``x2 @ W^T (+ bias)`` for ``x2`` of shape ``(M, K)`` with ``1 <= M <= 16``.

    Args:
        x2: ``(M, K)`` activations with a contiguous last dimension.
        t: the NF4 weight, logical shape ``(N, K)``, ``K % t.blocksize == 0`` and
            ``t.blocksize <= 256`` (the caller,
            :func:`alignlab.kernels.nf4_matmul.nf4_matmul`, checks both).
        bias: optional ``(N,)``, added in fp32 before the cast to ``x2.dtype``.
        kernel: ``"gemv"`` (``M == 1`` only) or ``"dot"``; default by ``M``.
        block_n, nb, split, num_warps: launch configuration (rows per program,
            quantization blocks per step, K slices, warps).  Defaults, the best
            measured on an H100 (``benchmarks/nf4.py``): 64 rows x 2 blocks for
            ``"gemv"``; for ``"dot"`` 128 rows x 1 block when ``N > 4096``, else
            64 x 2 (``M <= 4``) or 128 x 2 with 8 warps; K split 8 ways.
        asm: in-register codebook; default on for 16-bit ``x`` on NVIDIA GPUs.

    Returns:
        ``(M, N)`` in ``x2.dtype``.
    """
    M, K = x2.shape
    N = t.shape[0]
    kernel = kernel or ("gemv" if M == 1 else "dot")
    if kernel not in ("gemv", "dot"):
        raise ValueError(f"kernel must be 'gemv' or 'dot', got {kernel!r}")
    if kernel == "gemv" and M != 1:
        raise ValueError(f"kernel='gemv' takes one row of x, got {M}")
    if not 1 <= M <= 16:
        raise ValueError(f"x2 must have 1..16 rows, got {M}")
    if asm is None:
        asm = x2.dtype != torch.float32 and torch.version.hip is None
    if interpreting():  # small tiles keep the interpreter quick and still exercise the split and the masks
        block_n, nb, split = block_n or 16, nb or 1, split or 2
    else:
        # Best configs of an H100 sweep (benchmarks/RESULTS.md): with few output rows (N <= 4096) the
        # tl.dot kernel wants two blocks per step (up to 13% faster there, no gain for larger N).
        if kernel == "gemv":
            cfg = (64, 2, 4)
        elif N > 4096 or t.blocksize > 64 or x2.dtype == torch.float32:
            cfg = (128, 1, 4)
        else:
            cfg = (64, 2, 4) if M <= 4 else (128, 2, 8)
        block_n, nb = block_n or cfg[0], nb or cfg[1]
        num_warps = num_warps or cfg[2]
        split = split or 8
    # `split` slices of whole NB-block steps.  The slice length goes in as an argument, not computed in
    # the kernel: Triton then knows it is a multiple of 16 (likely why computing it in the
    # kernel measured 10-20% slower for the tl.dot kernel on an H100).
    step = nb * t.blocksize
    per = triton.cdiv(triton.cdiv(K, step), split) * step
    split = triton.cdiv(K, per)
    atomic = split > 1
    y = (torch.zeros if atomic else torch.empty)(M, N, device=x2.device,
                                                 dtype=torch.float32 if atomic else x2.dtype)
    meta = dict(BLOCKSIZE=t.blocksize, NESTED_BS=t.nested_blocksize, DOUBLE=t.double_quant,
                HAS_SHIFT=t.shift is not None, ASM=bool(asm) and not interpreting())
    meta.update(BLOCK_N=block_n, NB=nb, ATOMIC=atomic)
    if not interpreting():
        meta.update(num_warps=num_warps, num_stages=1)
    grid = (triton.cdiv(N, block_n), split)
    if kernel == "gemv":
        _gemv_kernel[grid](x2, *_state_args(t), y, N, K, K // 2, per, **meta)
    else:
        _dot_kernel[grid](x2, *_state_args(t), y, M, N, K, K // 2, x2.stride(0), y.stride(0), per,
                          IEEE=x2.dtype == torch.float32, BLOCK_M=16, **meta)
    if bias is not None:
        y = y.add_(bias.float()) if atomic else y.float() + bias.float()
    return y if y.dtype == x2.dtype else y.to(x2.dtype)
