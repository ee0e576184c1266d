"""Triton kernel: packed NF4 (+ double-quantized scales) -> bf16 / fp16 / fp32.

Computes, for every flat index ``i`` of the weight,

    w_i = q[c_i] * s_{i // blocksize} (+ tau_{i // blocksize}),
    s_b = d[a_b] * t_{b // 256} + mu          (double quantization),

with ``q`` the NF4 codebook and ``d`` the 8-bit dynamic map (see
:mod:`alignlab.quant.nf4`, whose :func:`~alignlab.quant.nf4.nf4_dequantize` is
the reference).  One program reads ``BLOCK`` packed bytes and writes ``2 * BLOCK``
values; scales are gathered per byte (both nibbles of a byte share a block
because blocksizes are even), so the kernel is one pass: read 0.5 byte + the
scale share per value, write one value.
"""

from __future__ import annotations

import os

import torch

from alignlab.kernels.dispatch import interpreting, use_triton
from alignlab.kernels.launch import launch
from alignlab.quant.nf4 import NF4Tensor, SUPPORTED_DTYPES, dynamic_map, nf4_code, nf4_dequantize

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None

__all__ = ["nf4_dequant", "nf4_dequant_lora", "lora_merge_supported"]

# rank cap of the merged LoRA dequantization (r fp32 updates per element on the CUDA cores); above it callers
# take the unmerged path (base GEMM + the adapter term in a second GEMM's epilogue)
MAX_MERGE_RANK = 32


