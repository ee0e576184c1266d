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

import torch

from alignlab.kernels.dispatch import interpreting, use_triton
from alignlab.kernels.launch import launch
from alignlab.quant.nf4 import NF4Tensor, SUPPORTED_DTYPES, dynamic_map, nf4_code, nf4_dequantize

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None

__all__ = ["nf4_dequant"]


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
