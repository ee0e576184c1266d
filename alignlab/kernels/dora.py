"""Triton kernels for DoRA over a frozen dense or NF4 base weight.

DoRA (Liu et al., arXiv 2402.09353) scales each output row of ``W + s·B A`` by
``m / ‖W + s·B A‖_row``. Two reductions are needed per training step:

* :func:`dora_row_norm` -- ``n_i = ‖W_i + s·B_i A‖₂``, ``(out,)`` in fp32. One program
  owns ``BLOCK_N`` rows and walks the input dimension: it loads a weight tile
  (dequantizing NF4 codes in registers, or reading the dense tile), adds its
  ``s·(B A)`` tile from one ``tl.dot`` of ``(BLOCK_N, r) x (r, BLOCK_K)``, and
  accumulates squares. The merged weight ``W + s·B A`` is never written: the pass
  reads 0.5 byte (NF4) or 2 bytes (bf16) per weight element and the small factors.
* :func:`column_dot` -- ``Σ_t u[t, i]·v[t, i]``, ``(out,)`` in fp32. Programs own a column
  block and a slice of rows and write fp32 partial sums, added in a fixed order
  (deterministic), so no ``(tokens, out)`` product is formed.
* :func:`dora_scales` -- the per-row factors of a forward call, ``g = m / n``, ``s·g`` and
  ``s·g ⊙ B`` rounded to the compute dtype, in one launch (four elementwise ops in torch,
  each costing more host time than GPU time on these ``(out,)`` and ``(out, r)`` vectors);
  :func:`dora_norm_and_scales` writes them from the row-norm kernel itself (one launch for both).
* :func:`magnitude_grad` -- the same reduction specialised to the magnitude gradient
  ``∂L/∂m_i = Σ_t ∂L/∂y[t, i] · (y[t, i] - bias_i) / m_i`` (``Σ_t ∂L/∂y`` alongside for the
  bias), finished in the kernel: one or two launches instead of a reduction plus five
  elementwise ops on ``(out,)`` vectors, which cost more host time than GPU time.

References (used on CPU, for float64, under ``ALIGNLAB_KERNELS=torch``, and wherever autograd wants a gradient
of an input: the kernels write plain tensors, so on the GPU the results were constants where the CPU's were
differentiable):
:func:`alignlab.adapters.dora.dora_weight_norm` on the dequantized weight, and
``(u.float() * v.float()).sum(0)``.
"""

from __future__ import annotations

import torch

from alignlab._checks import env_switch, is_int
from alignlab.kernels.dispatch import interpreted_bf16_dot, interpreting, use_triton, wants_grad
from alignlab.kernels.launch import cdiv, launch, next_power_of_2, sm_count
from alignlab.kernels.nf4_dequant import nf4_dequant
from alignlab.quant.nf4 import NF4Tensor

try:
    import triton
    import triton.language as tl

    from alignlab.kernels.nf4_matmul import _nf4_weight_tile, _nf4_weight_tile_blocks
    from alignlab.kernels.nf4_dequant import _state_args
    from alignlab.kernels.nf4_small import split_total
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None

__all__ = ["dora_row_norm", "dora_scales", "dora_norm_and_scales", "column_dot", "magnitude_grad"]