if triton is not None:

    @triton.jit
    def nf4_block_scale(absmax_ptr, nested_ptr, offset_ptr, code2_ptr, bidx, mask, DOUBLE: tl.constexpr,
                        NESTED_BS: tl.constexpr):
        """fp32 scale of the NF4 blocks ``bidx`` (undoing double quantization when ``DOUBLE``)."""
        if DOUBLE:
            a = tl.load(absmax_ptr + bidx, mask=mask, other=0).to(tl.int32)
            t = tl.load(nested_ptr + bidx // NESTED_BS, mask=mask, other=0.0).to(tl.float32)
            mu = tl.load(offset_ptr).to(tl.float32)
            s = tl.load(code2_ptr + a, mask=mask, other=0.0).to(tl.float32) * t + mu
        else:
            s = tl.load(absmax_ptr + bidx, mask=mask, other=0.0).to(tl.float32)
        return s

    @triton.jit
    def nf4_decode(byte, bidx, mask, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr,
                   DOUBLE: tl.constexpr, NESTED_BS: tl.constexpr, HAS_SHIFT: tl.constexpr):
        """fp32 weights of the high and low nibbles of int32 ``byte`` (blocks ``bidx``): level x scale (+ tau)."""
        s = nf4_block_scale(absmax_ptr, nested_ptr, offset_ptr, code2_ptr, bidx, mask, DOUBLE, NESTED_BS)
        hi = tl.load(code_ptr + (byte >> 4)) * s
        lo = tl.load(code_ptr + (byte & 15)) * s
        if HAS_SHIFT:
            tau = tl.load(shift_ptr + bidx, mask=mask, other=0.0)
            hi += tau
            lo += tau
        return hi, lo

    @triton.jit
    def _nf4_dequant_kernel(
        data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr, row_scale_ptr, out_ptr,
        n_elements, n_bytes, n_cols,
        BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        ROW_SCALE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_bytes
        byte = tl.load(data_ptr + offs, mask=mask, other=0).to(tl.int32)
        bidx = (offs * 2) // BLOCKSIZE
        hi, lo = nf4_decode(byte, bidx, mask, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr,
                            DOUBLE, NESTED_BS, HAS_SHIFT)
        if ROW_SCALE:  # the two values of a byte sit in different rows when n_cols is odd
            hi *= tl.load(row_scale_ptr + (offs * 2) // n_cols, mask=(offs * 2) < n_elements, other=0.0)
            lo *= tl.load(row_scale_ptr + (offs * 2 + 1) // n_cols, mask=(offs * 2 + 1) < n_elements, other=0.0)
        vals = tl.join(hi, lo).reshape(2 * BLOCK)
        out_offs = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + out_offs, vals.to(out_ptr.dtype.element_ty), mask=out_offs < n_elements)


    @triton.jit
    def _nf4_dequant_lora_kernel(
        data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr, a_ptr, b_ptr,
        row_scale_ptr, out_ptr, n_rows, n_cols, rank, scale,
        BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        ROW_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, HALF_K: tl.constexpr,
    ):
        """One ``(BLOCK_N, 2 HALF_K)`` tile of ``row_scale ⊙ W + s·B A``: the packed bytes decoded in registers
        (high nibbles = even columns, low = odd), the rank-``r`` product added as ``r`` fp32 outer-product
        updates on the CUDA cores in the decode's own layout (a tensor-core ``tl.dot`` here needs a layout
        conversion of the whole tile, measured 3x slower than the plain dequantization), one rounding at the
        store. ``n_cols`` is even, so no byte straddles two rows."""
        pid_n = tl.program_id(0).to(tl.int64)
        pid_k = tl.program_id(1).to(tl.int64)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        half_cols = n_cols // 2
        bcols = pid_k * HALF_K + tl.arange(0, HALF_K)
        rmask = rows < n_rows
        cmask = bcols < half_cols
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * half_cols + bcols[None, :]
        byte = tl.load(data_ptr + offs, mask=mask, other=0).to(tl.int32)
        hi, lo = nf4_decode(byte, (offs * 2) // BLOCKSIZE, mask, absmax_ptr, nested_ptr, offset_ptr, shift_ptr,
                            code_ptr, code2_ptr, DOUBLE, NESTED_BS, HAS_SHIFT)
        if ROW_SCALE:
            rs = tl.load(row_scale_ptr + rows, mask=rmask, other=0.0)[:, None]
            hi *= rs
            lo *= rs
        for k in range(rank):
            bk = tl.load(b_ptr + rows * rank + k, mask=rmask, other=0.0).to(tl.float32) * scale
            ae = tl.load(a_ptr + k * n_cols + 2 * bcols, mask=cmask, other=0.0).to(tl.float32)
            ao = tl.load(a_ptr + k * n_cols + 2 * bcols + 1, mask=cmask, other=0.0).to(tl.float32)
            hi += bk[:, None] * ae[None, :]
            lo += bk[:, None] * ao[None, :]
        w = tl.join(hi, lo).reshape(BLOCK_N, 2 * HALF_K)
        cols = pid_k * (2 * HALF_K) + tl.arange(0, 2 * HALF_K)
        tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (cols < n_cols)[None, :])


def _state_args(t: NF4Tensor) -> tuple:
    """The seven pointer arguments every NF4 kernel takes (packed codes, scales, double-quant state,
    ICQ shift, the two code tables; unused ones replaced by ``t.data``), kept on ``t`` while its fields
    are the same objects."""
    if torch.compiler.is_compiling():  # traced code: no side effects on Python objects
        return _pointer_args(t)
    c = t.__dict__.get("_kernel_args")
    if (c is not None and c[0] is t.data and c[1] is t.absmax and c[2] is t.nested_absmax
            and c[3] is t.nested_offset and c[4] is t.shift and c[5] == t.double_quant):
        return c[6]
    args = _pointer_args(t)
    t.__dict__["_kernel_args"] = (t.data, t.absmax, t.nested_absmax, t.nested_offset, t.shift, t.double_quant, args)
    return args


def _pointer_args(t: NF4Tensor) -> tuple:
    dev, dummy = t.data.device, t.data
    return (
        t.data, t.absmax,
        t.nested_absmax if t.double_quant else dummy,
        t.nested_offset if t.double_quant else dummy,
        t.shift if t.shift is not None else dummy,
        nf4_code(dev), dynamic_map(dev),
    )


def _launch_dequant(t: NF4Tensor, dtype: torch.dtype, row_scale: torch.Tensor | None) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=dtype, device=t.data.device)
    block = 256 if interpreting() else 1024
    packed = t.data.numel()
    launch(_nf4_dequant_kernel, (triton.cdiv(packed, block),),
           (*_state_args(t), row_scale if row_scale is not None else t.data, out, t.numel, packed, t.shape[-1]),
           dict(BLOCKSIZE=t.blocksize, NESTED_BS=t.nested_blocksize, DOUBLE=t.double_quant,
                HAS_SHIFT=t.shift is not None, ROW_SCALE=row_scale is not None, BLOCK=block, num_warps=4))
    return out


def nf4_dequant(t: NF4Tensor, dtype: torch.dtype | None = None, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize an :class:`~alignlab.quant.nf4.NF4Tensor` to ``dtype`` (default: its original dtype).

    With ``row_scale`` (fp32, ``(out_features,)``, for a 2-D weight) row ``i`` comes out
    multiplied by ``row_scale[i]`` in fp32 before the one rounding to ``dtype``: DoRA's
    backward folds its magnitude scaling into the weight this way, at no extra pass.

    Runs the Triton kernel when :func:`~alignlab.kernels.dispatch.use_triton` allows,
    else :func:`~alignlab.quant.nf4.nf4_dequantize`; both return identical values.

    Raises:
        TypeError: ``dtype`` is not fp32 / fp16 / bf16, or ``row_scale`` is not fp32.
        ValueError: ``row_scale`` is not ``(out_features,)`` for a 2-D weight.
    """
    dtype = dtype or t.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    if row_scale is not None:
        if len(t.shape) != 2 or tuple(row_scale.shape) != (t.shape[0],):
            raise ValueError(f"row_scale must have shape ({t.shape[0]},) for a 2-D weight of shape {tuple(t.shape)}, "
                             f"got {tuple(row_scale.shape)}")
        if row_scale.dtype != torch.float32:
            raise TypeError(f"row_scale must be float32, got {row_scale.dtype}")
    if triton is not None and use_triton(t.data):
        return _launch_dequant(t, dtype, None if row_scale is None else row_scale.contiguous())
    if row_scale is None:
        return nf4_dequantize(t, dtype)
    return (nf4_dequantize(t, torch.float32) * row_scale[:, None]).to(dtype)


def lora_merge_supported(t: NF4Tensor, a: torch.Tensor) -> bool:
    """Whether :func:`nf4_dequant_lora` runs its Triton kernel for this weight and ``A`` (``(r, in)``): a 2-D
    weight with an even number of columns, rank at most ``MAX_MERGE_RANK``, tensors where Triton runs."""
    return (triton is not None and len(t.shape) == 2 and t.shape[1] % 2 == 0 and 0 < a.shape[0] <= MAX_MERGE_RANK
            and use_triton(t.data, a))


# (BLOCK_N, HALF_K, num_warps) of the merged kernel (benchmarks/nf4_merge.py); the interpreter gets a small tile
_MERGE_TILE = tuple(int(v) for v in os.environ.get("ALIGNLAB_NF4_MERGE_TILE", "32,128,4").split(","))


def nf4_dequant_lora(t: NF4Tensor, dtype: torch.dtype, a: torch.Tensor, b: torch.Tensor, scale: float,
                     row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The merged weight ``row_scale ⊙ W + s·B A`` of an NF4 ``W`` ``(out, in)`` in ``dtype``, in one pass.

    QLoRA's and QDoRA's training steps dequantize ``W`` anyway before a cuBLAS product at more than
    a decode's rows; adding the adapter's rank-``r`` product to each tile there (fp32, rounded once
    with the weight) lets ``x (W + s·B A)ᵀ`` and ``dy (W + s·B A)`` each be one GEMM, with no extra
    pass over ``(tokens, out)`` or ``(tokens, in)`` for the adapter term (LoRA, Hu et al., arXiv
    2106.09685). DoRA (Liu et al., arXiv 2402.09353) passes ``row_scale = g = m / ‖W + s·B A‖`` and ``g ⊙ B``
    as ``b`` with ``scale`` 1, which gives its ``g ⊙ (W + s·B A)``.

    Args:
        t: the NF4 weight, 2-D ``(out, in)``. dtype: output dtype (fp32 / fp16 / bf16).
        a: ``A``, ``(r, in)``; b: ``B``, ``(out, r)``; both in ``dtype`` (the compute dtype).
        scale: ``s``. row_scale: optional fp32 ``(out,)``, applied to ``W`` only.
    Returns:
        ``(out, in)`` in ``dtype``. The Triton kernel runs where :func:`lora_merge_supported` says so,
        else the torch reference ``nf4_dequantize(W) ⊙ row_scale + s·B A`` in fp32, rounded once.
    Raises:
        ValueError: shapes of ``a``, ``b``, ``row_scale`` do not match ``W``.
        TypeError: ``a``/``b`` not in ``dtype``, or ``row_scale`` not fp32.
    """
    if len(t.shape) != 2:
        raise ValueError(f"t must be a 2-D NF4 weight, got shape {tuple(t.shape)}")
    out_f, in_f = t.shape
    if a.dim() != 2 or a.shape[1] != in_f or b.dim() != 2 or b.shape != (out_f, a.shape[0]):
        raise ValueError(f"a must be (r, {in_f}) and b ({out_f}, r) for a weight of shape {tuple(t.shape)}, "
                         f"got a {tuple(a.shape)} and b {tuple(b.shape)}")
    if a.dtype != dtype or b.dtype != dtype:
        raise TypeError(f"a and b must be in dtype {dtype}, got {a.dtype} and {b.dtype}")
    if row_scale is not None and (tuple(row_scale.shape) != (out_f,) or row_scale.dtype != torch.float32):
        raise ValueError(f"row_scale must be float32 of shape ({out_f},), got {row_scale.dtype} "
                         f"{tuple(row_scale.shape)}")
    if not lora_merge_supported(t, a):
        w = nf4_dequantize(t, torch.float32)
        w = w if row_scale is None else w * row_scale[:, None]
        return torch.addmm(w, b.float(), a.float(), alpha=scale).to(dtype)
    out = torch.empty((out_f, in_f), dtype=dtype, device=t.data.device)
    if out.numel() == 0:
        return out
    block_n, half_k, warps = (16, 16, 4) if interpreting() else _MERGE_TILE
    rank = a.shape[0]
    grid = (triton.cdiv(out_f, block_n), triton.cdiv(in_f // 2, half_k))
    launch(_nf4_dequant_lora_kernel, grid,
           (*_state_args(t), a.contiguous(), b.contiguous(), row_scale.contiguous() if row_scale is not None else t.data, out,
            out_f, in_f, rank, float(scale)),
           dict(BLOCKSIZE=t.blocksize, NESTED_BS=t.nested_blocksize, DOUBLE=t.double_quant,
                HAS_SHIFT=t.shift is not None, ROW_SCALE=row_scale is not None, BLOCK_N=block_n, HALF_K=half_k,
                num_warps=warps))
    return out
