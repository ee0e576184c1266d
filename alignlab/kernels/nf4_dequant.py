"""Triton kernel: packed NF4 (+ double-quantized scales) -> bf16 / fp16 / fp32.

Computes, for every flat index ``i`` of the weight,

    w_i = q[c_i] * s_{i // blocksize} (+ tau_{i // blocksize}),
    s_b = d[a_b] * t_{b // 256} + mu          (double quantization),

with ``q`` the NF4 codebook and ``d`` the 8-bit dynamic map (see
:mod:`alignlab.quant.nf4`, whose :func:`~alignlab.quant.nf4.nf4_dequantize` is
the reference).  One program reads a tile of whole quantization blocks (2048
packed bytes on a GPU) and writes its values: one pass, reading 0.5 byte + the
scale share per value and writing one value.  Each block's scale (and, for a
row-scaled dequantization whose rows hold whole blocks, its row's factor) is
loaded once per block and broadcast, not looked up per byte: on an H200 a
per-value row lookup (a 64-bit division per value) made the row-scaled pass
3x slower than the plain one (``benchmarks/RESULTS.md``, issue 24).
"""

from __future__ import annotations

import struct

import torch

from alignlab._keep import keep
from alignlab.kernels.dispatch import interpreting, use_triton, wants_grad
from alignlab.kernels.launch import bind, cdiv, launch, pointers
from alignlab.quant.nf4 import _NF4_LEVELS, NF4Tensor, dynamic_map, nf4_code, nf4_dequantize, output_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None

__all__ = ["nf4_dequant", "dequant_runner", "code_planes", "kernel_code"]

_KERNEL_CODES: dict = {}


