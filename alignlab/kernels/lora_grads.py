"""The two rank-r products of a LoRA layer's backward that read the output gradient, from one read of it.

With ``g = ∂L/∂y`` ``(T, O)``, ``B`` ``(O, r)`` and ``xa = s·x Aᵀ`` ``(T, r)`` (what forward saved), a LoRA
layer's backward needs

    gb = s·g B      (T, r): the gradient reaching ``x Aᵀ`` (then ``∂L/∂A = gbᵀ x`` and ``dx += gb A``)
    dB = gᵀ xa      (O, r)

Two GEMMs read ``g`` twice, the largest tensor of the backward besides ``x``. :func:`rank_grads` reads it once:
program ``(i, j)`` owns output columns ``[i·BLOCK_O, (i + 1)·BLOCK_O)`` and a slice ``j`` of the rows; per
``(BLOCK_T, BLOCK_O)`` tile of ``g`` it adds ``tileᵀ xa`` into its ``dB`` rows and writes ``s·tile B`` as this column
block's share of ``gb``. The shares are fp32 partial sums, added in a fixed order afterwards (``gb`` over the column
blocks, ``dB`` over the row slices; deterministic): ``(T, r)`` per column block and ``(O, r)`` per row slice, padded to
16 columns: with 256-column blocks the ``gb`` shares are 1/8 of ``g``'s bf16 bytes at r = 16, the ``dB`` ones less.

The fused LoRA / DoRA backward takes it from 4096 rows and 2048 output columns (``fused.DY_PASS``,
``ALIGNLAB_LORA_DY_PASS=0`` off; ``benchmarks/lora_dy_pass.py`` times it against the two cuBLAS GEMMs: 0.76-0.85x their
time on an H100 at 4096 and 14336 columns, slower at 1024). Reference: :func:`rank_grads_reference` (the two
products in torch).
"""

from __future__ import annotations

import torch

from alignlab._checks import is_int
from alignlab.kernels.dispatch import interpreted_bf16_dot, interpreting, use_triton, wants_grad
from alignlab.kernels.launch import cdiv, launch, next_power_of_2, sm_count

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None

__all__ = ["rank_grads", "rank_grads_reference"]

# (BLOCK_T, BLOCK_O, num_warps, num_stages) on a GPU. Swept on an H100 (2026-12-05, benchmarks/lora_dy_pass.py
# --sweep, 48 configurations at 8192 rows x 4096 / 1024 / 14336 columns, r = 16, bf16): this one was fastest over the
# three, 55.6 / 39.9 / 133.7 us per call against 58.7-61.4 / 37.4-40.0 / 131.9-138.7 for the next five (the former
# default, 64 x 128 with 8 warps: 60.7 / 39.4 / 153.1). Finishing the fp32 shares inside the kernel (the last program
# to arrive adding them) was slower at every configuration but k / v, and is not kept.
GPU_CONFIG = (32, 256, 4, 2)

