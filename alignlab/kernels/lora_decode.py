"""A LoRA layer's rank-r term at decode sizes, added into the base product by two small kernels.

For ``x (M, K)`` with a few rows (generation: one row per sequence), ``A (r, K)``, ``B (N, r)`` in any float dtype
(the fp32 master weights as they are) and the base product ``y (M, N)`` in the compute dtype ``c``::

    xa = c( s·x A_cᵀ )        (M, r)    K split over up to 64 programs (tl.dot), their fp32 partials added in a
                                        fixed order
    y  = c( y + xa B_cᵀ )     (M, N)    one program per block of 64 output columns (tl.dot)

where ``A_c``, ``B_c`` are the factors rounded to ``c`` and the sums run in fp32: the products the fused LoRA path
forms with torch ops (the factors cast per call, ``x Aᵀ`` by one GEMM with ``alpha = s``, ``B`` added in a second
GEMM's epilogue), but in two launches instead of a multi-tensor cast, two allocations and two cuBLAS calls, each of
which costs as much host time as a whole small kernel launch (``benchmarks/host_overhead.py``; RESULTS.md). The
sums run in another order than cuBLAS's, so the results agree with that path to rounding, not bit for bit.

Reference: :func:`lora_decode_reference` (the same two rounded products in torch), which CPU tensors take.
"""

from __future__ import annotations

import math

import torch

from alignlab.kernels import nf4_small
from alignlab.kernels.dispatch import interpreting, use_triton, wants_grad
from alignlab.kernels.launch import bind, cdiv, launch, next_power_of_2
from alignlab.kernels.nf4_small import _arrival_counters, _workspace

try:
    import triton
    import triton.language as tl

    from alignlab.kernels.nf4_small import launch_dependents
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None

__all__ = ["lora_decode_add_", "lora_decode_reference", "add_runner", "down_", "down_runner", "MAX_ROWS", "MAX_RANK"]

MAX_ROWS = 64  # rows of x one program of the down kernel holds (decode: one per sequence)
MAX_RANK = 64
_UP_COLUMNS = 64  # output columns per program of the up kernel

