"""Triton kernels: matrix products with an NF4 weight, dequantized tile by tile in registers.

Forward (QLoRA base layer, Dettmers et al. 2023, arXiv 2305.14314):

    y = x W^T (+ b),     x: (M, K),  W: (N, K) stored as NF4,  y: (M, N)

Backward to the input (the weight is frozen, so this is the only product):

    dx = dy W,           dy: (M, N),  dx: (M, K)

The fused kernels load ``(BLOCK_N, BLOCK_K / 2)`` tiles of packed bytes and turn
them into values ``q[c] * s`` in registers (see :mod:`alignlab.kernels.nf4_dequant`),
never writing the full weight, and feed them to ``tl.dot``.

Dispatch (:func:`nf4_matmul`, :func:`nf4_matmul_t`), by rows ``M = batch * seq``,
from measurements on an H100 (``benchmarks/nf4.py``, ``benchmarks/RESULTS.md``):

* ``M <= SMALL_M`` (16, decode; up to the device table's ``max_m``, 32 on the H200 and the H100, and up to 64 at
  the shapes listed there at that bucket: :func:`alignlab.kernels.nf4_configs.takes_small`;
  ``K % blocksize == 0``, blocksize <= 256):
  :func:`alignlab.kernels.nf4_small.small_m_matmul` -- a split-K GEMV at
  ``M = 1`` and a split-K ``tl.dot`` kernel above, both with the codebook looked
  up in registers.  Measured on an H100 (CUDA graphs, newest run in
  ``benchmarks/RESULTS.md``): 1.50-1.74x faster than a bf16 cuBLAS GEMV at ``M = 1``
  and 0.99-1.13x bitsandbytes' speed; at ``M = 16`` 1.01-1.30x the bf16 speed and
  1.7-2.9x faster than bitsandbytes. On the H200 ``M = 2..32`` is slower than bf16
  (RESULTS.md, issue 24). ``ALIGNLAB_NF4_SMALL=0`` sends these rows to dequantize + cuBLAS instead.
* everything else (and odd ``K``, blocksizes > 256): the Triton dequantization
  kernel into a temporary, then cuBLAS.  At training shapes this costs
  ``2.5 N K`` bytes against ``2 M N K`` flops, ~7-13% over a bf16 product at
  ``M = 4096`` (H100: 1.08-1.13x, forward and backward; bitsandbytes 1.12-1.21x).
* the fused ``tl.dot`` kernels (register-dequantized tiles feeding the tensor
  cores, forward and ``dx``) are kept, tested, and opt-in through ``LARGE_M``:
  measured 20-40x slower than dequantize + cuBLAS at every M from 16 to 4096.
* ``PIPELINE_CHUNKS > 1`` overlaps slice dequantization on a side stream with
  the GEMMs; measured 7-15% slower than one dequantization + one GEMM, so off.

The torch reference (``ALIGNLAB_KERNELS=torch`` or CPU tensors) is
``x @ nf4_dequantize(W).T``.
"""

from __future__ import annotations

import torch

from alignlab._checks import env_count, env_switch
from alignlab.kernels.dispatch import functorch_active, interpreted_bf16_dot, interpreting, kernels_setting, use_triton
from alignlab.kernels.launch import cdiv, options
from alignlab.kernels.nf4_dequant import _state_args, nf4_dequant
from alignlab.kernels.nf4_configs import DECODE_ROWS, takes_small
from alignlab.kernels.nf4_small import _small_m_matmul, small_m_matmul_op, small_m_runner
from alignlab.quant.nf4 import NF4Tensor, nf4_dequantize

try:
    import triton
    import triton.language as tl

    from alignlab.kernels.nf4_dequant import nf4_decode
except ImportError:  # pragma: no cover
    triton = None

__all__ = ["nf4_matmul", "nf4_matmul_t", "decode_matmul", "decode_runner", "LARGE_M", "SMALL_M"]