if triton is not None:

    @triton.jit
    def _rank_grads_kernel(g_ptr, b_ptr, xa_ptr, gb_ptr, db_ptr, T, O, R, rows_per_split, stride_g, stride_b,
                           stride_xa, scale, IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
                           BLOCK_R: tl.constexpr):
        """Column block ``program_id(0)``, row slice ``program_id(1)``: writes its share of ``s·g B`` to
        ``gb[pid_o]`` ``(T, BLOCK_R)`` and its ``gᵀ xa`` rows to ``db[pid_t]`` ``(O, BLOCK_R)``, fp32."""
        pid_o = tl.program_id(0)
        pid_t = tl.program_id(1)
        ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        rr = tl.arange(0, BLOCK_R)
        o_ok = ro < O
        r_ok = rr < R
        b = tl.load(b_ptr + ro[:, None].to(tl.int64) * stride_b + rr[None, :], mask=o_ok[:, None] & r_ok[None, :],
                    other=0.0)
        acc = tl.zeros((BLOCK_O, BLOCK_R), dtype=tl.float32)
        t0 = pid_t * rows_per_split
        for dt in range(0, rows_per_split, BLOCK_T):
            rt = t0 + dt + tl.arange(0, BLOCK_T)
            t_ok = rt < T  # rows_per_split is a multiple of BLOCK_T: a tile never crosses into the next slice
            rows = rt[:, None].to(tl.int64)
            g = tl.load(g_ptr + rows * stride_g + ro[None, :], mask=t_ok[:, None] & o_ok[None, :], other=0.0)
            xa = tl.load(xa_ptr + rows * stride_xa + rr[None, :], mask=t_ok[:, None] & r_ok[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(tl.trans(g), xa, input_precision="ieee")
                part = tl.dot(g, b, input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(g), xa)
                part = tl.dot(g, b)
            tl.store(gb_ptr + (pid_o.to(tl.int64) * T + rows) * BLOCK_R + rr[None, :], part * scale,
                     mask=t_ok[:, None])
        tl.store(db_ptr + (pid_t.to(tl.int64) * O + ro[:, None]) * BLOCK_R + rr[None, :], acc, mask=o_ok[:, None])


def rank_grads_reference(g: torch.Tensor, b: torch.Tensor, xa: torch.Tensor, scale: float,
                         b_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s·g B in g's dtype, gᵀ xa in b_dtype)`` by two torch products (fp32 accumulation, each rounded once)."""
    gb = (g.float() @ b.float()) * scale
    db = g.float().T @ xa.float()
    return gb.to(g.dtype), db.to(b_dtype)


def rank_grads(g: torch.Tensor, b: torch.Tensor, xa: torch.Tensor, scale: float, b_dtype: torch.dtype,
               *, block_t: int | None = None, block_o: int | None = None, splits: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s·g B, gᵀ xa)`` from one read of ``g``: ``gb`` ``(T, r)`` in ``g``'s dtype, ``dB`` ``(O, r)`` in
    ``b_dtype``, both summed in fp32 and rounded once.

    Args:
        g: ``(T, O)`` output gradient, unit column stride; b: ``(O, r)``; xa: ``(T, r)`` (``s·x Aᵀ``), all of
            ``g``'s dtype (fp16 / bf16 / fp32) on one device; r <= 64.
        block_t, block_o, splits, num_warps, num_stages: the tile (powers of two, at least 16), the number of row
            slices and the launch options (tests, benchmarks); defaults: :data:`GPU_CONFIG` on a GPU (16 x 16 with
            4 warps under the interpreter), slices for about 4 programs per SM.

    Raises:
        ValueError: shapes that do not fit, r > 64, bad tiles. TypeError: dtypes that differ or are not floating
            (``b_dtype`` included).

    Where :func:`~alignlab.kernels.dispatch.use_triton` declines (CPU tensors outside the interpreter), for
    bf16 under the interpreter (whose bf16 ``tl.dot`` is wrong) and where autograd wants a gradient of ``g``,
    ``b`` or ``xa`` (the kernel writes plain tensors), the reference.
    """
    if (g.dim() != 2 or b.dim() != 2 or xa.dim() != 2 or b.shape[0] != g.shape[1]
            or xa.shape != (g.shape[0], b.shape[1])):
        raise ValueError(f"g must be (T, O), b (O, r) and xa (T, r), got {tuple(g.shape)}, {tuple(b.shape)}, "
                         f"{tuple(xa.shape)}")
    if not (g.dtype == b.dtype == xa.dtype) or g.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"g, b and xa must share one of fp16 / bf16 / fp32, got {g.dtype}, {b.dtype}, {xa.dtype}")
    if not (isinstance(b_dtype, torch.dtype) and b_dtype.is_floating_point):  # int64 truncated dB, silently
        raise TypeError(f"b_dtype must be a floating-point torch.dtype, got {b_dtype!r}")
    T, O = g.shape
    R = b.shape[1]
    if R > 64:
        raise ValueError(f"rank_grads takes r <= 64, got {R}")
    interp = interpreting()
    config = (16, 16, 4, None) if interp else GPU_CONFIG
    block_t = config[0] if block_t is None else block_t
    block_o = config[1] if block_o is None else block_o
    num_warps = config[2] if num_warps is None else num_warps
    num_stages = config[3] if num_stages is None else num_stages
    for name, v in (("block_t", block_t), ("block_o", block_o)):
        if not is_int(v) or v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16 or None, got {v!r}")
    for name, v in (("splits", splits), ("num_warps", num_warps), ("num_stages", num_stages)):
        if v is not None and (not is_int(v) or v < 1):
            raise ValueError(f"{name} must be a positive int or None, got {v!r}")
    block_t, block_o = int(block_t), int(block_o)  # NumPy ints: Triton takes Python ints
    if not use_triton(g, b, xa) or interpreted_bf16_dot(g) or wants_grad(g, b, xa):
        return rank_grads_reference(g, b, xa, scale, b_dtype)
    block_r = max(16, next_power_of_2(R))
    if T == 0 or O == 0 or R == 0:
        return g.new_zeros(T, R), torch.zeros(O, R, dtype=b_dtype, device=g.device)
    if g.stride(1) != 1:
        g = g.contiguous()
    b, xa = b.contiguous(), xa.contiguous()
    n_o = cdiv(O, block_o)
    if splits is None:
        sms = 8 if interp else sm_count(g.device.index)
        splits = max(1, min(cdiv(4 * sms, n_o), cdiv(T, block_t)))
    rows_per_split = cdiv(cdiv(T, int(splits)), block_t) * block_t
    splits = cdiv(T, rows_per_split)
    gb_part = torch.empty(n_o, T, block_r, dtype=torch.float32, device=g.device)
    db_part = torch.empty(splits, O, block_r, dtype=torch.float32, device=g.device)
    meta = dict(IEEE=g.dtype == torch.float32, BLOCK_T=block_t, BLOCK_O=block_o, BLOCK_R=block_r,
                num_warps=int(num_warps))
    if num_stages is not None:
        meta["num_stages"] = int(num_stages)
    launch(_rank_grads_kernel, (n_o, splits),
           (g, b, xa, gb_part, db_part, T, O, R, rows_per_split, g.stride(0), b.stride(0), xa.stride(0),
            float(scale)), meta)
    # contiguous (r, not the padded BLOCK_R, apart): where no cast copies them, the slices would keep BLOCK_R strides
    gb = gb_part.sum(0)[:, :R].to(g.dtype).contiguous()
    db = db_part.sum(0)[:, :R].to(b_dtype).contiguous()
    return gb, db