def code_planes(dtype: torch.dtype) -> tuple[int, ...]:
    """The NF4 codebook rounded to ``dtype`` (``torch.float16`` or ``torch.bfloat16``) as eight 32-bit words
    (signed ints): ``L0..L3`` hold the low bytes of levels ``4i..4i+3`` in byte order, ``H0..H3`` their high
    bytes. These byte planes are the table of the in-register lookup of :mod:`alignlab.kernels.nf4_small`.
    Plain Python, no tensor: this runs at import, which may happen inside a ``torch.export`` / ``torch.compile``
    trace (the first NF4 forward imports the kernels), where reading a tensor back would be data-dependent."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    bits = [_bits16(v, dtype) for v in _NF4_LEVELS]
    words = [sum(((b >> shift) & 0xFF) << 8 * j for j, b in enumerate(bits[4 * i:4 * i + 4]))
             for shift in (0, 8) for i in range(4)]
    return tuple(w - (1 << 32) if w >= 1 << 31 else w for w in words)


def _bits16(value: float, dtype: torch.dtype) -> int:
    """The bits of the float32 ``value`` rounded to nearest-even fp16 / bf16 (finite values)."""
    if dtype == torch.float16:
        return struct.unpack("<H", struct.pack("<e", value))[0]
    f32 = struct.unpack("<I", struct.pack("<f", value))[0]
    return ((f32 + 0x7FFF + ((f32 >> 16) & 1)) >> 16) & 0xFFFF


# 32 copies of the fp16 planes, then 32 of the bf16 ones
_PLANE_WORDS = code_planes(torch.float16) * 32 + code_planes(torch.bfloat16) * 32


def kernel_code(device: torch.device) -> torch.Tensor:
    """The code table every NF4 kernel takes as ``code_ptr``: 528 float32 words, the 16 fp32 levels (what the
    gathering kernels read), then 32 copies of :func:`code_planes` of fp16 and 32 of bf16 (int32 bit patterns),
    which the in-register lookup loads once per program, each row from its own copy
    (:func:`alignlab.kernels.nf4_small.nf4_table` says why). Kept per device."""
    device = torch.device(device)
    table = _KERNEL_CODES.get(device)
    if table is None:
        planes = torch.tensor(_PLANE_WORDS, dtype=torch.int32)

        def make() -> torch.Tensor:
            return torch.cat([nf4_code(device), planes.view(torch.float32).to(device)])

        if torch.compiler.is_compiling():  # traced: no worker thread, nothing kept (note_device keeps it eagerly)
            return make()
        table = _KERNEL_CODES[device] = keep(make, device)
    return table


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
        n_elements, n_bytes, n_cols, out_stride,
        BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        ROW_SCALE: tl.constexpr, BLOCK_ROWS: tl.constexpr, NBLK: tl.constexpr, STRIDED: tl.constexpr,
    ):
        """One ``(NBLK, BLOCKSIZE / 2)`` tile of packed bytes: NBLK whole quantization blocks, so each block's
        scale is loaded once and broadcast. ``BLOCK_ROWS``: every block lies in one row (``n_cols`` a multiple
        of ``BLOCKSIZE``), so the row scale is looked up per block too; else per value. ``STRIDED`` (only with
        blocks in one row): output rows start ``out_stride`` elements apart (a view of a wider buffer), the row of
        each block found once per block."""
        HB: tl.constexpr = BLOCKSIZE // 2
        rb = tl.program_id(0).to(tl.int64) * NBLK + tl.arange(0, NBLK)
        offs = rb[:, None] * HB + tl.arange(0, HB)[None, :]
        mask = offs < n_bytes
        bmask = rb * HB < n_bytes
        byte = tl.load(data_ptr + offs, mask=mask, other=0).to(tl.int32)
        s = nf4_block_scale(absmax_ptr, nested_ptr, offset_ptr, code2_ptr, rb, bmask, DOUBLE, NESTED_BS)[:, None]
        hi = tl.load(code_ptr + (byte >> 4)) * s
        lo = tl.load(code_ptr + (byte & 15)) * s
        if HAS_SHIFT:
            tau = tl.load(shift_ptr + rb, mask=bmask, other=0.0)[:, None]
            hi += tau
            lo += tau
        if ROW_SCALE:
            if BLOCK_ROWS:
                r = tl.load(row_scale_ptr + (rb * BLOCKSIZE) // n_cols, mask=bmask, other=0.0)[:, None]
                hi *= r
                lo *= r
            else:  # the two values of a byte may sit in different rows (odd n_cols)
                hi *= tl.load(row_scale_ptr + (offs * 2) // n_cols, mask=(offs * 2) < n_elements, other=0.0)
                lo *= tl.load(row_scale_ptr + (offs * 2 + 1) // n_cols, mask=(offs * 2 + 1) < n_elements,
                              other=0.0)
        vals = tl.join(hi, lo).reshape(NBLK, BLOCKSIZE)
        flat = rb[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        if STRIDED:
            row = (rb * BLOCKSIZE) // n_cols
            out_offs = (row * out_stride + rb * BLOCKSIZE - row * n_cols)[:, None] + tl.arange(0, BLOCKSIZE)[None, :]
        else:
            out_offs = flat
        tl.store(out_ptr + out_offs, vals.to(out_ptr.dtype.element_ty), mask=flat < n_elements)


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
        kernel_code(dev), dynamic_map(dev),
    )


def _call(t: NF4Tensor, dtype: torch.dtype, row_scale: torch.Tensor | None, block: int | None = None,
          num_warps: int | None = None, out: torch.Tensor | None = None) -> tuple:
    """``(out, grid, args, meta)`` of one launch of :func:`_nf4_dequant_kernel`: about ``block`` packed bytes per
    program (a power of two of whole quantization blocks, at least one) and ``num_warps`` warps (defaults:
    2048 bytes and 2 warps on a GPU, measured on an H200); ``out`` (at ``args[8]``) is allocated unless given."""
    if out is None:
        out = torch.empty(t.shape, dtype=dtype, device=t.data.device)
    interp = interpreting()
    block = block or (256 if interp else 2048)
    nblk = 1 << (max(1, block // (t.blocksize // 2)).bit_length() - 1)  # a power of two (tl.arange)
    n_cols = t.shape[-1] if len(t.shape) else 1  # a 0-d weight: one row of one value
    # a 2-D view whose rows lie further apart than n_cols (a column slice of a wider buffer; the caller checked
    # that every block lies in one row)
    stride = out.stride(0) if out.dim() == 2 else n_cols
    strided = stride != n_cols and out.shape[0] > 1
    args = (*_state_args(t), row_scale if row_scale is not None else t.data, out, t.numel, t.data.numel(), n_cols,
            stride)
    meta = dict(BLOCKSIZE=t.blocksize, NESTED_BS=t.nested_blocksize, DOUBLE=t.double_quant,
                HAS_SHIFT=t.shift is not None, ROW_SCALE=row_scale is not None,
                BLOCK_ROWS=row_scale is not None and n_cols % t.blocksize == 0, NBLK=nblk,
                STRIDED=strided, num_warps=num_warps or (4 if interp else 2))
    return out, (cdiv(t.num_blocks, nblk),), args, meta


def _launch_dequant(t: NF4Tensor, dtype: torch.dtype, row_scale: torch.Tensor | None, *, block: int | None = None,
                    num_warps: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the kernel (``block`` and ``num_warps`` as in :func:`_call`; the keywords are for benchmarks)."""
    out, grid, args, meta = _call(t, dtype, row_scale, block, num_warps, out)
    launch(_nf4_dequant_kernel, grid, args, meta)
    return out


