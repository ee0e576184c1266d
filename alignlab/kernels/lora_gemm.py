"""A GEMM whose epilogue adds a LoRA layer's rank-r term: ``y = (x Wᵀ) ⊙ col_scale + bias + xa Bᵀ`` in one kernel.

The fused LoRA / DoRA layers add the adapter term to the base product with a second cuBLAS call
(``y.addmm_(xa, Bᵀ)``, and ``dx.addmm_(gb, A)`` in backward). That call is a rank-r GEMM, cheap in FLOPs, but it
reads and writes the whole ``(tokens, out)`` result once more: at 8192 rows and 4096 columns in bf16, 128 MiB and
~75 µs on an H100 next to the base GEMM's ~410 µs (``benchmarks/adapter_epilogue.py``). Here the rank-r product
is the last step of each output tile's reduction: after the ``K`` loop over ``x`` and ``W`` the program runs the
``r`` columns of ``xa`` against ``B``'s rows into the same fp32 accumulator, so the result is written once.

:func:`adapted_matmul` computes ``a @ b ⊙ col_scale + bias + c @ d`` for ``a (M, K)``, ``b (K, N)`` (any strides:
``Wᵀ`` in forward, ``W`` in backward), ``c (M, R)``, ``d (R, N)``; ``col_scale`` (DoRA's per-column scale of the
base product) and ``bias`` optional, each ``(N,)``. fp32 accumulation, one rounding to the inputs' dtype. It is
the plain tiled GEMM (grouped tile order for L2 reuse, Triton's software pipelining), so it earns its place only
where it beats cuBLAS + ``addmm_`` on the GPU at hand: ``fused.LORA_GEMM`` (``ALIGNLAB_LORA_GEMM``) decides, and
``benchmarks/adapter_epilogue.py --kernel [--sweep]`` measures. Reference: :func:`adapted_matmul_reference`.
"""

from __future__ import annotations

import torch

from alignlab._checks import is_int
from alignlab.kernels.dispatch import interpreted_bf16_dot, interpreting, use_triton, wants_grad
from alignlab.kernels.launch import cdiv, launch, next_power_of_2, options

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None
try:  # host-side tensor descriptors: Triton 3.4 on (pyproject allows older releases, which take the pointer kernel)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

