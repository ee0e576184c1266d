"""Triton kernel: the LoRA update of a decode-sized call, ``y += s·(x Aᵀ) Bᵀ``, in one launch.

Generation with an unmerged adapter (RL rollouts, evaluation of a LoRA/QLoRA checkpoint) calls every
adapted layer with a few rows. There the adapter term costs more host time than GPU time: with fp32
master factors the plain path casts ``A`` and ``B`` to the activation dtype and runs two small
cuBLAS products (four launches, each one's host cost above its GPU time). :func:`lora_update_` does
it in one launch with no cast: each program owns ``BLOCK_N`` output columns, forms the ``(M, r)``
product ``x Aᵀ`` itself (``A`` is ``r x in``, a few hundred KB read from L2 by every program), then
``(x Aᵀ) B_tileᵀ`` and adds ``s`` times that to its tile of ``y``. Factors are read in their own
dtype and all math is fp32 (``tl.dot`` in IEEE fp32), so the update is at least as exact as the
autocast path's; ``y`` is read and written once in its dtype.

Limits: ``M <= 64`` rows, rank ``r <= 64`` (larger calls are not decode-shaped: use the matmuls).
The PyTorch reference is :func:`lora_update_reference_`.
"""

from __future__ import annotations

import torch

from alignlab.kernels.launch import launch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None

__all__ = ["lora_update_", "lora_update_reference_", "MAX_ROWS", "MAX_RANK"]

MAX_ROWS = 64
MAX_RANK = 64
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if triton is not None:

    @triton.jit
    def _lora_update_kernel(
        x_ptr, a_ptr, b_ptr, y_ptr, M, N, K, R, stride_xm, stride_ym, scale,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """y[:, n-tile] += scale · (x Aᵀ) B[n-tile]ᵀ; A is (R, K), B (N, R), both contiguous."""
        rm = tl.arange(0, BLOCK_M)
        rr = tl.arange(0, BLOCK_R)
        m_ok = rm < M
        r_ok = rr < R
        xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            xt = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :],
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            at = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=r_ok[:, None] & k_ok[None, :],
                         other=0.0).to(tl.float32)
            xa += tl.dot(xt, tl.trans(at), input_precision="ieee")
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        bt = tl.load(b_ptr + rn[:, None].to(tl.int64) * R + rr[None, :], mask=n_ok[:, None] & r_ok[None, :],
                     other=0.0).to(tl.float32)
        upd = tl.dot(xa, tl.trans(bt), input_precision="ieee")
        offs = rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, (y + scale * upd).to(y_ptr.dtype.element_ty), mask=ok)


def lora_update_reference_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """PyTorch reference of :func:`lora_update_`: the update in fp32 (fp64 for fp64 inputs), added to
    ``y`` and rounded once."""
    acc = torch.promote_types(y.dtype, torch.float32)
    upd = (x.to(acc) @ a.to(acc).T) @ b.to(acc).T
    return y.copy_(y.to(acc) + scale * upd)


def _check(y, x, a, b, scale) -> None:
    for name, t in (("y", y), ("x", x), ("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise TypeError(f"{name} must be a 2-D floating-point tensor, got "
                            f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    M, K = x.shape
    R = a.shape[0]
    if a.shape[1] != K or tuple(b.shape) != (y.shape[1], R) or y.shape[0] != M:
        raise ValueError(f"shapes must be y (M, N), x (M, K), a (r, K), b (N, r); got y {tuple(y.shape)}, "
                         f"x {tuple(x.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")


def lora_update_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``y += scale · (x Aᵀ) Bᵀ`` in place, one Triton launch; returns ``y``.

    Args:
        y: ``(M, N)`` output rows (e.g. the base layer's output), 16- or 32-bit, last dim contiguous.
        x: ``(M, K)`` the layer's input rows, last dim contiguous.
        a: ``(r, K)`` LoRA A, b: ``(N, r)`` LoRA B, any float dtype (fp32 masters are read as they are).
        scale: ``s`` (``alpha / r``).

    Uses the kernel where :func:`alignlab.kernels.use_triton` says so, ``M <= 64``, ``r <= 64`` and every
    tensor is fp16 / bf16 / fp32; else the reference. No autograd: for calls that need no gradient.

    Raises:
        TypeError / ValueError: non-tensors, wrong ranks or shapes, a non-numeric scale.
    """
    from alignlab.kernels.dispatch import use_triton

    _check(y, x, a, b, scale)
    M, K = x.shape
    N, R = b.shape
    if M == 0 or N == 0:
        return y
    if not (triton is not None and use_triton(y, x, a, b) and M <= MAX_ROWS and R <= MAX_RANK
            and y.stride(-1) == 1 and x.stride(-1) == 1 and all(t.dtype in _DTYPES for t in (y, x, a, b))):
        return lora_update_reference_(y, x, a, b, scale)
    a = a if a.is_contiguous() else a.contiguous()
    b = b if b.is_contiguous() else b.contiguous()
    block_n = 64
    meta = dict(BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_R=max(16, triton.next_power_of_2(R)),
                BLOCK_K=64, BLOCK_N=block_n)
    launch(_lora_update_kernel, (triton.cdiv(N, block_n),),
           (x, a, b, y, M, N, K, R, x.stride(0), y.stride(0), float(scale)), meta)
    return y