if triton is not None:

    @triton.jit
    def _lora_down_kernel(x_ptr, a_ptr, xa_ptr, ws_ptr, cnt_ptr, M, K, R, stride_x, stride_a, scale, k_per_prog,
                          n_prog, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_OUT: tl.constexpr, CHUNK: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
        """``xa = c(s·x A_cᵀ) (M, R)``, the sums in fp32, ``c`` = xa's dtype: program ``p`` multiplies its slice of K
        by ``tl.dot`` (``x`` and ``c(A)`` as they are: exact products, fp32 sums; rows and ranks padded to 16) and
        stores the partial; the last to arrive reads the partials ``CHUNK`` slices at a time as ``(CHUNK, M·R)``
        tiles, adds them in a fixed order (deterministic), scales, rounds to ``c`` and writes ``xa``.

        Why this form (RESULTS.md, issue 24): one program per rank row over all of K was latency-bound (13 / 37 µs
        at K = 4096 / 14336 on an H200); K split over many programs with a broadcast product summed across lanes took
        ~1000 instructions per 32 columns at 16 rows and added the partials one round trip each (4.4-23 µs on an
        H100, up to 2x this kernel's time).

        ``PDL``: the NF4 product launched after it as a programmatic dependent (``nf4_small.RANK_OVERLAP``) may start
        at once and run its K loop alongside; it waits for ``xa`` before its epilogue reads it."""
        if PDL:
            launch_dependents()
        pid = tl.program_id(0)
        rm = tl.arange(0, BLOCK_M)
        rr = tl.arange(0, BLOCK_R)
        m_ok = rm < M
        r_ok = rr < R
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        k_start = pid * k_per_prog
        k_end = tl.minimum(k_start + k_per_prog, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < k_end
            x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_x + rk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            a = tl.load(a_ptr + rr[:, None].to(tl.int64) * stride_a + rk[None, :], mask=r_ok[:, None] & k_ok[None, :],
                        other=0.0)
            a = a.to(xa_ptr.dtype.element_ty)  # the factor rounded to the compute dtype, as cast
            if IEEE:  # the Triton interpreter (its tl.dot is wrong for 16-bit operands)
                acc = tl.dot(x.to(tl.float32), tl.trans(a.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(a), acc)
        n_out = M * R
        tl.store(ws_ptr + pid * n_out + rm[:, None] * R + rr[None, :], acc, mask=m_ok[:, None] & r_ok[None, :])
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
        if arrived == n_prog - 1:
            ro = tl.arange(0, BLOCK_OUT)
            o_ok = ro < n_out
            rj = tl.arange(0, CHUNK)
            total = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
            for j0 in range(0, n_prog, CHUNK):
                j = j0 + rj
                part = tl.load(ws_ptr + j[:, None] * n_out + ro[None, :], mask=(j < n_prog)[:, None] & o_ok[None, :],
                               other=0.0, cache_modifier=".cg")
                total += tl.sum(part, axis=0)
            tl.store(xa_ptr + ro, (total * scale).to(xa_ptr.dtype.element_ty), mask=o_ok)
            tl.atomic_xchg(cnt_ptr, 0)

    @triton.jit
    def _lora_up_kernel(xa_ptr, b_ptr, y_ptr, M, N, R, stride_b, stride_y, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
        """Program ``i``: ``y[:, cols] = c(y[:, cols] + xa c(B[cols])ᵀ)`` for its ``BLOCK_N`` columns, the product by
        ``tl.dot`` (exact products, fp32 sums; rows and ranks padded to 16)."""
        i = tl.program_id(0)
        rm = tl.arange(0, BLOCK_M)
        rn = i * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        m_ok = rm < M
        n_ok = rn < N
        r_ok = rr < R
        xa = tl.load(xa_ptr + rm[:, None] * R + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rn[:, None].to(tl.int64) * stride_b + rr[None, :], mask=n_ok[:, None] & r_ok[None, :],
                    other=0.0)
        b = b.to(y_ptr.dtype.element_ty)  # the factor rounded to the compute dtype, as cast
        y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_y + rn[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        y = tl.load(y_ptrs, mask=ok, other=0.0).to(tl.float32)
        if IEEE:  # the Triton interpreter (its tl.dot is wrong for 16-bit operands)
            y = tl.dot(xa.to(tl.float32), tl.trans(b.to(tl.float32)), y, input_precision="ieee")
        else:
            y = tl.dot(xa, tl.trans(b), y)
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=ok)


def lora_decode_reference(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
                          ) -> torch.Tensor:
    """``y + c(s·x A_cᵀ) B_cᵀ`` as a new tensor, each product summed in fp32 and rounded once to ``c = y.dtype``
    (see the module docstring)."""
    out = y.clone()
    _reference_add_(out, x, a, b, scale)
    return out


def _reference_down(x: torch.Tensor, a: torch.Tensor, scale: float, c: torch.dtype) -> torch.Tensor:
    """The down product ``xa = c(s·x A_cᵀ)``, summed in fp32 and rounded once to ``c`` (differentiable)."""
    return (x.float() @ a.to(c).float().T * scale).to(c)


def _reference_add_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
                    ) -> torch.Tensor:
    """:func:`lora_decode_reference` written into ``y``; returns ``xa = c(s·x A_cᵀ)``."""
    c = y.dtype
    xa = _reference_down(x, a, scale, c)
    y.copy_((y.float() + xa.float() @ b.to(c).float().T).to(c))
    return xa


def applies(x: torch.Tensor, a: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether :func:`lora_decode_add_` runs its kernels for an input ``x (..., K)`` taken in ``dtype`` (default
    ``x.dtype``) and factor ``a``: 1 to ``MAX_ROWS`` rows in fp16 / bf16 on CUDA (the Triton path), a rank up to
    ``MAX_RANK``."""
    # the row count last: where shapes are symbolic (torch.compile's dynamic shapes, torch.export's dims) it is a
    # guard, which a call that fails another test need not add
    return ((dtype or x.dtype) in (torch.float16, torch.bfloat16) and a.shape[0] <= MAX_RANK and use_triton(x, a)
            and 0 < math.prod(x.shape[:-1]) <= MAX_ROWS)


def _up_launch(xa: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> tuple:
    """``(grid, args, meta)`` of one :func:`_lora_up_kernel` launch adding ``xa c(b)ᵀ`` into ``y`` (``tl.dot`` takes
    tiles of 16 rows and ranks or more), shared by :func:`add_` (which launches it) and :func:`add_runner` (which binds
    it)."""
    (M, N), R = y.shape, b.shape[1]
    meta = dict(BLOCK_M=max(next_power_of_2(M), 16), BLOCK_N=_UP_COLUMNS, BLOCK_R=max(next_power_of_2(R), 16),
                IEEE=interpreting(), num_warps=4)
    return (cdiv(N, _UP_COLUMNS),), (xa, b, y, M, N, R, b.stride(0), y.stride(0)), meta


def _check_shapes(x: torch.Tensor, a: torch.Tensor, y: torch.Tensor | None = None, b: torch.Tensor | None = None,
                  rows_only: bool = True) -> None:
    """ValueError / TypeError naming the argument where ``x (M, K)`` (``(..., K)`` without ``rows_only``), ``a (r,
    K)``, ``b (N, r)`` and ``y (M, N)`` do not fit together (the kernels read them as given: a wrong shape gave wrong
    numbers, or reads past a buffer, without an error)."""
    named = {"x": x, "a": a} if y is None else {"y": y, "x": x, "a": a, "b": b}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if (rows_only and x.dim() != 2) or x.dim() < 1 or a.dim() != 2 or a.shape[1] != x.shape[-1]:
        raise ValueError(f"x must be {'(M, K)' if rows_only else '(..., K)'} and a (r, K) with the same K, got "
                         f"{tuple(x.shape)} and {tuple(a.shape)}")
    if y is not None and (b.dim() != 2 or b.shape[1] != a.shape[0] or tuple(y.shape) != (x.shape[0], b.shape[0])):
        raise ValueError(f"b must be (N, r) = (N, {a.shape[0]}) and y (M, N) = ({x.shape[0]}, N), got b "
                         f"{tuple(b.shape)} and y {tuple(y.shape)}")


def lora_decode_add_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
                     ) -> torch.Tensor:
    """``y += s·(x Aᵀ) Bᵀ`` in place, with the factors rounded to ``y``'s dtype: ``y (M, N)``, ``x (M, K)`` in
    that dtype with rows at one stride and unit column stride, ``a (r, K)`` and ``b (N, r)`` in any float dtype;
    returns ``y``. Two kernels where :func:`applies` and ``x`` is in ``y``'s dtype, else
    :func:`lora_decode_reference`, written into ``y``, which also runs where autograd wants a gradient of any
    argument (the kernels write plain tensors). Shapes that do not fit are a ValueError naming them."""
    _check_shapes(x, a, y, b)
    if wants_grad(y, x, a, b):
        _reference_add_(y, x, a, b, scale)
        return y
    add_(y, x, a, b, scale)
    return y


def add_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`lora_decode_add_` on shapes the caller has checked (the fused layers), returning ``xa = c(s·x A_cᵀ)
    (M, r)`` instead of ``y`` (a backward's ``∂L/∂B`` needs it)."""
    if not applies(x, a) or x.dtype != y.dtype or y.stride(-1) != 1 or y.shape[1] == 0:
        return _reference_add_(y, x, a, b, scale)
    x = x if x.stride(-1) == 1 else x.contiguous()
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    xa = _down_split(x, a, scale)
    launch(_lora_up_kernel, *_up_launch(xa, b, y))
    return xa


# The down kernel (add_, down_ and their runners): K in slices of 256 columns (128 from 64 rows or ranks) over at most
# DOWN_PROGRAMS programs, or by default over at most 64 and at most max(8, 2048 / (rows x rank)) (both rounded up to
# powers of two): the last program reads the partials back in chunks of at most _CHUNK_ELEMENTS fp32 values, and
# with more than one chunk the tail costs more than the slices save (H100, benchmarks/qlora_decode.py
# --down-programs 8 16 32 64, RESULTS.md: at 16 rows and rank 16, 8 programs took 4.7 / 7.6 us at K = 4096 / 14336
# against 5.7 / 11.5 with 64; at 1 and 4 rows 32-64 programs were fastest)
DOWN_PROGRAMS: int | None = None
_CHUNK_ELEMENTS = 4096


def _split_layout(M: int, K: int, R: int) -> tuple[int, int, int, int, int]:
    """``(block_m, block_r, block_k, k_per_prog, n_prog)`` of :func:`_lora_down_kernel` for ``x (M, K)``, rank ``R``
    (``tl.dot`` takes tiles of 16 rows and ranks or more; the number of programs: :data:`DOWN_PROGRAMS`)."""
    block_m, block_r = max(next_power_of_2(M), 16), max(next_power_of_2(R), 16)
    block_k = 256 if max(block_m, block_r) <= 32 else 128
    cap = DOWN_PROGRAMS or min(64, max(8, 2048 // next_power_of_2(M * R)))
    n_prog = max(1, min(cdiv(K, block_k), cap))
    k_per_prog = cdiv(cdiv(K, n_prog), block_k) * block_k
    return block_m, block_r, block_k, k_per_prog, cdiv(K, k_per_prog) if K else 1


def _split_buffers(x: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(workspace, arrival counter, the kept workspace or None)`` for one split down launch: on CUDA a kept
    per-stream workspace and counter of its own, apart from the small-M NF4 kernels' (the NF4 product after it may run
    alongside: ``nf4_small.RANK_OVERLAP``; each launch leaves its counter at zero), else fresh ones."""
    pooled = _workspace(x.device, numel, "lora_down") if x.is_cuda else None
    ws = pooled if pooled is not None else torch.empty(numel, device=x.device, dtype=torch.float32)
    return ws, _arrival_counters(x.device, 1, last=True), pooled


def _split_launch(x: torch.Tensor, a: torch.Tensor, xa: torch.Tensor, scale: float) -> tuple:
    """``(grid, args, meta, pooled)`` of one :func:`_lora_down_kernel` launch writing ``xa``, shared by :func:`down_`
    (which launches it) and :func:`down_runner` (which binds it)."""
    M, K = x.shape
    R = a.shape[0]
    block_m, block_r, block_k, k_per_prog, n_prog = _split_layout(M, K, R)
    ws, cnt, pooled = _split_buffers(x, n_prog * M * R)
    args = (x, a, xa, ws, cnt, M, K, R, x.stride(0), a.stride(0), float(scale), k_per_prog, n_prog)
    block_out = max(16, next_power_of_2(M * R))
    meta = dict(BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_OUT=block_out,
                CHUNK=max(1, min(next_power_of_2(n_prog), _CHUNK_ELEMENTS // block_out)), IEEE=interpreting(),
                PDL=nf4_small.rank_overlap(x.device), num_warps=4)
    return (n_prog,), args, meta, pooled


def down_(x: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """``xa = c(s·x A_cᵀ)`` ``(..., r)`` alone for ``x (..., K)``, ``a (r, K)``, for a caller that adds ``xa c(B)ᵀ``
    itself (the NF4 small-M kernels' rank-term epilogue, ``small_m_matmul(..., rank_term=...)``), by one launch of
    the down kernel (K sliced over up to 64 programs, their fp32 partials added in a fixed order:
    :func:`_lora_down_kernel`) where :func:`applies`, else the reference's product. Shapes that do not fit are a
    ValueError naming them."""
    _check_shapes(x, a, rows_only=False)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if wants_grad(x, a):  # the kernel writes a plain tensor: the reference's product keeps the graph
        return _reference_down(x2, a, scale, x.dtype).view(*x.shape[:-1], a.shape[0])
    return down_rows(x2, a, scale).view(*x.shape[:-1], a.shape[0])


def down_rows(x: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`down_` for ``x (M, K)`` and ``a`` whose shapes the caller has checked (the fused layers)."""
    if not applies(x, a) or x.stride(-1) != 1:
        return _reference_down(x, a, scale, x.dtype)
    return _down_split(x, a if a.stride(-1) == 1 else a.contiguous(), scale)


def _down_split(x: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """The down kernel's launch for :func:`down_` and :func:`add_`, on inputs it takes (unit column
    strides)."""
    xa = torch.empty(x.shape[0], a.shape[0], device=x.device, dtype=x.dtype)
    grid, args, meta, _ = _split_launch(x, a, xa, scale)
    launch(_lora_down_kernel, grid, args, meta)
    return xa


def down_runner(x: torch.Tensor, a: torch.Tensor, scale: float):
    """``run(x) -> xa``: :func:`down_` for calls of this very layout at the host cost of one bare launch and one
    allocation, or None where the kernel does not run or no launcher can be bound (before :func:`down_` ran this
    layout once, which compiles). Valid as :func:`add_runner`'s runners are (``a`` this tensor at this address,
    ``scale`` this value, ``x`` of this layout, the current stream)."""
    if not (applies(x, a) and x.stride(-1) == 1 and a.stride(-1) == 1) or torch.cuda.is_current_stream_capturing():
        return None
    M, R = x.shape[0], a.shape[0]
    grid, args, meta, pooled = _split_launch(x, a, torch.empty(M, R, device=x.device, dtype=x.dtype), scale)
    if pooled is None:
        return None
    down = bind(_lora_down_kernel, grid, args, meta)
    if down is None:
        return None
    stream = torch._C._cuda_getCurrentRawStream(x.get_device())
    ws, cnt, tail = args[3], args[4], args[5:]
    a_ptr, ws_ptr, cnt_ptr = a.data_ptr(), ws.data_ptr(), cnt.data_ptr()

    def run(xx: torch.Tensor) -> torch.Tensor:
        xa = xx.new_empty((M, R))
        down(stream, (xx.data_ptr(), a_ptr, xa.data_ptr(), ws_ptr, cnt_ptr, *tail))
        return xa

    run.keep = (a, ws, cnt)  # the kept workspace stays allocated while this runner lives (a larger call replaces it)
    return run


def add_runner(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float):
    """``(run, xa)``, ``run(y, x) -> xa``: :func:`lora_decode_add_` for calls of this very layout at the host cost of
    two bare launches (``alignlab.kernels.launch.bind``), and ``xa`` of the call made on the way (below); None where
    its kernels do not run or no launcher can be bound.

    Valid while ``a`` and ``b`` are these tensors at these addresses and ``scale`` this value, for ``x`` of ``x``'s
    shape, strides, dtype, device and 16-byte alignment class (any leading dimensions collapsing onto one row
    stride; given as ``(M, K)`` here), a fresh contiguous ``y`` of ``y``'s shape and dtype, on the stream current
    now: the caller keys its cache by those (the fused QLoRA decode path). Runs :func:`lora_decode_add_` once into
    ``y`` (which compiles the kernels), so ``y`` must be the base product of ``x``: it then holds this call's result.
    """
    if not (applies(x, a) and y.stride(-1) == 1 and y.shape[1] > 0 and x.stride(-1) == 1 and a.stride(-1) == 1
            and b.stride(-1) == 1 and y.is_contiguous()):
        return None
    xa = add_(y, x, a, b, scale)
    down = down_runner(x, a, scale)
    grid, args, meta = _up_launch(xa, b, y)
    up = bind(_lora_up_kernel, grid, args, meta)
    if down is None or up is None:
        return None
    stream = torch._C._cuda_getCurrentRawStream(x.get_device())
    up_tail = args[3:]
    b_ptr = b.data_ptr()

    def run(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        xa = down(xx)
        up(stream, (xa.data_ptr(), b_ptr, yy.data_ptr(), *up_tail))
        return xa

    run.keep = down.keep
    return run, xa