__all__ = ["adapted_matmul", "adapted_matmul_reference", "rank_update_", "rank_update_reference", "measured_device",
           "GPU_CONFIG", "GPU_TMA", "RANK_UPDATE_CONFIG"]

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) on a GPU, with the tiles moved by tensor descriptors
# (GPU_TMA): the fastest of the 12 forms of ``benchmarks/adapter_epilogue.py --kernel --sweep`` for backward's dx on an
# H100 (2026-12-06, 8192 rows, bf16): 435 / 1447 us at q / gate against 467 / 1488 for cuBLAS + addmm_ (the same tiles
# by pointers: 557 / 1976; 4 warps on 128 x 128: 481 / 1667)
GPU_CONFIG = (128, 256, 64, 8, 8, 4)
# fp32 operands (direct calls; the fused layers send fp16 / bf16 only): half the K depth and N width, so that three
# stages of tiles fit Hopper's 227 KiB of shared memory (the bf16 tiles in fp32 would need ~288 KiB)
GPU_CONFIG_FP32 = (128, 128, 32, 8, 8, 3)
# (BLOCK_M, BLOCK_N, num_warps) of rank_update_ on a GPU: a first guess, timed as it is on an H200 (2026-12-06,
# benchmarks/rank_update.py: 86-100% of the copy rate but at 2048 x 1024) but not swept; fused.RANK_UPDATE stays off,
# as the QLoRA step did not gain from it
RANK_UPDATE_CONFIG = (64, 128, 4)
GPU_TMA = True  # the tensor-descriptor kernel (Hopper's bulk copies), 1.2-1.4x faster than pointers in the same sweep
_INTERPRETER_CONFIG = (16, 32, 16, 2, 4, 1)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if triton is not None:

    @triton.jit
    def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """``(row block, column block)`` of this program, tiles visited in groups of ``GROUP_M`` row blocks (the
        programs running together share ``b``'s column blocks in L2)."""
        pid = tl.program_id(0)
        per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
        return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m

    @triton.jit
    def _epilogue(acc, lm, rn, N, c_ptr, d_ptr, scale_ptr, bias_ptr, R, stride_cm, stride_dr, stride_dn,
                  HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_R: tl.constexpr):
        """``acc ⊙ col_scale + bias + c d`` for the tile's rows ``lm`` (clamped in bounds) and columns ``rn``
        (masked: a clamp would hide their contiguity from the compiler, and vectorized loads with it): the rank-r
        term into the same fp32 accumulator, ``BLOCK_R >= R`` columns with the padding masked to zero."""
        n_ok = rn < N
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < R
        c = tl.load(c_ptr + lm[:, None] * stride_cm + rr[None, :], mask=r_ok[None, :], other=0.0)
        d = tl.load(d_ptr + rr[:, None] * stride_dr + rn[None, :].to(tl.int64) * stride_dn,
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(c, d, acc, input_precision="ieee")
        else:
            acc = tl.dot(c, d, acc)
        return acc

    @triton.jit
    def _adapted_matmul_kernel(a_ptr, b_ptr, c_ptr, d_ptr, scale_ptr, bias_ptr, y_ptr, M, N, K, R,
                               stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_dr, stride_dn,
                               stride_ym, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
        """One ``(BLOCK_M, BLOCK_N)`` tile of ``y`` (:func:`_tile`), its tiles of ``a`` and ``b`` read by pointers."""
        pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # rows past the edge read row 0 again (in bounds, never stored): no row mask in the K loop; columns are
        # masked (b's columns are its contiguous dimension in backward, see _epilogue), and the K tail
        lm = tl.where(rm < M, rm, 0).to(tl.int64)
        n_ok = rn < N
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + lm[:, None] * stride_am + rk[None, :] * stride_ak
        b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :].to(tl.int64) * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = rk < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        acc = _epilogue(acc, lm, rn, N, c_ptr, d_ptr, scale_ptr, bias_ptr, R, stride_cm, stride_dr, stride_dn,
                        HAS_SCALE, HAS_BIAS, IEEE, BLOCK_R)
        y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


    @triton.jit
    def _adapted_matmul_tma_kernel(a_desc, b_desc, y_desc, c_ptr, d_ptr, scale_ptr, bias_ptr, M, N, K, R,
                                   stride_cm, stride_dr, stride_dn, B_KN: tl.constexpr, HAS_SCALE: tl.constexpr,
                                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
        """:func:`_adapted_matmul_kernel` with the ``a`` / ``b`` tiles read and the ``y`` tile written by tensor
        descriptors (Hopper's bulk tensor copies; the edges zero-filled on load and clipped on store). ``B_KN``:
        ``b_desc`` describes ``b`` as ``(K, N)`` row-major (backward's ``W``), else as ``(N, K)`` (forward's ``W``,
        read transposed)."""
        pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([off_m, k * BLOCK_K])
            if B_KN:
                b = b_desc.load([k * BLOCK_K, off_n])
            else:
                b = b_desc.load([off_n, k * BLOCK_K]).T
            acc = tl.dot(a, b, acc)
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        lm = tl.where(rm < M, rm, 0).to(tl.int64)
        acc = _epilogue(acc, lm, rn, N, c_ptr, d_ptr, scale_ptr, bias_ptr, R, stride_cm, stride_dr, stride_dn,
                        HAS_SCALE, HAS_BIAS, False, BLOCK_R)
        y_desc.store([off_m, off_n], acc.to(y_desc.dtype))


    @triton.jit
    def _rank_update_kernel(y_ptr, c_ptr, d_ptr, M, N, R, stride_ym, stride_cm, stride_dr, stride_dn,
                            IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        """One ``(BLOCK_M, BLOCK_N)`` tile of ``y += c d`` (a 1-D grid, column blocks fastest: no grid-axis limit): the
        tile read, the rank-r product added in fp32 (``BLOCK_R >= R`` columns, the padding masked to zero), written
        back once."""
        pid = tl.program_id(0)
        n_blocks = tl.cdiv(N, BLOCK_N)
        rm = (pid // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        m_ok, n_ok, r_ok = rm < M, rn < N, rr < R
        rows = rm[:, None].to(tl.int64)
        c = tl.load(c_ptr + rows * stride_cm + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        d = tl.load(d_ptr + rr[:, None].to(tl.int64) * stride_dr + rn[None, :].to(tl.int64) * stride_dn,
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        y_ptrs = y_ptr + rows * stride_ym + rn[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        acc = tl.load(y_ptrs, mask=ok, other=0.0).to(tl.float32)
        if IEEE:
            acc = tl.dot(c, d, acc, input_precision="ieee")
        else:
            acc = tl.dot(c, d, acc)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ok)


_MAJOR: dict = {}


def _major(device: torch.device) -> int:
    """The compute capability's major version of a CUDA ``device`` (0 on ROCm, which reports some AMD GPUs as 9.x),
    cached per device index."""
    if torch.version.hip is not None:
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    major = _MAJOR.get(index)
    if major is None:
        major = _MAJOR[index] = torch.cuda.get_device_capability(index)[0]
    return major


def measured_device(device: torch.device) -> bool:
    """Whether ``device`` is a GPU of the kind the kernel was measured to win on: an NVIDIA Hopper (compute capability
    9.x)."""
    return device.type == "cuda" and _major(device) == 9


def _tma_ready(t: torch.Tensor) -> bool:
    """Whether a 2-D tensor can be described to the bulk tensor copy engine: unit last stride, 16-byte aligned
    base and row stride."""
    size = t.element_size()
    return t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * size) % 16 == 0


def descriptors_apply(a: torch.Tensor, weight: torch.Tensor | None, n: int) -> bool:
    """Whether :func:`adapted_matmul` of ``a`` ``(M, K)`` with ``weight`` (``(N, K)`` read transposed, or
    ``(K, N)``; None: one the caller makes fresh, so aligned) into ``n`` output columns runs the descriptor kernel by
    default (the form measured to win; the pointer kernel lost to cuBLAS everywhere): :data:`GPU_TMA`, a Triton with
    host-side descriptors, 16-byte aligned rows (the output's too: ``n`` a multiple of 16 bytes' elements)."""
    return (GPU_TMA and TensorDescriptor is not None and a.dtype != torch.float32 and _tma_ready(a)
            and (weight is None or _tma_ready(weight)) and (n * a.element_size()) % 16 == 0)


def adapted_matmul_reference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor,
                             col_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None
                             ) -> torch.Tensor:
    """``a @ b ⊙ col_scale + bias + c @ d`` in fp32 (each product summed in fp32), rounded once to ``a``'s dtype."""
    y = a.float() @ b.float()
    if col_scale is not None:
        y = y * col_scale.float()
    if bias is not None:
        y = y + bias.float()
    return (y + c.float() @ d.float()).to(a.dtype)


def _matrices(**named: torch.Tensor) -> None:
    """TypeError for an argument that is not a tensor, ValueError for one that is not 2-D, each by its name."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got shape {tuple(t.shape)}")


def _check(a, b, c, d, col_scale, bias) -> None:
    _matrices(a=a, b=b, c=c, d=d)
    M, K = a.shape
    N = b.shape[1]
    if b.shape[0] != K or c.shape[0] != M or d.shape != (c.shape[1], N):
        raise ValueError(f"a must be (M, K), b (K, N), c (M, R) and d (R, N), got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}, {tuple(c.shape)}, {tuple(d.shape)}")
    if a.dtype not in _DTYPES or not (a.dtype == b.dtype == c.dtype == d.dtype):
        raise TypeError(f"a, b, c and d must share one of fp16 / bf16 / fp32, got {a.dtype}, {b.dtype}, "
                        f"{c.dtype}, {d.dtype}")
    for name, t in (("col_scale", col_scale), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (N,):
            raise ValueError(f"{name} must be a ({N},) tensor or None, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    for name, t in (("b", b), ("c", c), ("d", d), ("col_scale", col_scale), ("bias", bias)):
        if t is not None and t.device != a.device:
            raise ValueError(f"{name} is on {t.device} but a is on {a.device}: all must be on one device")


def adapted_matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor,
                   col_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                   config: tuple[int, int, int, int, int, int] | None = None, tma: bool | None = None
                   ) -> torch.Tensor:
    """``(a @ b) ⊙ col_scale + bias + c @ d`` by one kernel that writes the ``(M, N)`` result once.

    Args:
        a: ``(M, K)``; b: ``(K, N)``, any strides (a transposed weight is read in place); c: ``(M, R)``, unit
            column stride after ``contiguous()``; d: ``(R, N)``; all of one dtype (fp16 / bf16 / fp32), R <= 128.
        col_scale, bias: optional ``(N,)`` floating-point vectors: the base product's per-column scale, then the
            bias (both before the rank-r term is added; any float dtype, read as fp32).
        config: ``(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)`` (sweeps, tests); default
            :data:`GPU_CONFIG` on a GPU (:data:`GPU_CONFIG_FP32` for fp32), small tiles under the interpreter.
        tma: read ``a`` / ``b`` and write the result by tensor descriptors (Hopper's bulk copies; fp16 / bf16, rows
            16-byte aligned and a Triton with host-side descriptors, else the pointer kernel); default
            :data:`GPU_TMA` on NVIDIA Hopper and newer GPUs, False elsewhere and under the interpreter.

    Returns:
        ``(M, N)`` in ``a``'s dtype, accumulated in fp32 and rounded once; differentiable (the reference) where
        autograd wants a gradient of an input, a plain tensor otherwise.

    Raises:
        ValueError: shapes that do not fit, tensors on different devices, R > 128, a bad ``config``.
        TypeError: an argument that is not a tensor; dtypes that differ or are not fp16 / bf16 / fp32; a ``tma``
            that is not a bool.

    The reference (:func:`adapted_matmul_reference`) runs where :func:`~alignlab.kernels.dispatch.use_triton`
    declines, for bf16 under the interpreter, for empty shapes (nothing to launch) and where a gradient is wanted.
    The fused layers call it inside their autograd functions (no gradient wanted there).
    """
    _check(a, b, c, d, col_scale, bias)
    M, K = a.shape
    N, R = b.shape[1], c.shape[1]
    if R > 128:
        raise ValueError(f"adapted_matmul takes R <= 128 (the rank-r term is one tile), got {R}")
    if config is not None and (not isinstance(config, (tuple, list)) or len(config) != 6
                               or not all(is_int(v) and v >= 1 for v in config)
                               or any(v < 16 or v & (v - 1) for v in config[:3]) or config[4] & (config[4] - 1)):
        raise ValueError(f"config must be (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) with "
                         f"power-of-two blocks >= 16 and a power-of-two num_warps, got {config!r}")
    if tma is not None and not isinstance(tma, bool):
        raise TypeError(f"tma must be a bool or None, got {tma!r}")
    # the reference where autograd wants a gradient (the kernel writes a plain tensor), as every entry point does
    if (M == 0 or N == 0 or K == 0 or not use_triton(a, b, c, d) or interpreted_bf16_dot(a)
            or wants_grad(a, b, c, d, col_scale, bias)):
        return adapted_matmul_reference(a, b, c, d, col_scale, bias)
    if config is None:
        config = _INTERPRETER_CONFIG if interpreting() else GPU_CONFIG_FP32 if a.dtype == torch.float32 else GPU_CONFIG
    bm, bn, bk, group, warps, stages = (int(v) for v in config)
    c = c if c.stride(1) == 1 else c.contiguous()
    y = a.new_empty(M, N)
    scale = col_scale.contiguous() if col_scale is not None else y
    bias_ = bias.contiguous() if bias is not None else y
    meta = dict(HAS_SCALE=col_scale is not None, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                BLOCK_R=max(16, next_power_of_2(R)), GROUP_M=group, num_warps=warps, num_stages=stages)
    grid = (cdiv(M, bm) * cdiv(N, bn),)
    if tma is None:  # descriptors on Hopper (and newer) GPUs only
        tma = GPU_TMA and not interpreting() and _major(a.device) >= 9
    b_kn = b.stride(1) == 1  # (K, N) row-major, else read as (N, K) through bᵀ
    if (tma and TensorDescriptor is not None and a.dtype != torch.float32 and _tma_ready(a) and _tma_ready(y)
            and _tma_ready(b if b_kn else b.T)):
        descs = (TensorDescriptor.from_tensor(a, [bm, bk]),
                 TensorDescriptor.from_tensor(b, [bk, bn]) if b_kn else TensorDescriptor.from_tensor(b.T, [bn, bk]),
                 TensorDescriptor.from_tensor(y, [bm, bn]))
        _adapted_matmul_tma_kernel[grid](*descs, c, d, scale, bias_, M, N, K, R, c.stride(0), d.stride(0),
                                         d.stride(1), B_KN=b_kn, **meta, **options())
        return y
    meta["IEEE"] = a.dtype == torch.float32
    launch(_adapted_matmul_kernel, grid,
           (a, b, c, d, scale, bias_, y, M, N, K, R, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            c.stride(0), d.stride(0), d.stride(1), y.stride(0)), meta)
    return y


def rank_update_reference(y: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``y + c @ d`` as a new tensor, summed in fp32 and rounded once to ``y``'s dtype."""
    return (y.float() + c.float() @ d.float()).to(y.dtype)


def rank_update_(y: torch.Tensor, c: torch.Tensor, d: torch.Tensor, *,
                 config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``y += c @ d`` in place, the rank-r update a LoRA layer adds to its base product (``y.addmm_(xa, Bᵀ)``,
    ``dx.addmm_(gb, A)``), by one Triton kernel that reads and writes each ``y`` tile once; returns ``y``.

    Args:
        y: ``(M, N)`` with unit column stride (any row stride: a view into a wider buffer is written in place);
            c: ``(M, R)``; d: ``(R, N)``, any strides (``Bᵀ`` and ``A`` are read in place); one dtype of fp16 /
            bf16 / fp32 for all three, R <= 128.
        config: ``(BLOCK_M, BLOCK_N, num_warps)`` (sweeps, tests); default :data:`RANK_UPDATE_CONFIG` on a GPU,
            small tiles under the interpreter.

    The product is summed in fp32 and added to ``y`` before the one rounding, as ``addmm_`` does, in another
    order than cuBLAS's: the results agree with it to rounding. The write counts as an in-place op for autograd
    (``y``'s version counter moves, so a graph that saved ``y`` refuses to use it). ``y.addmm_(c, d)`` runs instead
    where :func:`~alignlab.kernels.dispatch.use_triton` declines, for bf16 under the interpreter, where autograd
    records the call, where ``c`` or ``d`` may share memory with ``y`` or rows of ``y`` overlap (tiles would read
    what others wrote, or race; ``addmm_`` copes or refuses) and for an inference tensor outside inference mode
    (which ``addmm_`` refuses).

    Raises:
        TypeError: an argument that is not a tensor; dtypes that differ or are not fp16 / bf16 / fp32.
        ValueError: shapes that do not fit (named), tensors on different devices, a ``y`` without unit column
            stride, R > 128, a bad ``config``.
    """
    _matrices(y=y, c=c, d=d)
    M, N = y.shape
    R = c.shape[1]
    if c.shape[0] != M:
        raise ValueError(f"c must be (M, R) with M = {M} (y's rows), got {tuple(c.shape)}")
    if d.shape != (R, N):
        raise ValueError(f"d must be (R, N) = ({R}, {N}) (c's columns, y's columns), got {tuple(d.shape)}")
    if R > 128:
        raise ValueError(f"c must have at most 128 columns (the rank; the rank-r term is one tile), got {R}")
    if y.dtype not in _DTYPES or not (y.dtype == c.dtype == d.dtype):
        raise TypeError(f"y, c and d must share one of fp16 / bf16 / fp32, got {y.dtype}, {c.dtype}, {d.dtype}")
    if c.device != y.device or d.device != y.device:
        raise ValueError(f"y, c and d must be on one device, got {y.device}, {c.device}, {d.device}")
    if N > 1 and y.stride(1) != 1:
        raise ValueError(f"y must have unit column stride (it is written in place), got strides {y.stride()}")
    if config is not None and (not isinstance(config, (tuple, list)) or len(config) != 3
                               or not all(is_int(v) and v >= 16 and not v & (v - 1) for v in config[:2])
                               or config[2] not in (1, 2, 4, 8, 16)):
        raise ValueError(f"config must be (BLOCK_M, BLOCK_N, num_warps): power-of-two blocks >= 16 and num_warps one "
                         f"of 1, 2, 4, 8, 16, got {config!r}")
    if M == 0 or N == 0 or R == 0:
        return y
    if (not use_triton(y, c, d) or interpreted_bf16_dot(y) or wants_grad(y, c, d)
            or (y.is_inference() and not torch.is_inference_mode_enabled())
            or (M > 1 and y.stride(0) < N) or torch._C._overlaps(y, c) or torch._C._overlaps(y, d)):
        return y.addmm_(c, d)
    bm, bn, warps = (int(v) for v in (config or ((16, 32, 4) if interpreting() else RANK_UPDATE_CONFIG)))
    c = c if c.stride(1) == 1 else c.contiguous()
    launch(_rank_update_kernel, (cdiv(M, bm) * cdiv(N, bn),),
           (y, c, d, M, N, R, y.stride(0), c.stride(0), d.stride(0), d.stride(1)),
           dict(IEEE=y.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=max(16, next_power_of_2(R)),
                num_warps=warps))
    torch.autograd.graph.increment_version(y)
    return y
