"""Triton kernels for DoRA over a frozen dense or NF4 base weight.

DoRA (Liu et al., arXiv 2402.09353) scales each output row of ``W + s·B A`` by
``m / ‖W + s·B A‖_row``. Two reductions are needed per training step:

* :func:`dora_row_norm` -- ``n_i = ‖W_i + s·B_i A‖₂``, ``(out,)`` in fp32. One program
  owns ``BLOCK_N`` rows and walks the input dimension: it loads a weight tile
  (dequantizing NF4 codes in registers, or reading the dense tile), adds its
  ``s·(B A)`` tile from one ``tl.dot`` of ``(BLOCK_N, r) x (r, BLOCK_K)``, and
  accumulates squares. The merged weight ``W + s·B A`` is never written: the pass
  reads 0.5 byte (NF4) or 2 bytes (bf16) per weight element and the small factors.
* :func:`column_dot` -- ``Σ_t u[t, i]·v[t, i]``, ``(out,)`` in fp32: the magnitude
  gradient ``∂L/∂m_i = Σ_t ∂L/∂y[t, i] · z[t, i] / n_i``. Programs own a column block
  and a slice of rows and write fp32 partial sums, added in a fixed order (deterministic),
  so no ``(tokens, out)`` product is formed.

References (used on CPU, for float64, and under ``ALIGNLAB_KERNELS=torch``):
:func:`alignlab.adapters.dora.dora_weight_norm` on the dequantized weight, and
``(u.float() * v.float()).sum(0)``.
"""

from __future__ import annotations

import torch

from alignlab.kernels.dispatch import interpreting, use_triton
from alignlab.kernels.launch import launch
from alignlab.kernels.nf4_dequant import nf4_dequant
from alignlab.quant.nf4 import NF4Tensor

try:
    import triton
    import triton.language as tl

    from alignlab.kernels.nf4_matmul import _nf4_weight_tile
    from alignlab.kernels.nf4_dequant import _state_args
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None

__all__ = ["dora_row_norm", "column_dot"]