def dequant_runner(t: NF4Tensor, dtype: torch.dtype):
    """``make() -> W``: what ``nf4_dequant(t, dtype)`` returns, at less host cost per call.

    After one dequantization of ``t`` to ``dtype`` has run (which compiled the kernel), ``make`` allocates
    the output and launches the bound kernel on the CUDA stream current *now*, skipping the checks and the
    launch-key computation; else (CPU tensors, the PyTorch path, during capture) it is a plain call of
    :func:`nf4_dequant`. For callers that keep it per stream and replace it with ``t`` (``NF4Linear``'s
    decode path above the small-``M`` bound).

    Raises:
        TypeError: ``dtype`` is not fp32 / fp16 / bf16 (``None`` is ``t``'s dtype, as for :func:`nf4_dequant`).
    """
    dtype = output_dtype(t, dtype)
    go = None
    if (t.data.is_cuda and triton is not None and use_triton(t.data)
            and not torch.cuda.is_current_stream_capturing()):
        # an empty stand-in for the output: same dtype and alignment class, so the same compiled kernel
        _, grid, args, meta = _call(t, dtype, None, out=torch.empty(0, dtype=dtype, device=t.data.device))
        go = bind(_nf4_dequant_kernel, grid, args, meta)
    if go is None:  # a CPU tensor (on CPU the kernel runs only under the interpreter), or no bound launch
        return lambda: nf4_dequant(t, dtype)
    head, tail = pointers(args[:8]), args[9:]  # the weight's tensors as go takes them
    shape, device, empty = t.shape, t.data.device, torch.empty
    stream = torch._C._cuda_getCurrentRawStream(device.index)

    def make() -> torch.Tensor:
        w = empty(shape, dtype=dtype, device=device)
        go(stream, (*head, w.data_ptr(), *tail))
        return w

    make.keep = args[:8]  # the tensors whose pointers head holds
    return make