SMALL_M = 16
# Row count from which dequantize + cuBLAS beats the fused kernel (measured on H100, see module doc).
# The fused tl.dot kernels run for SMALL_M < M < LARGE_M (backward: M < LARGE_M).  Default 0 = never:
# measured on an H100 (benchmarks/nf4.py, 4096x4096, bf16) they lose to Triton dequant + cuBLAS at every
# M from 16 to 4096 (M=32: 0.65 ms vs 0.033 ms; M=4096: 6.9 ms vs 0.19 ms) -- the register-dequantized
# tile has to be re-laid-out for the tensor cores, and that costs more than writing and re-reading it.
LARGE_M = env_count("ALIGNLAB_NF4_LARGE_M", 0)
# M <= SMALL_M takes alignlab.kernels.nf4_small (needs in_features % blocksize == 0, blocksize <= 256):
# on an H100 it beat dequant + cuBLAS at every benchmark shape for M = 4 and 16 (1.5-3.2x).
USE_SMALL = env_switch("ALIGNLAB_NF4_SMALL", True)
# M >= LARGE_M: dequantize in this many slices on a side stream, overlapping cuBLAS (1 = one dequant, then GEMM).
PIPELINE_CHUNKS = env_count("ALIGNLAB_NF4_CHUNKS", 1, minimum=1)