if triton is not None:

    @triton.jit
    def _row_norm_kernel(
        w_ptr, data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr,
        a_ptr, b_ptr, out_ptr, N, K, R, stride_w, stride_a, stride_b, scale,
        QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE: tl.constexpr,
        HAS_SHIFT: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """out[n] = ‖W[n, :] + scale · B[n, :] @ A‖₂ for the BLOCK_N rows of this program."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        row_ok = rn < N
        b = tl.load(b_ptr + rn[:, None].to(tl.int64) * stride_b + rr[None, :],
                    mask=row_ok[:, None] & (rr[None, :] < R), other=0.0)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            ok = row_ok[:, None] & (rk[None, :] < K)
            if QUANT:
                w = _nf4_weight_tile(data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr,
                                     rn, k0 // 2 + tl.arange(0, BLOCK_K // 2), N, K, BLOCKSIZE, NESTED_BS, DOUBLE,
                                     HAS_SHIFT, BLOCK_N, BLOCK_K)
            else:
                w = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_w + rk[None, :], mask=ok, other=0.0)
                w = w.to(tl.float32)
            a = tl.load(a_ptr + rr[:, None] * stride_a + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K),
                        other=0.0)
            if IEEE:
                ba = tl.dot(b.to(tl.float32), a.to(tl.float32), input_precision="ieee")
            else:
                ba = tl.dot(b, a)
            v = tl.where(ok, w + (scale * ba).to(tl.float32), 0.0)  # under torch.compile `scale` arrives as fp64
            acc += tl.sum(v * v, axis=1)
        tl.store(out_ptr + rn, tl.sqrt(acc), mask=row_ok)

    @triton.jit
    def _column_dot_kernel(u_ptr, v_ptr, part_ptr, T, C, rows_per_split, stride_u, stride_v,
                           BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        """part[split, c] = Σ_{t in this split} u[t, c] · v[t, c] in fp32."""
        rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        split = tl.program_id(1)
        t0 = split * rows_per_split
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for dt in range(0, rows_per_split, BLOCK_T):
            rt = t0 + dt + tl.arange(0, BLOCK_T)
            ok = (rt[:, None] < T) & (rt[:, None] < t0 + rows_per_split) & (rc[None, :] < C)
            rows = rt[:, None].to(tl.int64)
            u = tl.load(u_ptr + rows * stride_u + rc[None, :], mask=ok, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + rows * stride_v + rc[None, :], mask=ok, other=0.0).to(tl.float32)
            acc += tl.sum(u * v, axis=0)
        tl.store(part_ptr + split.to(tl.int64) * C + rc, acc, mask=rc < C)


def _check_factors(shape: tuple[int, int], a: torch.Tensor, b: torch.Tensor) -> None:
    out_f, in_f = shape
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
        raise ValueError(f"a must be (r, {in_f}) and b ({out_f}, r) for a weight of shape {shape}, "
                         f"got a {tuple(a.shape)} and b {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share a dtype, got {a.dtype} and {b.dtype}")


def dora_row_norm(weight: torch.Tensor | NF4Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Row norms ``‖W + s·B A‖₂`` of a dense or NF4 weight, ``(out,)`` in fp32 (fp64 for fp64 inputs).

    Args:
        weight: ``(out, in)`` dense tensor or :class:`~alignlab.quant.nf4.NF4Tensor`.
        a: ``(r, in)``; b: ``(out, r)``, one dtype (the products run in it, fp32 accumulation).
        scale: ``s``.
    Raises:
        ValueError / TypeError: factor shapes or dtypes that do not fit the weight.
    """
    from alignlab.adapters.dora import dora_weight_norm

    quant = isinstance(weight, NF4Tensor)
    shape = tuple(weight.shape)
    _check_factors(shape, a, b)
    data = weight.data if quant else weight
    N, K = shape
    fits = not quant or K % 2 == 0
    if not (triton is not None and fits and a.dtype != torch.float64 and use_triton(data, a, b)):
        dense = nf4_dequant(weight, torch.float32) if quant else weight  # the dequant kernel where it applies
        return dora_weight_norm(dense, a, b, scale)
    out = torch.empty(N, dtype=torch.float32, device=data.device)
    if N == 0:
        return out
    a, b = a.contiguous(), b.contiguous()
    block_r = max(16, triton.next_power_of_2(a.shape[0]))
    block_n, block_k = (16, 32) if interpreting() else (16, 256)
    state = _state_args(weight) if quant else (data,) * 7
    meta = (dict(BLOCKSIZE=weight.blocksize, NESTED_BS=weight.nested_blocksize, DOUBLE=weight.double_quant,
                 HAS_SHIFT=weight.shift is not None) if quant
            else dict(BLOCKSIZE=64, NESTED_BS=256, DOUBLE=False, HAS_SHIFT=False))
    launch(_row_norm_kernel, (triton.cdiv(N, block_n),),
           (data, data, *state[1:], a, b, out, N, K, a.shape[0], 0 if quant else data.stride(0), a.stride(0),
            b.stride(0), float(scale)),
           dict(QUANT=quant, IEEE=a.dtype == torch.float32, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
                num_warps=4, **meta))
    return out


def column_dot(u: torch.Tensor, v: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """``Σ_t u[t, c] · v[t, c]`` for two ``(T, C)`` tensors, ``(C,)`` in fp32 (fp64 for fp64 inputs).

    ``splits`` (kernel path): how many row slices sum in parallel; default sized to fill the GPU.

    Raises:
        ValueError: the shapes differ or are not 2-D.
    """
    if u.dim() != 2 or u.shape != v.shape:
        raise ValueError(f"u and v must be 2-D of one shape, got {tuple(u.shape)} and {tuple(v.shape)}")
    T, C = u.shape
    if not (triton is not None and u.dtype != torch.float64 and use_triton(u, v)) or T == 0:
        dt = torch.promote_types(u.dtype, torch.float32)
        return (u.to(dt) * v.to(dt)).sum(0)
    if u.stride(1) != 1:
        u = u.contiguous()
    if v.stride(1) != 1:
        v = v.contiguous()
    block_t, block_c = (8, 32) if interpreting() else (32, 256)
    col_blocks = triton.cdiv(C, block_c)
    # enough programs to fill the GPU: about 4 per SM-sized slice of columns, each at least 256 rows
    if splits is None:
        splits = 1 if interpreting() else max(1, min(triton.cdiv(T, 256), triton.cdiv(512, col_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(T, splits), block_t) * block_t
    splits = triton.cdiv(T, rows_per_split)
    part = torch.empty(splits, C, dtype=torch.float32, device=u.device)
    launch(_column_dot_kernel, (col_blocks, splits), (u, v, part, T, C, rows_per_split, u.stride(0), v.stride(0)),
           dict(BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4))
    return part[0] if splits == 1 else part.sum(0)