def nf4_dequant(t: NF4Tensor, dtype: torch.dtype | None = None, row_scale: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize an :class:`~alignlab.quant.nf4.NF4Tensor` to ``dtype`` (default: its original dtype).

    With ``row_scale`` (fp32, ``(out_features,)``, for a 2-D weight) row ``i`` comes out
    multiplied by ``row_scale[i]`` in fp32 before the one rounding to ``dtype``: DoRA's
    backward folds its magnitude scaling into the weight this way, at no extra pass. A ``row_scale``
    that requires grad (under grad mode) is applied after the dequantization instead, so that the
    result is differentiable in it on every path.

    ``out``: a tensor of ``t``'s shape and ``dtype`` on its device to write into (and return) instead of a new
    one; for a 2-D weight it may be a view whose rows lie further apart (``out.stride(1) == 1``), e.g. the first
    columns of a wider buffer, written in the same one pass where every quantization block lies in one row
    (``in_features % blocksize == 0``), else through a temporary. Under grad mode neither ``out`` nor ``row_scale`` may
    require grad.

    Runs the Triton kernel when :func:`~alignlab.kernels.dispatch.use_triton` allows,
    else :func:`~alignlab.quant.nf4.nf4_dequantize`; both return identical values.

    Raises:
        TypeError: ``t`` is not an NF4Tensor, ``dtype`` is not fp32 / fp16 / bf16, ``row_scale`` is not an
            fp32 tensor, or ``out`` is not a tensor of ``dtype``.
        ValueError: ``row_scale`` is not ``(out_features,)`` for a 2-D weight; ``out`` is not of ``t``'s shape, on
            its device, with unit column stride, requires grad (under grad mode), or is given with a ``row_scale``
            that requires grad.
    """
    if not isinstance(t, NF4Tensor):
        raise TypeError(f"t must be an NF4Tensor, got {type(t).__name__}")
    dtype = output_dtype(t, dtype)
    if row_scale is not None:
        if not isinstance(row_scale, torch.Tensor):
            raise TypeError(f"row_scale must be a float32 tensor, got {type(row_scale).__name__}")
        if len(t.shape) != 2 or tuple(row_scale.shape) != (t.shape[0],):
            raise ValueError(f"row_scale must have shape ({t.shape[0]},) for a 2-D weight of shape {tuple(t.shape)}, "
                             f"got {tuple(row_scale.shape)}")
        if row_scale.dtype != torch.float32:
            raise TypeError(f"row_scale must be float32, got {row_scale.dtype}")
    if out is not None:
        _check_out(t, dtype, out, row_scale)
        rows_apart = len(t.shape) == 2 and t.shape[0] > 1 and out.stride(0) != t.shape[1]
        if rows_apart and not (t.shape[1] % t.blocksize == 0 and triton is not None and use_triton(t.data)):
            return out.copy_(nf4_dequant(t, dtype, row_scale))  # the kernel's strided store needs blocks in rows
    if row_scale is not None and wants_grad(row_scale):  # the kernel's product has no graph: scale after it
        return (nf4_dequant(t, torch.float32) * row_scale[:, None]).to(dtype)
    if triton is not None and use_triton(t.data):
        return _launch_dequant(t, dtype, None if row_scale is None else row_scale.contiguous(), out=out)
    if row_scale is None:
        w = nf4_dequantize(t, dtype)
    else:
        w = (nf4_dequantize(t, torch.float32) * row_scale[:, None]).to(dtype)
    return w if out is None else out.copy_(w)


def _check_out(t: NF4Tensor, dtype: torch.dtype, out, row_scale) -> None:
    if not isinstance(out, torch.Tensor) or out.dtype != dtype:
        got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"out must be a {dtype} tensor, got {got}")
    if tuple(out.shape) != tuple(t.shape) or out.device != t.data.device:
        raise ValueError(f"out must have the weight's shape {tuple(t.shape)} on {t.data.device}, got "
                         f"{tuple(out.shape)} on {out.device}")
    if (out.dim() and out.stride(-1) != 1) or (out.dim() == 2 and out.shape[0] > 1 and out.stride(0) < out.shape[1]):
        raise ValueError(f"out must have unit column stride and rows at least {t.shape[-1]} elements apart, got "
                         f"strides {out.stride()}")
    if out.dim() > 2 and not out.is_contiguous():
        raise ValueError(f"out must be contiguous for a {out.dim()}-D weight, got strides {out.stride()}")
    if wants_grad(out):  # the kernel's store is invisible to autograd; the PyTorch path's copy_ would refuse a leaf
        raise ValueError("out must not require grad (write into it under torch.no_grad())")
    if row_scale is not None and wants_grad(row_scale):
        raise ValueError("out cannot be given with a row_scale that requires grad (the result must keep its graph)")