if triton is not None:

    @triton.jit
    def _grouped(pid, num_m, num_other, GROUP_M: tl.constexpr):
        """Program id -> (row tile, other tile) in groups of GROUP_M row tiles: consecutive programs
        share weight tiles in L2."""
        first_m = (pid // (GROUP_M * num_other)) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        return first_m + (pid % (GROUP_M * num_other)) % size_m, (pid % (GROUP_M * num_other)) // size_m

    @triton.jit
    def _nf4_weight_tile(
        data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr,
        rn, rkb, N, K,
        BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Dequantized fp32 tile ``W[rn, 2*rkb[0] : 2*rkb[0] + BLOCK_K]`` of shape ``(BLOCK_N, BLOCK_K)``.

        Rows past ``N`` / columns past ``K`` come back finite (not zero): callers
        mask the other operand or the store instead.
        """
        half_k = K // 2
        mask = (rn[:, None] < N) & (rkb[None, :] < half_k)
        rows = rn[:, None].to(tl.int64)
        byte = tl.load(data_ptr + rows * half_k + rkb[None, :], mask=mask, other=0).to(tl.int32)
        bidx = (rows * K + 2 * rkb[None, :]) // BLOCKSIZE
        hi, lo = nf4_decode(byte, bidx, mask, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr,
                            DOUBLE, NESTED_BS, HAS_SHIFT)
        return tl.join(hi, lo).reshape(BLOCK_N, BLOCK_K)

    @triton.jit
    def _nf4_weight_tile_blocks(
        data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr,
        rn, k0, N, K,
        BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """:func:`_nf4_weight_tile` of columns ``[k0, k0 + BLOCK_K)`` where every quantization block lies in one
        row and in one tile (``K`` and ``k0`` multiples of ``BLOCKSIZE``, ``BLOCK_K`` a multiple of it): the tile
        is loaded as ``(BLOCK_N, BLOCK_K / BLOCKSIZE, BLOCKSIZE / 2)`` bytes, so each block's scale (and shift) is
        looked up once and broadcast instead of once per byte (with double quantization four loads per byte fewer).
        Rows past ``N`` and blocks past ``K`` come back finite, as there: callers mask."""
        NB: tl.constexpr = BLOCK_K // BLOCKSIZE
        HB: tl.constexpr = BLOCKSIZE // 2
        rows = rn[:, None].to(tl.int64)
        nb = tl.arange(0, NB)[None, :]
        ok = (rn[:, None] < N) & (k0 + nb * BLOCKSIZE < K)  # (BLOCK_N, NB): whole blocks in or out
        bidx = (rows * (K // BLOCKSIZE) + k0 // BLOCKSIZE + nb)[:, :, None]  # (BLOCK_N, NB, 1): one per block
        ok = ok[:, :, None]
        offs = rows[:, :, None] * (K // 2) + (k0 // 2 + nb[:, :, None] * HB + tl.arange(0, HB)[None, None, :])
        byte = tl.load(data_ptr + offs, mask=ok, other=0).to(tl.int32)
        hi, lo = nf4_decode(byte, bidx, ok, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr,
                            DOUBLE, NESTED_BS, HAS_SHIFT)  # the scale and shift broadcast over the block's bytes
        return tl.join(hi, lo).reshape(BLOCK_N, BLOCK_K)

    @triton.jit
    def _nf4_mm_kernel(
        x_ptr, data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr, bias_ptr, y_ptr,
        M, N, K, stride_xm, stride_ym,
        BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """y[M, N] = x[M, K] @ W[N, K]^T (+ bias)."""
        pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        rkb = tl.arange(0, BLOCK_K // 2)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
        for k0 in range(0, K, BLOCK_K):
            xk = k0 + rk
            x = tl.load(x_rows + xk[None, :], mask=(rm[:, None] < M) & (xk[None, :] < K), other=0.0)
            w = _nf4_weight_tile(
                data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr,
                rn, k0 // 2 + rkb, N, K, BLOCKSIZE, NESTED_BS, DOUBLE, HAS_SHIFT, BLOCK_N, BLOCK_K,
            )
            if IEEE:
                acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        y = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _nf4_mm_t_kernel(
        dy_ptr, data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr, dx_ptr,
        M, N, K, stride_dym, stride_dxm,
        BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """dx[M, K] = dy[M, N] @ W[N, K]; programs tile (M, K) and loop over N."""
        pid_m, pid_k = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rkb = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        rn0 = tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        dy_rows = dy_ptr + rm[:, None].to(tl.int64) * stride_dym
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + rn0
            dy = tl.load(dy_rows + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
            w = _nf4_weight_tile(
                data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr,
                rn, rkb, N, K, BLOCKSIZE, NESTED_BS, DOUBLE, HAS_SHIFT, BLOCK_N, BLOCK_K,
            )
            if IEEE:
                acc += tl.dot(dy.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(dy, w.to(dy.dtype))
        dx = dx_ptr + rm[:, None].to(tl.int64) * stride_dxm + rk[None, :]
        tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rk[None, :] < K))

    def _configs(small: bool):
        out = []
        if small:
            for bn, bk, w, s in [(16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 4), (32, 512, 8, 3),
                                 (64, 256, 4, 3), (16, 1024, 8, 2), (64, 128, 4, 4)]:
                out.append(triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1},
                                         num_warps=w, num_stages=s))
        else:
            for bm, bn, bk, w, s in [(64, 64, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                                     (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 64, 128, 4, 3)]:
                out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                         num_warps=w, num_stages=s))
        return out

    def _m_bucket(M: int) -> int:
        return 1 if M <= 1 else (16 if M <= 16 else 128 if M <= 128 else 1024)

    _KEY = ["N", "K", "M_BUCKET", "BLOCKSIZE", "DOUBLE"]

    def _tuned(kernel, small: bool):
        return triton.autotune(configs=_configs(small), key=_KEY)(kernel)

    # M_BUCKET is an unused constexpr-free int argument: it only keys the autotuner.
    @triton.jit
    def _fwd(x_ptr, data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr, bias_ptr,
             y_ptr, M, N, K, stride_xm, stride_ym, M_BUCKET,
             BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE: tl.constexpr, HAS_SHIFT: tl.constexpr,
             HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        _nf4_mm_kernel(x_ptr, data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr,
                       bias_ptr, y_ptr, M, N, K, stride_xm, stride_ym, BLOCKSIZE, NESTED_BS, DOUBLE, HAS_SHIFT,
                       HAS_BIAS, IEEE, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)

    @triton.jit
    def _bwd(dy_ptr, data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr, dx_ptr,
             M, N, K, stride_dym, stride_dxm, M_BUCKET,
             BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE: tl.constexpr, HAS_SHIFT: tl.constexpr,
             IEEE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        _nf4_mm_t_kernel(dy_ptr, data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr,
                         dx_ptr, M, N, K, stride_dym, stride_dxm, BLOCKSIZE, NESTED_BS, DOUBLE, HAS_SHIFT, IEEE,
                         BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)

    _fwd_large = _tuned(_fwd, False)
    _bwd_small, _bwd_large = _tuned(_bwd, True), _tuned(_bwd, False)

    @triton.jit
    def _nf4_dequant_tile_kernel(
        data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr, out_ptr,
        n0, k0, rows, cols, N, K, stride_out,
        BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE: tl.constexpr, HAS_SHIFT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """out[:rows, :cols] = W[n0 : n0 + rows, k0 : k0 + cols] (k0 even)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        ln = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        lkb = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        w = _nf4_weight_tile(data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr,
                             n0 + ln, k0 // 2 + lkb, N, K, BLOCKSIZE, NESTED_BS, DOUBLE, HAS_SHIFT,
                             BLOCK_N, BLOCK_K)
        lk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        dst = out_ptr + ln[:, None].to(tl.int64) * stride_out + lk[None, :]
        tl.store(dst, w.to(out_ptr.dtype.element_ty), mask=(ln[:, None] < rows) & (lk[None, :] < cols))


def _meta(t: NF4Tensor, dtype: torch.dtype) -> dict:
    return dict(BLOCKSIZE=t.blocksize, NESTED_BS=t.nested_blocksize, DOUBLE=t.double_quant,
                HAS_SHIFT=t.shift is not None, IEEE=dtype == torch.float32)


def _fixed(M: int) -> dict:
    """One small config for the interpreter (no autotuning there)."""
    return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=4)


def _check(x: torch.Tensor, t: NF4Tensor, dim: int, name: str) -> None:
    if not isinstance(t, NF4Tensor):
        raise TypeError(f"weight must be an NF4Tensor, got {type(t).__name__}")
    if len(t.shape) != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(t.shape)}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be fp32/fp16/bf16, got {x.dtype}")
    if x.shape[-1:] != (t.shape[dim],):  # a 0-d input too
        raise ValueError(f"{name}.shape[-1] must be {t.shape[dim]}, got {tuple(x.shape)}")
    if t.data.device != x.device:  # (a meta weight and a CPU input gave uninitialised memory, no error)
        raise ValueError(f"weight must be on {name}'s device {x.device}, got {t.data.device}; move one of them")


