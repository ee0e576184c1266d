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
    def _nf4_dequant_kernel(
        data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, lut_ptr, code2_ptr, out_ptr,
        n_elements, n_bytes,
        BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        PACKED16: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_bytes
        byte = tl.load(data_ptr + offs, mask=mask, other=0).to(tl.int32)
        bidx = (offs * 2) // BLOCKSIZE
        s = nf4_block_scale(absmax_ptr, nested_ptr, offset_ptr, code2_ptr, bidx, mask, DOUBLE, NESTED_BS)
        # one table load gives both levels of a byte: (bits of q[hi]) << 32 | bits of q[lo]
        pair = tl.load(lut_ptr + byte)
        hi = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True) * s
        lo = pair.to(tl.int32).to(tl.float32, bitcast=True) * s
        if HAS_SHIFT:
            tau = tl.load(shift_ptr + bidx, mask=mask, other=0.0)
            hi += tau
            lo += tau
        if PACKED16:
            # 16-bit outputs: write both values of a byte as one 32-bit word (little endian:
            # the even element in the low half), no interleaving shuffle needed
            h16 = hi.to(OUT_DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            l16 = lo.to(OUT_DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            tl.store(out_ptr + offs, h16 | (l16 << 16), mask=mask)
        else:
            vals = tl.join(hi, lo).reshape(2 * BLOCK)
            out_offs = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
            tl.store(out_ptr + out_offs, vals.to(out_ptr.dtype.element_ty), mask=out_offs < n_elements)


_PAIR_LUTS: dict = {}


def nf4_pair_lut(device: torch.device) -> torch.Tensor:
    """int64 table ``(256,)``: byte ``b`` -> ``(bits of q[b >> 4]) << 32 | (bits of q[b & 15])``."""
    device = torch.device(device)
    if device not in _PAIR_LUTS:
        bits = nf4_code(device).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        b = torch.arange(256, device=device)
        _PAIR_LUTS[device] = (bits[b >> 4] << 32) | bits[b & 15]
    return _PAIR_LUTS[device]


_TL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


_PAIR_LUTS: dict = {}


def nf4_pair_lut(device: torch.device) -> torch.Tensor:
    """int64 table ``(256,)``: byte ``b`` -> ``(bits of q[b >> 4]) << 32 | (bits of q[b & 15])``."""
    device = torch.device(device)
    if device not in _PAIR_LUTS:
        bits = nf4_code(device).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        b = torch.arange(256, device=device)
        _PAIR_LUTS[device] = (bits[b >> 4] << 32) | bits[b & 15]
    return _PAIR_LUTS[device]


def _launch_dequant(t: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    n, nbytes = t.numel, t.data.numel()
    dev = t.device
    packed = dtype != torch.float32
    # 16-bit: a whole number of 32-bit words (one spare element when numel is odd)
    buf = torch.empty(2 * nbytes if packed else n, dtype=dtype, device=dev)
    dummy = t.data
    block = 256 if interpreting() else 2048
    grid = (triton.cdiv(nbytes, block),)
    _nf4_dequant_kernel[grid](
        t.data, t.absmax,
        t.nested_absmax if t.double_quant else dummy,
        t.nested_offset if t.double_quant else dummy,
        t.shift if t.shift is not None else dummy,
        nf4_pair_lut(dev), dynamic_map(dev), buf.view(torch.int32) if packed else buf,
        n, nbytes,
        BLOCKSIZE=t.blocksize, NESTED_BS=t.nested_blocksize, DOUBLE=t.double_quant,
        HAS_SHIFT=t.shift is not None, PACKED16=packed, OUT_DTYPE=getattr(tl, _TL_DTYPES[dtype]),
        BLOCK=block, num_warps=8 if not interpreting() else 4,
    )
    return buf[:n].view(t.shape)


def nf4_dequant(t: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize an :class:`~alignlab.quant.nf4.NF4Tensor` to ``dtype`` (default: its original dtype).

    Runs the Triton kernel when :func:`~alignlab.kernels.dispatch.use_triton` allows,
    else :func:`~alignlab.quant.nf4.nf4_dequantize`; both return identical values.

    Raises:
        TypeError: ``dtype`` is not fp32 / fp16 / bf16.
    """
    dtype = dtype or t.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    if triton is not None and use_triton(t.data):
        return _launch_dequant(t, dtype)
    return nf4_dequantize(t, dtype)