if triton is not None:

    @triton.jit
    def _row_norm_kernel(
        w_ptr, data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr, code2_ptr,
        a_ptr, b_ptr, out_ptr, N, K, R, stride_w, stride_a, stride_b, scale,
        m_ptr, bm_ptr, stride_bm, g_ptr, gs_ptr, bgs_ptr, ws_ptr, cnt_ptr, k_per, n_split,
        QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE: tl.constexpr,
        HAS_SHIFT: tl.constexpr, IEEE: tl.constexpr, FACTORS: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_SCALES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """out[n] = ‖W[n, :] + scale · B[n, :] @ A‖₂ for the BLOCK_N rows of this program; with FACTORS
        also DoRA's per-row factors from it (see _row_factors). With SPLIT, program (i, j) sums the squares of
        columns [j·k_per, (j + 1)·k_per) into the fp32 workspace row j; the last of a row block's n_split programs
        to arrive adds the partials in fixed order (deterministic) and finishes the rows (nf4_small.split_total)."""
        pid_n = tl.program_id(0)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        row_ok = rn < N
        b = tl.load(b_ptr + rn[:, None].to(tl.int64) * stride_b + rr[None, :],
                    mask=row_ok[:, None] & (rr[None, :] < R), other=0.0)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        k_lo, k_hi = 0, K
        if SPLIT:  # k_per: a multiple of BLOCK_K
            k_lo = tl.program_id(1) * k_per
            k_hi = tl.minimum(K, k_lo + k_per)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            ok = row_ok[:, None] & (rk[None, :] < K)
            if QUANT and BLOCK_SCALES:  # one scale lookup per quantization block (NORM_BLOCK_SCALES)
                w = _nf4_weight_tile_blocks(data_ptr, absmax_ptr, nested_ptr, offset_ptr, shift_ptr, code_ptr,
                                            code2_ptr, rn, k0, N, K, BLOCKSIZE, NESTED_BS, DOUBLE, HAS_SHIFT,
                                            BLOCK_N, BLOCK_K)
            elif QUANT:
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
        if SPLIT:
            last, acc = split_total(acc, rn, row_ok, ws_ptr, cnt_ptr, pid_n, tl.program_id(1), n_split, N)
            if last:
                _finish_rows(acc, rn, row_ok, out_ptr, m_ptr, bm_ptr, stride_bm, g_ptr, gs_ptr, bgs_ptr, R, scale,
                             FACTORS, BLOCK_R)
                tl.atomic_xchg(cnt_ptr + pid_n, 0)
        else:
            _finish_rows(acc, rn, row_ok, out_ptr, m_ptr, bm_ptr, stride_bm, g_ptr, gs_ptr, bgs_ptr, R, scale,
                         FACTORS, BLOCK_R)

    @triton.jit
    def _finish_rows(acc, rn, row_ok, out_ptr, m_ptr, bm_ptr, stride_bm, g_ptr, gs_ptr, bgs_ptr, R, scale,
                     FACTORS: tl.constexpr, BLOCK_R: tl.constexpr):
        """The rows' norms from their sums of squares, stored, and with FACTORS DoRA's factors (_row_factors)."""
        n = tl.sqrt(acc)
        tl.store(out_ptr + rn, n, mask=row_ok)
        if FACTORS:
            _row_factors(tl.where(row_ok, n, 1.0), rn, row_ok, m_ptr, bm_ptr, stride_bm, g_ptr, gs_ptr, bgs_ptr, R,
                         scale, BLOCK_R)

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


if triton is not None:

    @triton.jit
    def _magnitude_grad_kernel(gy_ptr, y_ptr, bias_ptr, m_ptr, part_ptr, dm_ptr, T, C, rows_per_split, stride_g,
                               stride_y, HAS_BIAS: tl.constexpr, FINISH: tl.constexpr, BLOCK_T: tl.constexpr,
                               BLOCK_C: tl.constexpr):
        """Per row slice: Σ_t gy·y and (with a bias) Σ_t gy, in fp32. With one slice (FINISH) it also
        writes ``dm = (Σ gy·y - bias·Σ gy) / m`` (0 where ``m == 0``) in ``m``'s dtype."""
        rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        split = tl.program_id(1)
        cmask = rc < C
        t0 = split * rows_per_split
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for dt in range(0, rows_per_split, BLOCK_T):
            rt = t0 + dt + tl.arange(0, BLOCK_T)
            ok = (rt[:, None] < T) & (rt[:, None] < t0 + rows_per_split) & cmask[None, :]
            rows = rt[:, None].to(tl.int64)
            g = tl.load(gy_ptr + rows * stride_g + rc[None, :], mask=ok, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + rows * stride_y + rc[None, :], mask=ok, other=0.0).to(tl.float32)
            acc += tl.sum(g * y, axis=0)
            if HAS_BIAS:
                acc_g += tl.sum(g, axis=0)
        if FINISH:
            _magnitude_finish(acc, acc_g, rc, cmask, bias_ptr, m_ptr, dm_ptr, HAS_BIAS)
        else:
            base = part_ptr + split.to(tl.int64) * (2 * C)
            tl.store(base + rc, acc, mask=cmask)
            if HAS_BIAS:
                tl.store(base + C + rc, acc_g, mask=cmask)

    @triton.jit
    def _magnitude_finish(acc, acc_g, rc, cmask, bias_ptr, m_ptr, dm_ptr, HAS_BIAS: tl.constexpr):
        if HAS_BIAS:
            acc -= tl.load(bias_ptr + rc, mask=cmask, other=0.0).to(tl.float32) * acc_g
        m = tl.load(m_ptr + rc, mask=cmask, other=1.0).to(tl.float32)
        dm = tl.where(m == 0.0, 0.0, acc / m)
        tl.store(dm_ptr + rc, dm.to(dm_ptr.dtype.element_ty), mask=cmask)

    @triton.jit
    def _magnitude_sum_kernel(part_ptr, bias_ptr, m_ptr, dm_ptr, C, splits, HAS_BIAS: tl.constexpr,
                              BLOCK_C: tl.constexpr):
        """Adds the row slices' partial sums in slice order, then finishes as above."""
        rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = rc < C
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for i in range(0, splits):
            base = part_ptr + i * (2 * C)
            acc += tl.load(base + rc, mask=cmask, other=0.0)
            if HAS_BIAS:
                acc_g += tl.load(base + C + rc, mask=cmask, other=0.0)
        _magnitude_finish(acc, acc_g, rc, cmask, bias_ptr, m_ptr, dm_ptr, HAS_BIAS)

    @triton.jit
    def _row_factors(n, rn, ok, m_ptr, b_ptr, stride_b, g_ptr, gs_ptr, bgs_ptr, R, scale, BLOCK_R: tl.constexpr):
        """g = m / n (0 where n == 0: dora_gain), gs = scale·g (fp32, rounded as torch rounds each op) and
        bgs = round(b·gs) for rows rn."""
        m = tl.load(m_ptr + rn, mask=ok, other=1.0).to(tl.float32)
        zero = n == 0.0
        g = tl.where(zero, 0.0, tl.math.div_rn(m, tl.where(zero, 1.0, n)))  # IEEE division, as torch's
        gs = (g * scale).to(tl.float32)  # fp32 as given; under torch.compile a float can arrive as fp64
        tl.store(g_ptr + rn, g, mask=ok)
        tl.store(gs_ptr + rn, gs, mask=ok)
        rr = tl.arange(0, BLOCK_R)
        tile = ok[:, None] & (rr[None, :] < R)
        rows = rn[:, None].to(tl.int64)
        b = tl.load(b_ptr + rows * stride_b + rr[None, :], mask=tile, other=0.0).to(tl.float32)
        tl.store(bgs_ptr + rows * R + rr[None, :], (b * gs[:, None]).to(bgs_ptr.dtype.element_ty), mask=tile)

    @triton.jit
    def _scales_kernel(m_ptr, norm_ptr, b_ptr, g_ptr, gs_ptr, bgs_ptr, N, R, stride_b, scale,
                       BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        """DoRA's per-row factors from given row norms (see _row_factors)."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = rn < N
        n = tl.load(norm_ptr + rn, mask=ok, other=1.0)
        _row_factors(n, rn, ok, m_ptr, b_ptr, stride_b, g_ptr, gs_ptr, bgs_ptr, R, scale, BLOCK_R)


def _check_float(**tensors) -> None:
    """``TypeError`` naming the first argument that is not a floating-point tensor (an integer ``m`` or ``W``
    would be truncated or read unscaled, not refused)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")


def _check_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")


def _check_factors(shape: tuple[int, ...], a: torch.Tensor, b: torch.Tensor) -> None:
    if len(shape) != 2:
        raise ValueError(f"weight must be (out, in), got shape {shape}")
    _check_float(a=a, b=b)
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
        ValueError / TypeError: a weight that is not 2-D, non-float tensors, factor shapes or dtypes that do
            not fit the weight.
    """
    return _row_norm(weight, a, b, scale, None)[0]


def dora_norm_and_scales(weight: torch.Tensor | NF4Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                         magnitude: torch.Tensor, b_master: torch.Tensor, dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(norm, g, s·g, s·g ⊙ B)``: :func:`dora_row_norm` then :func:`dora_scales` on it, in one launch on the
    kernel path (the factors are written by the programs that finish each row's norm).

    Args:
        weight, a, b, scale: as :func:`dora_row_norm` (``a``, ``b`` in the compute dtype).
        magnitude: ``m``, ``(out,)``; b_master: ``B`` as :func:`dora_scales` takes it (e.g. the fp32 master);
        dtype: the dtype of ``s·g ⊙ B``, a floating-point ``torch.dtype``.
    Raises:
        ValueError / TypeError: as :func:`dora_row_norm`; ``magnitude``/``b_master`` of the wrong shape or not
            float; ``dtype`` not a floating-point ``torch.dtype``.
    """
    return _row_norm(weight, a, b, scale, (magnitude, b_master, dtype))


def _row_norm(weight, a, b, scale: float, factors) -> tuple:
    from alignlab.adapters.dora import dora_weight_norm

    quant = isinstance(weight, NF4Tensor)
    if not quant:
        _check_float(weight=weight)
    shape = tuple(weight.shape)
    _check_factors(shape, a, b)
    if not quant and weight.stride(1) != 1:  # the kernel walks rows with one stride: a column-major view is copied
        weight = weight.contiguous()
    data = weight.data if quant else weight
    N, K = shape
    # the kernel reduces in fp32: a float64 weight takes the reference, which keeps float64; so does a weight without
    # input columns (every norm 0), whose split of the input dimension divided by zero
    fits = K > 0 and (K % 2 == 0 if quant else weight.dtype != torch.float64)
    if factors is not None:
        magnitude, b_master, dtype = factors
        _check_float(magnitude=magnitude, b_master=b_master)
        _check_dtype(dtype)
        if tuple(magnitude.shape) != (N,) or b_master.shape != b.shape:
            raise ValueError(f"magnitude must be ({N},) and b_master {tuple(b.shape)}, got {tuple(magnitude.shape)} "
                             f"and {tuple(b_master.shape)}")
        magnitude, b_master = magnitude.detach(), b_master.detach()
        fits = fits and b_master.dtype != torch.float64
    # the kernel's norm has no autograd graph: a gradient of a, b or a dense W takes the (differentiable) reference;
    # so do bf16 factors under the interpreter (their B A tile product is a tl.dot)
    if (not (triton is not None and fits and a.dtype != torch.float64 and use_triton(data, a, b))
            or wants_grad(a, b, None if quant else weight)
            or interpreted_bf16_dot(a, b)):
        dense = nf4_dequant(weight, torch.float32) if quant else weight  # the dequant kernel where it applies
        norm = dora_weight_norm(dense, a, b, scale)
        return (norm,) if factors is None else (norm, *dora_scales(norm, magnitude, b_master, scale, dtype))
    out = torch.empty(N, dtype=torch.float32, device=data.device)
    if factors is None:
        tail, more = (out, out, 0, out, out, out), ()  # FACTORS off: placeholders, never read
    else:
        R = b.shape[1]
        more = (torch.empty(N, dtype=torch.float32, device=data.device),
                torch.empty(N, 1, dtype=torch.float32, device=data.device),
                torch.empty(N, R, dtype=dtype, device=data.device))
        if b_master.stride(1) != 1:
            b_master = b_master.contiguous()
        tail = (magnitude.contiguous(), b_master, b_master.stride(0), *more)
    if N == 0:
        return (out, *more)
    a, b = a.contiguous(), b.contiguous()
    block_r = max(16, next_power_of_2(a.shape[0]))
    block_n, block_k, warps = INTERPRET_CONFIG if interpreting() else ROW_NORM_CONFIG
    bs = weight.blocksize if quant else 0
    block_scales = (NORM_BLOCK_SCALES and quant and bs & (bs - 1) == 0 and block_k % bs == 0 and K % bs == 0)
    state = _state_args(weight) if quant else (data,) * 7
    meta = (dict(BLOCKSIZE=weight.blocksize, NESTED_BS=weight.nested_blocksize, DOUBLE=weight.double_quant,
                 HAS_SHIFT=weight.shift is not None) if quant
            else dict(BLOCKSIZE=64, NESTED_BS=256, DOUBLE=False, HAS_SHIFT=False))
    blocks, iters = cdiv(N, block_n), cdiv(K, block_k)
    split = _norm_split(blocks, iters, data.device)
    k_per = cdiv(iters, split) * block_k
    split = cdiv(K, k_per)  # no empty slice
    if split > 1:
        from alignlab.kernels.nf4_small import _arrival_counters

        ws, cnt = torch.empty(split, N, dtype=torch.float32, device=data.device), _arrival_counters(data.device, blocks)
    else:
        ws = cnt = out  # placeholders, never read
    launch(_row_norm_kernel, (blocks, split),
           (data, data, *state[1:], a, b, out, N, K, a.shape[0], 0 if quant else data.stride(0), a.stride(0),
            b.stride(0), float(scale), *tail, ws, cnt, k_per, split),
           dict(QUANT=quant, IEEE=a.dtype == torch.float32, FACTORS=factors is not None, SPLIT=split > 1,
                BLOCK_SCALES=block_scales, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=warps,
                **meta))
    return (out, *more)


def _norm_split(blocks: int, iters: int, device: torch.device) -> int:
    """How many slices of the input dimension the row-norm kernel's programs split each row block into
    (:data:`NORM_SPLIT`): enough for about 4 programs per SM, each walking at least 2 column tiles, at most 16;
    1 when off, while torch.compile traces (the kept counters would be mutated graph inputs), or where the row
    blocks alone fill the GPU. The interpreter counts 8 SMs (so that small test shapes split)."""
    if not NORM_SPLIT or torch.compiler.is_compiling():
        return 1
    sms = 8 if interpreting() else sm_count(device.index)
    return max(1, min(cdiv(4 * sms, blocks), iters // 2, 16))


# (BLOCK_N, BLOCK_K, num_warps) of the row-norm kernel on a GPU. Swept on an H200 (2026-12-05, twelve configurations
# at the Llama-3-8B shapes, dora_norm_and_scales with blocksize-64 NF4, r = 16): this one took 51.6 / 51.9 / 118.9 /
# 154.4 us at 4096x4096 / 1024x4096 / 14336x4096 / 4096x14336; (16, 512, 4) 47.6 / 48.4 / 129.7 / 135.4; every
# larger BLOCK_N was slower (72-693 us). Far from the packed weight's copy time (6-20 us): see RESULTS.md, issue 18.
ROW_NORM_CONFIG = (16, 256, 4)
# Split each row block's input dimension over several programs (the row-norm kernel's SPLIT; see _norm_split). The
# same sweep showed the kernel bound by each program's serial walk where it has few programs: 1024 x 4096 (64
# programs) took as long as 4096 x 4096 (256), 51.9 against 51.6 us. On by default since timed (H100, 2026-12-05,
# benchmarks/dora_norm.py, bit-identical norms): 41.2 -> 14.1 us at 1024 x 4096, 46.7 -> 41.3 at 4096 x 4096,
# 145.7 -> 120.0 at 4096 x 14336, 14336 x 4096 unsplit (its row blocks fill the GPU); ALIGNLAB_DORA_NORM_SPLIT=0 off.
NORM_SPLIT = env_switch("ALIGNLAB_DORA_NORM_SPLIT", True)
# Load each NF4 quantization block's scale once per tile (nf4_matmul._nf4_weight_tile_blocks) instead of once per
# byte, where the blocks fit the tile (power-of-two blocksize dividing BLOCK_K and K). The H100 timing above put the
# kernel at 5-10x the packed weight's copy time. Compiled offline for sm_90 (Triton 3.6, 4096 x 4096, blocksize 64,
# double quantization, FACTORS): the K loop 892 -> 476 instructions, its global loads 82 -> 37, 96 registers both
# (RESULTS.md). On by default since timed (H100, 2026-12-06, benchmarks/dora_norm.py, split on, bit-identical
# norms): 41.2 -> 26.6 us at 4096 x 4096, 14.1 -> 10.8 at 1024 x 4096, 116.2 -> 72.2 at 14336 x 4096, 121.2 -> 81.9
# at 4096 x 14336; ALIGNLAB_DORA_NORM_BLOCK_SCALES=0 off.
NORM_BLOCK_SCALES = env_switch("ALIGNLAB_DORA_NORM_BLOCK_SCALES", True)
# (BLOCK_N, BLOCK_K, num_warps) under the Triton interpreter: small, for the CPU tests
INTERPRET_CONFIG = (16, 32, 4)


def dora_scales(norm: torch.Tensor, magnitude: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DoRA's per-row factors for one forward call: ``(g, s·g, s·g ⊙ B)``.

    ``g = m / norm`` (0 on a row whose norm is 0: :func:`alignlab.adapters.dora.dora_gain`) and ``s·g`` come back in ``norm``'s dtype (fp32, or fp64 for fp64 inputs), ``s·g`` as an
    ``(out, 1)`` column; ``s·g ⊙ B`` is formed from ``b`` (e.g. the fp32 master) in that dtype and rounded once
    to ``dtype``. Each value is rounded as the torch expression
    ``g = dora_gain(m, norm); gs = (g * s)[:, None]; (b.to(g.dtype) * gs).to(dtype)`` rounds it (the
    reference path, and the meaning of the kernel's result); the kernel makes all three in one launch.

    Args:
        norm: ``(out,)`` row norms ``‖W + s·B A‖`` (:func:`dora_row_norm`).
        magnitude: ``m``, ``(out,)``; b: ``(out, r)``; scale: ``s``; dtype: the compute dtype of ``s·g ⊙ B``.
    Raises:
        ValueError: shapes that do not fit.
        TypeError: ``norm``, ``magnitude`` or ``b`` not a floating-point tensor, ``dtype`` not a floating-point
            ``torch.dtype`` (an integer ``m`` was read as is and ``dtype=torch.int32`` truncated ``s·g ⊙ B``, which
            :func:`dora_norm_and_scales` refused).
    """
    _check_float(norm=norm, magnitude=magnitude, b=b)
    _check_dtype(dtype)
    out_f = norm.shape[0] if norm.dim() == 1 else -1
    if norm.dim() != 1 or tuple(magnitude.shape) != (out_f,) or b.dim() != 2 or b.shape[0] != out_f:
        raise ValueError(f"norm and magnitude must be (out,) and b (out, r), got norm {tuple(norm.shape)}, "
                         f"magnitude {tuple(magnitude.shape)} and b {tuple(b.shape)}")
    magnitude, b = magnitude.detach(), b.detach()
    if (not (triton is not None and norm.dtype == torch.float32 and b.dtype != torch.float64
             and use_triton(norm, magnitude, b)) or wants_grad(norm)):
        from alignlab.adapters.dora import dora_gain

        g = dora_gain(magnitude, norm)
        gs = (g * scale)[:, None]
        return g, gs, (b.to(g.dtype) * gs).to(dtype)
    R = b.shape[1]
    g = torch.empty(out_f, dtype=torch.float32, device=norm.device)
    gs = torch.empty(out_f, 1, dtype=torch.float32, device=norm.device)
    bgs = torch.empty(out_f, R, dtype=dtype, device=norm.device)
    if out_f == 0:
        return g, gs, bgs
    if b.stride(1) != 1:
        b = b.contiguous()
    block_r = max(2, next_power_of_2(R))
    block_n = 16 if interpreting() else max(16, min(128, 2048 // block_r))
    launch(_scales_kernel, (cdiv(out_f, block_n),),
           (magnitude.contiguous(), norm.contiguous(), b, g, gs, bgs, out_f, R, b.stride(0), float(scale)),
           dict(BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4))
    return g, gs, bgs


def _check_splits(splits) -> None:
    # checked on both paths: the reference ignores it, the kernel path divided by it
    if splits is not None and (not is_int(splits) or splits < 1):
        raise ValueError(f"splits must be a positive int or None, got {splits!r}")


def _column_plan(T: int, C: int, splits: int | None) -> tuple[int, int, int, int, int]:
    """Tiles of the column reductions: ``(block_t, block_c, column blocks, rows per split, splits)``.

    Default ``splits``: enough programs to fill the GPU, about 4 per SM-sized slice of columns, each at
    least 256 rows (one under the interpreter).
    """
    block_t, block_c = (8, 32) if interpreting() else (32, 256)
    col_blocks = cdiv(C, block_c)
    if splits is None:
        splits = 1 if interpreting() else max(1, min(cdiv(T, 256), cdiv(512, col_blocks)))
    rows_per_split = cdiv(cdiv(T, splits), block_t) * block_t
    return block_t, block_c, col_blocks, rows_per_split, cdiv(T, rows_per_split)


def column_dot(u: torch.Tensor, v: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """``Σ_t u[t, c] · v[t, c]`` for two ``(T, C)`` tensors, ``(C,)`` in fp32 (fp64 for fp64 inputs).

    ``splits`` (kernel path): how many row slices sum in parallel; default sized to fill the GPU.

    Raises:
        ValueError: the shapes differ or are not 2-D, ``splits`` not a positive int or None.
        TypeError: ``u`` or ``v`` not a floating-point tensor.
    """
    _check_splits(splits)
    _check_float(u=u, v=v)
    if u.dim() != 2 or u.shape != v.shape:
        raise ValueError(f"u and v must be 2-D of one shape, got {tuple(u.shape)} and {tuple(v.shape)}")
    T, C = u.shape
    if not (triton is not None and u.dtype != torch.float64 and use_triton(u, v)) or T == 0 or wants_grad(u, v):
        dt = torch.promote_types(u.dtype, torch.float32)
        return (u.to(dt) * v.to(dt)).sum(0)
    if u.stride(1) != 1:
        u = u.contiguous()
    if v.stride(1) != 1:
        v = v.contiguous()
    block_t, block_c, col_blocks, rows_per_split, splits = _column_plan(T, C, splits)
    part = torch.empty(splits, C, dtype=torch.float32, device=u.device)
    launch(_column_dot_kernel, (col_blocks, splits), (u, v, part, T, C, rows_per_split, u.stride(0), v.stride(0)),
           dict(BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4))
    return part[0] if splits == 1 else part.sum(0)


def magnitude_grad(gy: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, magnitude: torch.Tensor,
                   splits: int | None = None) -> torch.Tensor:
    """DoRA's magnitude gradient from the output: ``∂L/∂m = Σ_t gy ⊙ (y - bias) / m``, 0 where ``m == 0``.

    ``gy``, ``y``: ``(T, C)``; ``bias``: ``(C,)`` or None; ``magnitude``: ``(C,)``. Sums in fp32 (fp64 for
    fp64 inputs), the result in ``magnitude``'s dtype. The kernel path reads ``gy`` and ``y`` once and writes
    ``dm`` directly (one launch; two when the rows are split over programs to fill the GPU).

    Raises:
        ValueError: shapes that do not fit, ``splits`` not a positive int or None.
        TypeError: ``gy``, ``y``, ``magnitude`` or ``bias`` not a floating-point tensor.
    """
    _check_splits(splits)
    _check_float(gy=gy, y=y, magnitude=magnitude)
    if bias is not None:
        _check_float(bias=bias)
    if gy.dim() != 2 or gy.shape != y.shape:
        raise ValueError(f"gy and y must be 2-D of one shape, got {tuple(gy.shape)} and {tuple(y.shape)}")
    T, C = gy.shape
    if tuple(magnitude.shape) != (C,) or (bias is not None and tuple(bias.shape) != (C,)):
        raise ValueError(f"magnitude and bias must have shape ({C},), got {tuple(magnitude.shape)} and "
                         f"{None if bias is None else tuple(bias.shape)}")
    fp64 = torch.float64 in (gy.dtype, y.dtype, magnitude.dtype)
    if (not (triton is not None and not fp64 and use_triton(gy, y, magnitude)) or T == 0
            or wants_grad(gy, y, bias, magnitude)):
        dt = torch.float64 if fp64 else torch.float32
        g = gy.to(dt)
        acc = (g * y.to(dt)).sum(0)
        if bias is not None:
            acc = acc - bias.to(dt) * g.sum(0)
        m = magnitude.to(dt)
        return torch.where(m == 0, 0.0, acc / m).to(magnitude.dtype)
    if gy.stride(1) != 1:
        gy = gy.contiguous()
    if y.stride(1) != 1:
        y = y.contiguous()
    magnitude = magnitude.contiguous()
    block_t, block_c, col_blocks, rows_per_split, splits = _column_plan(T, C, splits)
    dm = torch.empty(C, dtype=magnitude.dtype, device=gy.device)
    part = dm if splits == 1 else torch.empty(splits, 2, C, dtype=torch.float32, device=gy.device)
    b = bias.contiguous() if bias is not None else magnitude  # the kernels index it as contiguous
    has_bias = bias is not None
    launch(_magnitude_grad_kernel, (col_blocks, splits),
           (gy, y, b, magnitude, part, dm, T, C, rows_per_split, gy.stride(0), y.stride(0)),
           dict(HAS_BIAS=has_bias, FINISH=splits == 1, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4))
    if splits > 1:
        launch(_magnitude_sum_kernel, (col_blocks,), (part, b, magnitude, dm, C, splits),
               dict(HAS_BIAS=has_bias, BLOCK_C=block_c, num_warps=4))
    return dm