def nf4_matmul(x: torch.Tensor, t: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` for an NF4 weight ``W`` of shape ``(N, K)``.

    Args:
        x: ``(..., K)`` activations, fp32/fp16/bf16; the output has ``x.dtype``.
        t: the NF4 weight, logical shape ``(N, K)``.
        bias: optional ``(N,)``.

    Returns:
        ``(..., N)``.

    Differentiable with respect to ``x`` and ``bias`` (the weight is frozen) on every path: where either needs a
    gradient the product runs inside :class:`_NF4Matmul`, whose backward is :func:`nf4_matmul_t`. Under a
    ``torch.func`` transform (``vmap``, ``jacrev``, ``grad``, ...) it is the reference dequantization and
    ``F.linear``: torch ops that every transform takes (a Triton kernel cannot read the transforms' tensors).

    Raises:
        TypeError / ValueError: wrong weight type, dtype or last dimension; a weight on another device than ``x``;
            a ``bias`` that is not a tensor of shape ``(N,)`` on ``x``'s device.
    """
    _check(x, t, 1, "x")
    N, K = t.shape
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (N,):  # the kernels read N values from its start: a short one out of bounds
            raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias must be on x's device {x.device}, got {bias.device}")
    if functorch_active():  # vmap / jacrev / grad: torch ops only
        return torch.nn.functional.linear(x, nf4_dequantize(t, x.dtype), None if bias is None else bias.to(x.dtype))
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _NF4Matmul.apply(x, bias, t)
    if bias is not None and bias.stride(0) != 1 and N > 1:  # the kernels index it as contiguous
        bias = bias.contiguous()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*lead, N)
    if not (triton is not None and use_triton(x2, t.data)):
        w = nf4_dequantize(t, x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    if M > SMALL_M and M >= LARGE_M and K % 2 == 0 and PIPELINE_CHUNKS > 1 and x2.is_cuda:
        y = _pipelined(x2.contiguous(), t, PIPELINE_CHUNKS, transpose=True)
        if bias is not None:
            y += bias.to(y.dtype)
        return y.reshape(*lead, N)
    if _takes_small(M, K, t, x2.device, x.dtype):
        small = small_m_matmul_op if torch.compiler.is_compiling() else _small_m_matmul  # arguments checked above
        return small(x2 if x2.stride(-1) == 1 else x2.contiguous(), t, bias).reshape(*lead, N)
    if K % 2 or M >= LARGE_M or interpreted_bf16_dot(x):
        w = nf4_dequant(t, x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    args = (x2, *_state_args(t), bias if bias is not None else y, y, M, N, K, x2.stride(0), y.stride(0),
            _m_bucket(M))
    meta = dict(_meta(t, x.dtype), HAS_BIAS=bias is not None)
    if interpreting():
        cfg = _fixed(M)
        grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
        _fwd[grid](*args, **meta, **cfg, **options())
    else:
        _fwd_large[lambda c: (cdiv(M, c["BLOCK_M"]) * cdiv(N, c["BLOCK_N"]),)](*args, **meta, **options())
    return y.reshape(*lead, N)


class _NF4Matmul(torch.autograd.Function):
    """:func:`nf4_matmul` as a function of ``x`` and ``bias`` (the NF4 weight is frozen): ``dx = dy W`` by
    :func:`nf4_matmul_t`, ``db = Σ_rows dy``. The small-M and fused kernels return plain tensors, so without it the
    product was differentiable at some row counts and not at others (``M <= 16`` on the Triton path: no
    gradient reached ``x``, silently where another term also depended on it). ``setup_context`` apart, so that
    ``torch.func`` transforms take it. :class:`~alignlab.quant.NF4Linear` applies it directly in training (its
    arguments checked already); it saves only references to the packed weight."""

    @staticmethod
    def forward(x: torch.Tensor, bias: torch.Tensor | None, t: NF4Tensor) -> torch.Tensor:
        return nf4_matmul(x, t, bias)  # autograd runs forward without grad: no recursion

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.t = inputs[2]

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        dx = nf4_matmul_t(dy, ctx.t) if ctx.needs_input_grad[0] else None
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return dx, db, None


class _KeptMatmul(torch.autograd.Function):
    """``run(x, bias)``, a launcher kept by :func:`keep_runner` (``nf4_matmul(x, t, bias)`` at decode rows), as a
    function of ``x`` alone (the bias frozen): ``NF4Linear``'s decode path when ``x`` needs a gradient. Backward as
    :class:`_NF4Matmul`'s: ``dx = dy W`` by :func:`nf4_matmul_t` (differentiable again for a second derivative)."""

    @staticmethod
    def forward(ctx, x, fixed):
        run, bias, ctx.t = fixed
        return run(x, bias)

    @staticmethod
    def backward(ctx, dy):
        return nf4_matmul_t(dy, ctx.t), None


def kept_matmul(x: torch.Tensor, run, bias: torch.Tensor | None, t: NF4Tensor) -> torch.Tensor:
    """``run(x, bias)`` (a launcher :func:`kept_runner` returned for ``x``'s layout) with ``x``'s gradient; ``bias``
    must not need one."""
    return _KeptMatmul.apply(x, (run, bias, t))


class _NF4MatmulT(torch.autograd.Function):
    """:func:`nf4_matmul_t` as a function of ``dy``: its gradient is ``g W^T`` (:func:`nf4_matmul`), which a
    second derivative through :class:`_NF4Matmul` (``create_graph=True``) needs on every path."""

    @staticmethod
    def forward(dy: torch.Tensor, t: NF4Tensor) -> torch.Tensor:
        return nf4_matmul_t(dy, t)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.t = inputs[1]

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return nf4_matmul(g, ctx.t), None


def decode_runner(x: torch.Tensor, t: NF4Tensor, bias: torch.Tensor | None = None):
    """A cheaper repeat of ``nf4_matmul(x, t, bias)`` for decode-sized ``x``, or None.

    Returns ``run(x, bias)`` (see :func:`alignlab.kernels.nf4_small.small_m_runner`) where
    :func:`nf4_matmul` takes the small-``M`` kernels for this ``x``, after it has run once for its shape;
    where it dequantizes and calls cuBLAS instead (more rows than the device's small-``M`` bound), a
    ``run`` doing just that: the dequantization launch and ``F.linear``, without the per-call checks and
    dispatch. None otherwise (then call :func:`nf4_matmul`).
    """
    K = t.shape[1]
    M = x.numel() // max(K, 1)
    if not (x.is_cuda and x.shape[-1] == K and x.dtype in (torch.float16, torch.bfloat16) and M > 0
            and triton is not None and use_triton(x, t.data)):
        return None
    if _takes_small(M, K, t, x.device, x.dtype):
        return small_m_runner(x, t, bias)
    if PIPELINE_CHUNKS > 1 or not (K % 2 or M >= LARGE_M):  # nf4_matmul's other paths: no runner
        return None
    return _dequant_runner(t, x.dtype)


def takes_rank_term(x2: torch.Tensor, t: NF4Tensor, b: torch.Tensor) -> bool:
    """Whether :func:`rank_matmul` runs for ``x2 (M, K)`` (no gradient wanted, the caller's to check): where
    :func:`nf4_matmul` sends it to the small-M kernels, whose epilogue then adds the rank term with ``b (N, r)``
    (unit column stride)."""
    M, K = x2.shape
    return (triton is not None and M > 0 and x2.stride(-1) == 1 and b.stride(-1) == 1 and use_triton(x2, t.data)
            and not (M > SMALL_M and M >= LARGE_M and PIPELINE_CHUNKS > 1)
            and _takes_small(M, K, t, x2.device, x2.dtype))


def rank_matmul(x2: torch.Tensor, t: NF4Tensor, bias: torch.Tensor | None, xa: torch.Tensor, b: torch.Tensor
                ) -> torch.Tensor:
    """``x2 Wᵀ (+ bias) + xa c(b)ᵀ`` by one small-M launch (the rank term in its epilogue, summed in fp32 with the
    product and rounded once; ``c`` = ``x2``'s dtype), for arguments the caller has checked: ``x2 (M, K)`` where
    :func:`takes_rank_term`, ``xa (M, r)`` contiguous in ``x2``'s dtype, ``b (N, r)`` of unit column stride,
    ``bias`` None or ``(N,)`` contiguous. A LoRA layer's decode product over an NF4 base
    (``alignlab.adapters.fused``)."""
    return _small_m_matmul(x2, t, bias, (None,) * 7, (xa, b))


def runner_key(x: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """What a kept launcher depends on for a CUDA input ``x``: its shape, strides, dtype and alignment, its device
    and current stream, the bias dtype and ``ALIGNLAB_KERNELS`` (a flip re-dispatches)."""
    dev = x.get_device()
    return (x.shape, x.stride(), x.dtype, x.data_ptr() & 15, dev, torch._C._cuda_getCurrentRawStream(dev),
            None if bias is None else bias.dtype, kernels_setting())


def kept_runner(t: NF4Tensor, key: tuple):
    """The launcher kept on ``t`` for ``key``; None where that layout is known to take another path; False where
    none was kept yet."""
    runners = t.__dict__.get("_runners")
    return False if runners is None else runners.get(key, False)


def keep_runner(x: torch.Tensor, t: NF4Tensor, bias: torch.Tensor | None, key: tuple) -> None:
    """After a call of :func:`nf4_matmul` on ``x`` that found no launcher for ``key``: keep one on the packed
    weight ``t`` (so it goes with it) where :func:`decode_runner` has one for this ``x``, else None, so that this
    layout skips the step from then on. ``bias``: None or in ``x``'s dtype (the launcher adds it as it is)."""
    run = decode_runner(x, t, bias)
    if run is None and torch.cuda.is_current_stream_capturing():
        return  # no launcher is made during capture: the next call outside it may still get one
    runners = t.__dict__.setdefault("_runners", {})
    if len(runners) >= 64:  # many layouts (e.g. growing prompt lengths): keep the newest
        runners.pop(next(iter(runners)))
    runners[key] = run


def decode_matmul(x: torch.Tensor, t: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`nf4_matmul` of arguments the caller has checked, through a launcher kept on ``t`` per input layout
    (:func:`runner_key`): after the first call of a layout, about one kernel launch of host work.

    For eager calls that need no gradient on a CUDA ``x`` in its compute dtype with at most ``DECODE_ROWS`` rows
    and a ``bias`` that is None or in ``x``'s dtype (``NF4Linear``'s decode path, the fused QLoRA layer's base
    product); the caller tests that, and ``alignlab.quant.linear.DECODE_LAUNCHERS``."""
    key = runner_key(x, bias)
    run = kept_runner(t, key)
    if run:
        return run(x, bias)
    y = nf4_matmul(x, t, bias)
    if run is False:
        keep_runner(x, t, bias, key)
    return y


def _dequant_runner(t: NF4Tensor, dtype: torch.dtype):
    """``run(x, bias) = F.linear(x, W, bias)``, ``W`` dequantized to ``dtype`` per call (one transient buffer),
    as :func:`nf4_matmul` computes it for these rows: the same launches, bit for bit."""
    from alignlab.kernels.nf4_dequant import dequant_runner

    linear = torch.nn.functional.linear
    make = dequant_runner(t, dtype)

    def run(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return linear(x, make(), bias)

    return run


def _takes_small(M: int, K: int, t: NF4Tensor, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`nf4_matmul` sends ``M`` rows of ``dtype`` to the small-M kernels (given the Triton path)."""
    return (USE_SMALL and K % t.blocksize == 0 and t.blocksize <= 256
            and (M <= SMALL_M or takes_small(M, t.shape[0], K, device, blocksize=t.blocksize, dtype=dtype)))


def nf4_matmul_t(dy: torch.Tensor, t: NF4Tensor) -> torch.Tensor:
    """``dy @ W`` for an NF4 weight ``W`` of shape ``(N, K)``: the input gradient of :func:`nf4_matmul`.

    Args:
        dy: ``(..., N)``.

    Returns:
        ``(..., K)`` in ``dy.dtype``; differentiable with respect to ``dy`` on every path (:class:`_NF4MatmulT`).
    """
    _check(dy, t, 0, "dy")
    if functorch_active():  # as in nf4_matmul
        return dy @ nf4_dequantize(t, dy.dtype)
    if torch.is_grad_enabled() and dy.requires_grad:
        return _NF4MatmulT.apply(dy, t)
    N, K = t.shape
    lead = dy.shape[:-1]
    d2 = dy.reshape(-1, N)
    M = d2.shape[0]
    if M == 0:
        return dy.new_empty(*lead, K)
    if not (triton is not None and use_triton(d2, t.data)):
        return dy @ nf4_dequantize(t, dy.dtype)
    if M > SMALL_M and M >= LARGE_M and K % 2 == 0 and PIPELINE_CHUNKS > 1 and d2.is_cuda:
        return _pipelined(d2.contiguous(), t, PIPELINE_CHUNKS, transpose=False).reshape(*lead, K)
    if K % 2 or M >= LARGE_M or interpreted_bf16_dot(dy):
        return dy @ nf4_dequant(t, dy.dtype)
    if d2.stride(-1) != 1:
        d2 = d2.contiguous()
    dx = torch.empty(M, K, dtype=dy.dtype, device=dy.device)
    args = (d2, *_state_args(t), dx, M, N, K, d2.stride(0), dx.stride(0), _m_bucket(M))
    meta = _meta(t, dy.dtype)
    if interpreting():
        cfg = _fixed(M)
        grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(K, cfg["BLOCK_K"]),)
        _bwd[grid](*args, **meta, **cfg, **options())
    else:
        kern = _bwd_small if M <= SMALL_M else _bwd_large
        kern[lambda c: (cdiv(M, c["BLOCK_M"]) * cdiv(K, c["BLOCK_K"]),)](*args, **meta, **options())
    return dx.reshape(*lead, K)


# ---------------------------------------------------------------------------------------------
# Large M: dequantize chunk i+1 on a side stream while cuBLAS multiplies chunk i
# ---------------------------------------------------------------------------------------------

_SIDE_STREAMS: dict = {}


def _dequant_tile(t: NF4Tensor, n0: int, k0: int, out: torch.Tensor) -> None:
    rows, cols = out.shape
    N, K = t.shape
    bn, bk = 32, 128
    grid = (cdiv(rows, bn), cdiv(cols, bk))
    _nf4_dequant_tile_kernel[grid](*_state_args(t), out, n0, k0, rows, cols, N, K, out.stride(0),
                                   BLOCKSIZE=t.blocksize, NESTED_BS=t.nested_blocksize, DOUBLE=t.double_quant,
                                   HAS_SHIFT=t.shift is not None, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
                                   **options())


def _pipelined(a: torch.Tensor, t: NF4Tensor, chunks: int, transpose: bool) -> torch.Tensor:
    """``a @ W^T`` (``transpose``) or ``a @ W``, W dequantized in ``chunks`` slices overlapping the GEMMs.

    Forward slices the output features (rows of W); backward the input features
    (columns of W).  Two slice buffers alternate between the streams, so extra
    memory is ``2 / chunks`` of a dense weight.
    """
    N, K = t.shape
    M = a.shape[0]
    dtype = a.dtype
    total = N if transpose else K
    step = -(-total // chunks)
    step += step % 2  # even column starts keep bytes aligned
    out = torch.empty(M, total, dtype=dtype, device=a.device)
    main = torch.cuda.current_stream(a.device)
    side = _SIDE_STREAMS.setdefault(a.device, torch.cuda.Stream(a.device))
    shape = (step, K) if transpose else (N, step)
    bufs = [torch.empty(shape, dtype=dtype, device=a.device) for _ in range(min(2, chunks))]
    side.wait_stream(main)
    done = []
    for i, c0 in enumerate(range(0, total, step)):
        c1 = min(c0 + step, total)
        buf = bufs[i % len(bufs)]
        view = buf[: c1 - c0] if transpose else buf[:, : c1 - c0]
        with torch.cuda.stream(side):
            if i >= len(bufs):
                side.wait_event(done[i - len(bufs)])
            _dequant_tile(t, c0 if transpose else 0, 0 if transpose else c0, view)
            ready = torch.cuda.Event()
            ready.record(side)
        main.wait_event(ready)
        if transpose:
            torch.mm(a, view.t(), out=out[:, c0:c1])
        else:
            torch.mm(a, view, out=out[:, c0:c1])
        ev = torch.cuda.Event()
        ev.record(main)
        done.append(ev)
    for b in bufs:
        b.record_stream(side)
    return out
