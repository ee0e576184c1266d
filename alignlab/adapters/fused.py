"""Fused LoRA and DoRA linears over a frozen dense or NF4 base: one autograd function each.

LoRA (Hu et al., arXiv 2106.09685) and DoRA (Liu et al., arXiv 2402.09353)::

    LoRA:  y = x Wᵀ + bias + s·(x Aᵀ) Bᵀ
    DoRA:  y = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias,   g = m / ‖W + s·B A‖_row  (norm constant in backward)

``W (out, in)`` is a dense tensor or an :class:`~alignlab.quant.nf4.NF4Tensor` (QLoRA /
QDoRA); ``A (r, in)``, ``B (out, r)``, ``m (out,)``.

Precision (autocast semantics). The products run in the *compute dtype* ``c``: the
dense weight's dtype, or the NF4 layer's ``compute_dtype``. ``A``, ``B`` are cast to
``c`` per call (``r·(in + out)`` elements; fp32 master weights stay fp32) and every
GEMM accumulates in fp32. Gradients of ``A``, ``B``, ``m`` come back in their own
dtype; on CUDA the factor-gradient GEMMs write fp32 directly (``torch.mm(...,
out_dtype=)``), so an fp32 master gets an unrounded gradient. For the exact fp32
adapter branch, :class:`~alignlab.adapters.lora.LoRALinear` has ``exact_fp32=True``
(it then skips this path). A LoRA call with 1 to 16 rows in fp16 / bf16 on CUDA (generation, small batches) adds its
rank-r term with :func:`alignlab.kernels.lora_decode.lora_decode_add_` instead (the factors read in their own dtype,
no cast; the same products to rounding, ``DECODE_KERNELS``); with a gradient through :func:`decode_apply`, and over
an NF4 base by launchers a layer keeps per input layout (:func:`decode_runner`).

What is saved for backward: ``x`` (in ``c``; the same tensor object the caller holds
when it is already in ``c``), ``x Aᵀ (tokens, r)`` (LoRA: ``s·x Aᵀ``, the scale taken in by the GEMM
that forms it), ``A``/``B`` in ``c`` and, for DoRA,
the output ``y`` (the magnitude gradient is ``Σ_t ∂L/∂y ⊙ (y - bias) / m``). Never
``W + s·B A``, a dequantized weight, or an fp32 ``(tokens, out)`` temporary. DoRA's
``g`` is folded into the dequantized weight and into ``B``: no pass over the output.

Backward per call: ``dx = dy W + (s·dy B) A`` (the NF4 weight is dequantized again, into
one temporary, or read by the small-M kernel; DoRA folds ``g`` into that dequantization),
``dA = (s·dy B)ᵀ x``, ``dB = dyᵀ (s·x Aᵀ)`` (DoRA: rows times ``s·g``), ``dm`` by one
kernel (:func:`alignlab.kernels.dora.magnitude_grad`); a dense weight or bias that requires grad gets it too.
Over an NF4 base at 4096 rows or more, the rank-r term of whichever pass copies the narrower operand goes inside
the base GEMM instead of a second pass over its output (:func:`_widen`; ``WIDE_K``, on by default).

Second derivatives: a backward with ``create_graph=True`` (Hessian-vector products, gradient penalties,
MAML) forms the same gradients from differentiable ops on the inputs as given (``x`` with its graph, the
master ``A``, ``B``, ``m``; the input is saved as the caller's tensor where it already is in the compute
dtype, at no extra memory), so their own gradients are true; where only a cast copy of ``x`` was kept it
raises ``RuntimeError`` (``exact_fp32=True`` takes the unfused path). ``torch.func`` transforms (``grad``,
``vmap``, ``jvp``), which cannot transform these functions, get the same math as plain ops.
"""

from __future__ import annotations

import math

import torch

from alignlab._checks import env_switch
from alignlab.kernels import lora_gemm
from alignlab.kernels.dispatch import MM_OUT_DTYPE, functorch_active, use_triton
from alignlab.kernels.lora_decode import add_ as lora_decode_add_xa
from alignlab.kernels.lora_decode import add_runner as lora_decode_runner
from alignlab.kernels.lora_decode import applies as lora_decode_applies
from alignlab.kernels.lora_decode import down_rows as lora_decode_down
from alignlab.kernels.lora_decode import down_runner as lora_down_runner
from alignlab.kernels.nf4_dequant import nf4_dequant
from alignlab.kernels.nf4_matmul import (DECODE_ROWS, SMALL_M, decode_matmul, kept_runner, nf4_matmul, nf4_matmul_t,
                                         rank_matmul, runner_key, takes_rank_term)
from alignlab.kernels.nf4_small import small_m_runner
from alignlab.quant import linear as _qlinear
from alignlab.quant.nf4 import NF4Tensor

__all__ = ["lora_linear", "lora_linear_op", "dora_linear", "dora_linear_op", "functorch_active"]

# The rank-r term inside an NF4 base's GEMM, by widening its reduction dimension by r (see _widen): on by default
# (H100, 2026-12-05: benchmarks/adapter_epilogue.py and qlora_step.py, see RESULTS.md); ALIGNLAB_LORA_WIDE_K=0 off
WIDE_K = env_switch("ALIGNLAB_LORA_WIDE_K", True)
WIDE_K_MIN_ROWS = 4096  # below this the step is host-bound, and the widened form costs one launch more
# Backward's s·dy B and dyᵀ (s·x Aᵀ) from one read of dy (alignlab.kernels.lora_grads.rank_grads) instead of two
# GEMMs, on by default from DY_PASS_MIN_ROWS rows and DY_PASS_MIN_COLS output columns (ALIGNLAB_LORA_DY_PASS=0 off).
# H100, 2026-12-05, benchmarks/lora_dy_pass.py at 8192 rows, r = 16, bf16 (RESULTS.md): 65 -> 56 us at 4096
# columns, 175 -> 134 at 14336; at 1024 (k / v) 24 against 40 (the kernel 7.7 us of GPU time, the call host-bound),
# hence the column bound; below 4096 rows the step is host-bound, as for WIDE_K
DY_PASS = env_switch("ALIGNLAB_LORA_DY_PASS", True)
DY_PASS_MIN_ROWS, DY_PASS_MIN_COLS = 4096, 2048
_HALF = (torch.float16, torch.bfloat16)
# Calls at decode sizes (up to lora_decode.MAX_ROWS rows, fp16 / bf16 on CUDA; generation, small batches): the rank-r
# term by the two kernels of alignlab.kernels.lora_decode, which read the factors in their own dtype, instead of the
# per-call cast, x Aᵀ and the addmm_ epilogue (three cuBLAS-sized host costs); on by default, ALIGNLAB_LORA_DECODE=0
# off (see RESULTS.md, issue 24's fourteenth pass). Calls that need a gradient take them through decode_apply.
DECODE_KERNELS = env_switch("ALIGNLAB_LORA_DECODE", True)
# A QLoRA layer's three decode launchers kept per input layout (decode_runner, LoRALinear._decode_run): on by default
# since its CUDA tests passed and its host time was measured (H100, 2026-12-06, benchmarks/host_overhead.py --m 1:
# one QLoRA layer call at one row 107 -> 56 us with x needing grad, 94 -> 42 us under no_grad, against 29 us for a
# bf16 nn.Linear; RESULTS.md); ALIGNLAB_LORA_DECODE_RUNNERS=0 (read at import) or this attribute set to False: off
DECODE_RUNNERS = env_switch("ALIGNLAB_LORA_DECODE_RUNNERS", True)
# Over an NF4 base at decode rows, the rank-r term added in the small-M NF4 kernel's epilogue (s·x Aᵀ by the decode
# down kernel, then one NF4 launch for x Wᵀ + bias + (s·x Aᵀ) Bᵀ, rounded once) instead of a third launch that reads
# and writes y again (lora_decode's up kernel): two launches per QLoRA decode call, kept launchers or not. H100,
# 2026-12-07 (benchmarks/qlora_decode.py, RESULTS.md): 5-9 us less host time per call than the three launches, GPU
# time within -1.4 / +1.8 us of theirs at the twelve shape / row cases (both with the split down kernel). On by
# default; ALIGNLAB_LORA_RANK_EPILOGUE=0 (read at import) or this attribute set to False: the three launches
RANK_EPILOGUE = env_switch("ALIGNLAB_LORA_RANK_EPILOGUE", True)
# The base GEMM with the rank-r term in its own epilogue (alignlab.kernels.lora_gemm.adapted_matmul: one Triton
# kernel, the output written once) instead of cuBLAS + the addmm_ pass. "auto" (the default) takes it where it was
# measured to win (H100, 2026-12-06, benchmarks/adapter_epilogue.py --kernel --sweep and lora.py --lora-gemm at 8192
# rows, bf16; RESULTS.md): backward's dx = dy W + (s·dy B) A (q: 467 -> 435 us, gate: 1488 -> 1447) where the widened
# form does not apply, and the forward of a dense base with DoRA's column scale (folded into the epilogue instead of
# a scaled copy of W); on Hopper GPUs, from LORA_GEMM_MIN_ROWS rows and LORA_GEMM_MIN_DIM along the reduction and the
# output, for r <= LORA_GEMM_MAX_RANK (measured at r = 16, tested on the GPU up to 20). Other forwards lost (q: 462 ->
# 484 us). ALIGNLAB_LORA_GEMM=1 (or this attribute set to True) takes it for every fp16 / bf16 forward and dx from
# LORA_GEMM_FORCED_MIN_ROWS rows (r <= 128), before the widened form (A/B runs); 0 turns it off.
LORA_GEMM = env_switch("ALIGNLAB_LORA_GEMM", "auto", choices=("auto",))
# The addmm_ that adds the rank-r term into a fresh base product (forward's y, backward's dx) by
# alignlab.kernels.lora_gemm.rank_update_ (one Triton kernel reading and writing each tile once) instead of cuBLAS: at
# batch 1 of the QLoRA step (2048 rows) cuBLAS's K = 16 update kernels ran at ~40% of the copy bandwidth (27 us for a
# 2048 x 4096 bf16 result on an H100, 11 us at the roofline; RESULTS.md). Timed on an H200 (2026-12-06): 1.3-1.7x
# faster than addmm_ (86-100% of the copy rate) except at 2048 x 1024 (0.7-0.9x), and in the QLoRA step it saved 0.13 /
# 0.16 ms of 29 / 108 ms of GPU time (batch 1 / 4), within the runs' spread: off by default.
# ALIGNLAB_LORA_RANK_UPDATE=1 (read at import) or this attribute set to True takes it for fp16 / bf16 results of more
# than RANK_UPDATE_MIN_ROWS rows
RANK_UPDATE = env_switch("ALIGNLAB_LORA_RANK_UPDATE", False)
RANK_UPDATE_MIN_ROWS = 16
LORA_GEMM_MIN_ROWS, LORA_GEMM_MIN_DIM, LORA_GEMM_MAX_RANK = 8192, 4096, 32
LORA_GEMM_FORCED_MIN_ROWS = 1024


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t (..., n)`` as ``(tokens, n)``. Not ``reshape(-1, n)``: with ``n`` 0 (a layer without inputs or outputs)
    the ``-1`` is ambiguous and torch raises. ``math.prod``, not ``torch.Size.numel``: under ``torch.export`` the
    latter made a dynamic batch or sequence dimension a constant."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; no call into torch when it already is (a no-op ``Tensor.to`` still costs ~1-2 us of
    host time, and these run several times per layer and step)."""
    return t if t.dtype == dtype else t.to(dtype)


def _mm_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` returned in ``dtype``: written in fp32 by the GEMM itself on CUDA, else rounded then cast."""
    if a.dtype == dtype:
        return a @ b
    if a.is_cuda and MM_OUT_DTYPE and dtype == torch.float32:
        return torch.mm(a, b, out_dtype=dtype)
    return (a @ b).to(dtype)


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · (a @ b)`` by one GEMM (``alpha = scale``, ``beta = 0``: the empty output is never read),
    rounded once; a scale of 1 is a plain product."""
    if scale == 1.0:
        return a @ b
    return a.new_empty(a.shape[0], b.shape[1]).addmm_(a, b, beta=0, alpha=scale)


def _base_forward(x2: torch.Tensor, weight, bias: torch.Tensor | None, row_scale: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``(x2 Wᵀ) ⊙ row_scale (+ bias)`` as a fresh ``(tokens, out)`` tensor in ``x2``'s dtype.

    ``row_scale`` (``(out,)``, fp32 or fp64) is folded into the weight where that is the smaller
    operand (for NF4 at more than 16 rows: into the one dequantization, at no extra pass), else
    applied to the product.
    """
    if isinstance(weight, NF4Tensor):
        bias = None if bias is None else bias.to(x2.dtype)
        rows = x2.shape[0]
        if row_scale is not None and rows > SMALL_M:
            w = nf4_dequant(weight, x2.dtype, row_scale.float())
            return x2 @ w.T if bias is None else torch.addmm(bias, x2, w.T)
        # decode-sized inputs through the launcher kept on the packed weight (~one launch of host work, as
        # NF4Linear's own decode path); the product is the same either way
        product = decode_matmul if (rows <= DECODE_ROWS and x2.is_cuda and x2.dtype in _HALF and
                                    _qlinear.DECODE_LAUNCHERS and not torch.compiler.is_compiling()) else nf4_matmul
        if row_scale is None:
            return product(x2, weight, bias)
        y = product(x2, weight).mul_(row_scale.to(x2.dtype))
        return y if bias is None else y.add_(bias)
    if weight.dtype != x2.dtype:  # a dense weight in another dtype (an explicit dtype, autocast): cast per call
        weight = weight.to(x2.dtype)
    if row_scale is not None:
        if x2.shape[0] >= weight.shape[1]:
            weight = weight * row_scale.to(weight.dtype)[:, None]
        else:
            y = (x2 @ weight.T).mul_(row_scale.to(x2.dtype))
            return y if bias is None else y.add_(bias.to(x2.dtype))
    return x2 @ weight.T if bias is None else torch.addmm(bias.to(x2.dtype), x2, weight.T)


def _base_input_grad(g: torch.Tensor, weight, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``(g ⊙ row_scale) W`` as a fresh ``(tokens, in)`` tensor; ``row_scale`` (``(out,)``, fp32 or fp64) is
    folded into whichever operand is smaller (for NF4, into the one dequantization)."""
    if isinstance(weight, NF4Tensor):
        if g.shape[0] <= SMALL_M:  # decode-sized: the small-M kernels read the packed weight directly
            return nf4_matmul_t(g if row_scale is None else g * row_scale.to(g.dtype), weight)
        return g @ nf4_dequant(weight, g.dtype, None if row_scale is None else row_scale.float())
    if weight.dtype != g.dtype:
        weight = weight.to(g.dtype)
    if row_scale is None:
        return g @ weight
    if g.shape[0] >= weight.shape[1]:
        return g @ (weight * row_scale.to(weight.dtype)[:, None])
    return (g * row_scale.to(g.dtype)) @ weight


def _widen(weight, rows: int, copied: int, output: int, r: int) -> bool:
    """Whether the adapter term enters an NF4 base's GEMM by a reduction dimension widened by ``r`` (``WIDE_K``)::

        forward   y  = [x | s·x Aᵀ] [W | B]ᵀ       instead of  y = x Wᵀ,  then y += (s·x Aᵀ) Bᵀ
        backward  dx = [dy | s·dy B] [W ; A]       instead of  dx = dy W, then dx += (s·dy B) A

    The second form's ``addmm_`` reads and writes the whole ``(rows, output)`` result once more; the first copies
    the ``(rows, copied)`` operand instead (``torch.cat``), and the widened weight is the dequantization's
    temporary anyway (written into the first columns / rows of a wider buffer, the ``r`` adapter columns / rows
    copied after). So it moves fewer bytes where the copied operand is narrower than the output: forward of
    up-projections (gate / up), backward of down-projections (k / v / down); one launch more per call. ``r`` a
    multiple of 16 keeps the widened rows' stride a multiple of 16 elements: aligned for the GEMM, and known to the
    dequantization kernel's strided store as such (Triton specializes an int argument on divisibility by 16).
    Callers test ``WIDE_K`` first, so that the default form pays nothing for this."""
    return (rows >= WIDE_K_MIN_ROWS and copied < output and r % 16 == 0 and isinstance(weight, NF4Tensor)
            and rows > SMALL_M)


def _epilogue_gemm(x2: torch.Tensor, weight, n: int, r: int, forward: bool, dense_scaled: bool = False) -> bool:
    """Whether the base product of ``x2`` ``(rows, k)`` and ``weight`` (``n`` output columns) and the rank-r term run
    as one :func:`~alignlab.kernels.lora_gemm.adapted_matmul` (``LORA_GEMM``, which callers test first; see there for
    the "auto" rule, which also asks for operands the descriptor kernel takes: an NF4 weight is dequantized into a fresh
    one). ``dense_scaled``: a forward over a dense weight with DoRA's column scale. Not while dynamo traces (the custom
    ops that carry compiled layers run it as plain eager code)."""
    if torch.compiler.is_compiling() or x2.dtype not in _HALF:  # first: no shape guard while dynamo traces
        return False
    if LORA_GEMM is True:
        return x2.shape[0] >= LORA_GEMM_FORCED_MIN_ROWS and r <= 128 and use_triton(x2)
    return ((not forward or dense_scaled) and x2.shape[0] >= LORA_GEMM_MIN_ROWS and r <= LORA_GEMM_MAX_RANK
            and min(x2.shape[1], n) >= LORA_GEMM_MIN_DIM and use_triton(x2) and lora_gemm.measured_device(x2.device)
            and lora_gemm.descriptors_apply(x2, None if isinstance(weight, NF4Tensor) else weight, n))


def _add_rank(y: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``y += c @ d`` in place (the rank-r term into a fresh base product): ``addmm_``, or
    :func:`~alignlab.kernels.lora_gemm.rank_update_` where ``RANK_UPDATE`` is on (not while dynamo traces)."""
    if (RANK_UPDATE and not torch.compiler.is_compiling() and y.shape[0] > RANK_UPDATE_MIN_ROWS  # no shape guard
            and y.dtype in _HALF and c.shape[1] <= 128 and use_triton(y)):
        return lora_gemm.rank_update_(y, c, d)
    return y.addmm_(c, d)


def _base_weight(weight, dtype: torch.dtype, row_scale: torch.Tensor | None) -> torch.Tensor:
    """The base weight ``(out, in)`` in ``dtype`` with ``row_scale`` folded into its rows (an NF4 weight: in its one
    dequantization; a dense one: a cast and a scaled copy where needed)."""
    if isinstance(weight, NF4Tensor):
        return nf4_dequant(weight, dtype, None if row_scale is None else row_scale.float())
    weight = _to(weight, dtype)
    return weight if row_scale is None else weight * row_scale.to(dtype)[:, None]


def _adapted_forward(x2: torch.Tensor, weight, bias, xa: torch.Tensor, b: torch.Tensor,
                     row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``(x2 Wᵀ) ⊙ row_scale (+ bias) + xa bᵀ`` as a fresh ``(tokens, out)`` tensor: the base GEMM, then the
    rank-r term added in a second GEMM's epilogue (``addmm_``), or both in one GEMM (:func:`_widen`,
    :func:`_epilogue_gemm`)."""
    if LORA_GEMM and _epilogue_gemm(x2, weight, b.shape[0], xa.shape[1], True,
                                    row_scale is not None and not isinstance(weight, NF4Tensor)):
        if isinstance(weight, NF4Tensor):  # the row scale folded into the dequantization
            return lora_gemm.adapted_matmul(x2, _base_weight(weight, x2.dtype, row_scale).T, xa, b.T, None, bias)
        return lora_gemm.adapted_matmul(x2, _to(weight, x2.dtype).T, xa, b.T, row_scale, bias)
    if WIDE_K and _widen(weight, x2.shape[0], x2.shape[1], b.shape[0], xa.shape[1]) and \
            x2.shape[1] % weight.blocksize == 0:
        n_in, r = x2.shape[1], xa.shape[1]
        wk = x2.new_empty(b.shape[0], n_in + r)
        nf4_dequant(weight, x2.dtype, None if row_scale is None else row_scale.float(), out=wk[:, :n_in])
        wk[:, n_in:].copy_(b)
        xk = torch.cat((x2, xa), 1)
        return xk @ wk.T if bias is None else torch.addmm(bias.to(x2.dtype), xk, wk.T)
    return _add_rank(_base_forward(x2, weight, bias, row_scale), xa, b.T)


def _adapted_input_grad(g: torch.Tensor, weight, gb: torch.Tensor, a: torch.Tensor,
                        row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``(g ⊙ row_scale) W + gb a`` as a fresh ``(tokens, in)`` tensor (the forms of :func:`_widen` and
    :func:`_epilogue_gemm`)."""
    wide = WIDE_K and _widen(weight, g.shape[0], g.shape[1], a.shape[1], gb.shape[1])
    # "auto" leaves the widened form where it applies (measured to win there: k / v / down); True takes the kernel
    if LORA_GEMM and (LORA_GEMM is True or not wide) and _epilogue_gemm(g, weight, a.shape[1], gb.shape[1], False):
        return lora_gemm.adapted_matmul(g, _base_weight(weight, g.dtype, row_scale), gb, a)
    if wide:
        n_out, r = g.shape[1], gb.shape[1]
        wk = g.new_empty(n_out + r, a.shape[1])
        nf4_dequant(weight, g.dtype, None if row_scale is None else row_scale.float(), out=wk[:n_out])
        wk[n_out:].copy_(a)
        return torch.cat((g, gb), 1) @ wk
    return _add_rank(_base_input_grad(g, weight, row_scale), gb, a)


def _as_compute(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, cast):
    x2 = _to(_rows(x), dtype)
    if cast is not None:  # the caller's cached casts of a and b (LoRALinear keeps them per parameter version)
        return x2, cast[0], cast[1]
    return x2, a.to(dtype), b.to(dtype)


def _lora_out(x2: torch.Tensor, weight, bias, ac: torch.Tensor, bc: torch.Tensor, scale: float):
    """``(x2 Wᵀ + bias + (s·x2 Aᵀ) Bᵀ, s·x2 Aᵀ)``; the adapter term added in the second GEMM's epilogue.

    ``s`` goes into the first GEMM's ``alpha``: backward's ``∂L/∂B = ∂L/∂yᵀ (s·x Aᵀ)`` then needs no
    scaling pass either."""
    xa = _scaled_mm(x2, ac.T, scale)
    return _adapted_forward(x2, weight, bias, xa, bc), xa


class _LoRAFn(torch.autograd.Function):
    """``y = x Wᵀ + bias + s·(x Aᵀ) Bᵀ``: the adapter term is added in the second GEMM's epilogue
    (``addmm_``), forward and ``dx`` alike, so neither branch costs an extra pass over the output."""

    @staticmethod
    def forward(ctx, x, dense_w, bias, a, b, scale, quant_w, dtype, cast, out_dtype):
        x2, ac, bc = _as_compute(x, a, b, dtype, cast)
        y, xa = _lora_out(x2, quant_w if quant_w is not None else dense_w, bias, ac, bc, scale)
        # saved whatever needs_input_grad says: x2 is the caller's tensor, xa is (tokens, r); and torch.compile
        # (seen with torch 2.11) traces forward with needs_input_grad all False, which would drop the gradients.
        # x itself where x2 is a view of it (the same memory), and the original a, b, bias: a backward with
        # create_graph=True differentiates through them (_lora_backward_graph)
        ctx.x_is_input = _is_view_of(x2, x)
        ctx.save_for_backward(x if ctx.x_is_input else x2, dense_w, ac, bc, xa, a, b, bias)
        ctx.quant_w, ctx.scale, ctx.x_shape, ctx.x_dtype = quant_w, scale, x.shape, x.dtype
        ctx.ab_dtypes = (a.dtype, b.dtype)
        ctx.b_scaled = cast[2] if cast is not None and len(cast) > 2 else None  # a cached s·B, if the caller has one
        return _to(y.view(*x.shape[:-1], y.shape[-1]), out_dtype)

    @staticmethod
    def backward(ctx, gy):
        # grad mode is on in a backward only under create_graph=True (a Hessian-vector product, a gradient penalty):
        # the gradients are then made of differentiable ops on the saved inputs, so their own gradients are true
        backward = _lora_backward_graph if torch.is_grad_enabled() else _lora_backward
        if _autocast_dtype(gy) is None:
            return backward(ctx, gy)
        with torch.autocast(gy.device.type, enabled=False):  # run under autocast: products stay in the compute dtype
            return backward(ctx, gy)


def _is_view_of(x2: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``x2`` (``x`` reshaped to rows, in the compute dtype) shares ``x``'s memory: saving ``x`` then costs
    nothing more, and ``x2`` is ``_rows(x)`` again in backward."""
    return x2.dtype == x.dtype and x2.data_ptr() == x.data_ptr()


def _saved_rows(ctx, x: torch.Tensor) -> torch.Tensor:
    """The ``(tokens, in)`` input in the compute dtype from what forward saved (``x`` itself, or its cast copy)."""
    return _rows(x) if ctx.x_is_input else x


def _graph_input(ctx, x: torch.Tensor, what: str) -> torch.Tensor:
    """The saved input for a backward with ``create_graph=True``, which must be the caller's tensor (its graph)."""
    if not ctx.x_is_input:
        raise RuntimeError(
            f"a backward with create_graph=True through the fused {what} function needs its input with its graph, "
            f"but only a copy of the {ctx.x_dtype} input was kept (cast to the compute dtype, or made contiguous: it "
            "saves memory); for second derivatives set exact_fp32=True on the layer (LoRAConfig(exact_fp32=True): "
            "the unfused path), or give the input in the compute dtype")
    return _rows(x)


def _graph_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """The base weight in ``dtype`` for a differentiable backward (an NF4 weight dequantized: a constant)."""
    if isinstance(weight, NF4Tensor):
        return nf4_dequant(weight, dtype)
    return weight.to(dtype)


def _backward_graph(ctx, gy, x, dense_w, bias, a, b, dtype: torch.dtype, magnitude=None, norm=None,
                    need: tuple | None = None) -> tuple:
    """The fused functions' gradients from differentiable ops on the inputs as given (``x`` with its graph, the
    master ``A``, ``B``, ``m``), for a backward with ``create_graph=True``: the same products in the compute dtype
    ``dtype`` as :func:`_lora_backward` / :func:`_dora_backward`, but a second derivative (a Hessian-vector product)
    sees how each gradient depends on ``x``, ``A``, ``B``, ``m`` and ``∂L/∂y``. Before, the detached casts made the
    gradients constants there: the second derivatives were silently wrong.

    LoRA without ``magnitude``. DoRA with ``magnitude`` and the (constant) ``norm``: with ``z = x Wᵀ + s·(x Aᵀ) Bᵀ``
    and the gain ``g = m / norm``, ``∂L/∂z = ∂L/∂y ⊙ g`` and ``∂L/∂m = Σ_t ∂L/∂y ⊙ z / norm`` (0 on a row whose norm
    is 0, :func:`alignlab.adapters.dora.dora_gain`). Returns ``(dx, dW, dbias, dA, dB, dm)``, None where not needed
    (``need``: which, in that order; default the function's ``needs_input_grad``, laid out as :class:`_DoRAFn`'s).
    """
    from alignlab.adapters.dora import dora_gain

    dora, scale, need = magnitude is not None, ctx.scale, ctx.needs_input_grad if need is None else need
    x2 = _graph_input(ctx, x, "DoRA" if dora else "LoRA").to(dtype)
    weight = _graph_weight(ctx.quant_w if ctx.quant_w is not None else dense_w, dtype)
    ac, bc = a.to(dtype), b.to(dtype)
    gy = _rows(gy).to(dtype)
    gz = gy * dora_gain(magnitude, norm).to(dtype) if dora else gy  # ∂L/∂z; the gain is differentiable in m
    gb = (gz @ bc) * scale  # (tokens, r)
    dx = dw = dbias = da = db = dm = None
    if need[0]:
        dx = (gz @ weight + gb @ ac).view(ctx.x_shape).to(ctx.x_dtype)
    if need[1]:
        dw = (gz.T @ x2).to(dense_w.dtype)
    if need[2]:
        dbias = gy.sum(0).to(bias.dtype)
    if need[3]:
        da = (gb.T @ x2).to(a.dtype)
    dm_needed = dora and need[5]
    xa = x2 @ ac.T if need[4] or dm_needed else None
    if need[4]:
        db = ((gz.T @ xa) * scale).to(b.dtype)
    if dm_needed:
        z = x2 @ weight.T + (xa @ bc.T) * scale
        inv = dora_gain(torch.ones_like(norm), norm)  # 1 / norm, 0 where the norm is 0
        dm = ((gy.to(inv.dtype) * z.to(inv.dtype)).sum(0) * inv).to(magnitude.dtype)  # summed in fp32, as forward
    return dx, dw, dbias, da, db, dm


def _lora_backward_graph(ctx, gy):
    """:class:`_LoRAFn`'s backward with ``create_graph=True`` (:func:`_backward_graph`)."""
    x, dense_w, ac, _, _, a, b, bias = ctx.saved_tensors
    return *_backward_graph(ctx, gy, x, dense_w, bias, a, b, ac.dtype)[:5], None, None, None, None, None


def _lora_backward(ctx, gy):
    """:class:`_LoRAFn`'s backward, with autocast off (a module-level function: torch.compile traces it)."""
    x, dense_w, ac, bc, xa, *_ = ctx.saved_tensors
    x2 = _saved_rows(ctx, x)
    weight = ctx.quant_w if ctx.quant_w is not None else dense_w
    g = _to(_rows(gy), ac.dtype)
    need = ctx.needs_input_grad
    dx, da, db = _lora_grads(g, x2, weight, ac, bc, xa, ctx.scale, ctx.b_scaled, need[0], need[3], need[4],
                             *ctx.ab_dtypes)
    dw = (g.T @ x2).to(dense_w.dtype) if need[1] else None
    dbias = g.sum(0) if need[2] else None
    return None if dx is None else _to(dx.view(ctx.x_shape), ctx.x_dtype), dw, dbias, da, db, *(None,) * 5


def _lora_grads(g: torch.Tensor, x2: torch.Tensor, weight, ac: torch.Tensor, bc: torch.Tensor, xa: torch.Tensor,
                scale: float, b_scaled: torch.Tensor | None, need_x: bool, need_a: bool, need_b: bool,
                a_dtype: torch.dtype, b_dtype: torch.dtype) -> tuple:
    """``(dx (tokens, in) in the compute dtype, ∂L/∂A in a_dtype, ∂L/∂B in b_dtype)``, None where not needed, from
    ``g = ∂L/∂y (tokens, out)`` and ``xa = s·x Aᵀ``; ``b_scaled``: a cached ``s·B`` or None."""
    db = None
    if need_b and _dy_pass(g, xa):  # both rank-r products of dy from one read of it
        from alignlab.kernels.lora_grads import rank_grads

        gb, db = rank_grads(g, bc if b_scaled is None else b_scaled, xa, scale if b_scaled is None else 1.0, b_dtype)
    else:  # (tokens, r): s·dy B, the gradient reaching x Aᵀ (one GEMM with alpha = s, or a cached s·B)
        gb = g @ b_scaled if b_scaled is not None else _scaled_mm(g, bc, scale)
    dx = _adapted_input_grad(g, weight, gb, ac) if need_x else None
    da = _mm_to(gb.T, x2, a_dtype) if need_a else None
    if need_b and db is None:
        db = _mm_to(g.T, xa, b_dtype)  # xa is s·x Aᵀ
    return dx, da, db


def _dy_pass(g: torch.Tensor, xa: torch.Tensor) -> bool:
    """Whether the backward takes :func:`alignlab.kernels.lora_grads.rank_grads` (``DY_PASS``, its Triton path)."""
    if (not DY_PASS or xa.shape[1] > 64 or g.dtype not in (torch.float16, torch.bfloat16, torch.float32)
            or g.shape[0] < DY_PASS_MIN_ROWS or g.shape[1] < DY_PASS_MIN_COLS):
        return False  # (an fp64 layer keeps the GEMMs)
    return use_triton(g, xa)


def _dora_out(x2, weight, bias, ac, b, magnitude, scale: float, dtype: torch.dtype, norm, factors=None):
    """DoRA's output and what its backward reuses: ``(y, x Aᵀ, g, s·g, s·g ⊙ B)``, ``g = m / norm``.

    ``factors``: ``(g, s·g, s·g ⊙ B)`` where the row-norm kernel already wrote them, else made here from ``norm``:
    g in fp32 (fp64 for fp64 inputs); s·g folded into B once, rounded once from the master B (forward's epilogue
    and backward's x Aᵀ gradient); one kernel for the three (:func:`alignlab.kernels.dora.dora_scales`)."""
    if factors is None:
        from alignlab.kernels.dora import dora_scales

        factors = dora_scales(norm, magnitude, b, scale, dtype)
    g, gs, bgs = factors
    xa = x2 @ ac.T
    return _adapted_forward(x2, weight, bias, xa, bgs, g), xa, g, gs, bgs


class _DoRAFn(torch.autograd.Function):
    """``y = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias``, ``g = m / norm`` with ``norm`` a constant.

    ``g`` is folded into the weight (the NF4 dequantization or the smaller GEMM operand) and into
    ``B``, so ``y`` comes out of one GEMM plus the adapter's ``addmm`` epilogue, with no pass over
    ``(tokens, out)`` to scale it. The magnitude gradient needs ``z = (y - bias) / g``:
    ``∂L/∂m = Σ_t ∂L/∂y ⊙ z / norm = Σ_t ∂L/∂y ⊙ (y - bias) / m``, so ``y`` is saved (often the
    very tensor the next op saves too) and no ``z`` is formed. A row with ``m`` exactly 0 has lost
    ``z`` (its output is the bias alone): its magnitude gradient is returned as 0, where the formula (the
    unfused path, PEFT) gives ``Σ_t ∂L/∂y ⊙ z / norm`` -- so such a row does not train here. Recovering it
    would take a host-side check (a sync) or a second base GEMM per call.
    """

    @staticmethod
    def forward(ctx, x, dense_w, bias, a, b, magnitude, scale, quant_w, dtype, norm, cast, factors, out_dtype):
        x2, ac, _ = _as_compute(x, a, b, dtype, cast)
        y, xa, g, gs, bgs = _dora_out(x2, quant_w if quant_w is not None else dense_w, bias, ac, b, magnitude,
                                      scale, dtype, norm, factors)
        # saved whatever needs_input_grad says (see _LoRAFn.forward); x, a, b and the (out,) norm also serve a
        # backward with create_graph=True (_dora_backward_graph)
        ctx.x_is_input = _is_view_of(x2, x)
        ctx.save_for_backward(x if ctx.x_is_input else x2, dense_w, ac, bgs, xa, y, magnitude, bias, g, gs, a, b,
                              norm)
        ctx.quant_w, ctx.x_shape, ctx.x_dtype, ctx.scale = quant_w, x.shape, x.dtype, scale
        ctx.dtypes = (a.dtype, b.dtype, magnitude.dtype)
        return _to(y.view(*x.shape[:-1], y.shape[-1]), out_dtype)

    @staticmethod
    def backward(ctx, gy):
        backward = _dora_backward_graph if torch.is_grad_enabled() else _dora_backward  # as _LoRAFn.backward
        if _autocast_dtype(gy) is None:
            return backward(ctx, gy)
        with torch.autocast(gy.device.type, enabled=False):  # as _LoRAFn.backward
            return backward(ctx, gy)


def _dora_backward_graph(ctx, gy):
    """:class:`_DoRAFn`'s backward with ``create_graph=True`` (:func:`_backward_graph`)."""
    x, dense_w, ac, _, _, _, magnitude, bias, _, _, a, b, norm = ctx.saved_tensors
    grads = _backward_graph(ctx, gy, x, dense_w, bias, a, b, ac.dtype, magnitude, norm)
    return *grads, None, None, None, None, None, None, None


def _dora_backward(ctx, gy):
    """:class:`_DoRAFn`'s backward, with autocast off (see :func:`_lora_backward`)."""
    x, dense_w, ac, bgs, xa, y, magnitude, bias, g, gs, *_ = ctx.saved_tensors
    x2 = _saved_rows(ctx, x)
    weight = ctx.quant_w if ctx.quant_w is not None else dense_w
    gy = _to(_rows(gy), ac.dtype)
    need = ctx.needs_input_grad
    dx, da, db, dm = _dora_grads(gy, x2, weight, ac, bgs, xa, y, magnitude, bias, g, gs, need[0], need[3], need[4],
                                 need[5], *ctx.dtypes[:2])
    dw = ((gy * g.to(gy.dtype)).T @ x2).to(dense_w.dtype) if need[1] else None
    dbias = gy.sum(0) if need[2] else None
    return (None if dx is None else _to(dx.view(ctx.x_shape), ctx.x_dtype), dw, dbias, da, db, dm,
            *(None,) * 7)


def _dora_grads(gy: torch.Tensor, x2: torch.Tensor, weight, ac: torch.Tensor, bgs: torch.Tensor, xa: torch.Tensor,
                y: torch.Tensor, magnitude: torch.Tensor, bias, g: torch.Tensor, gs: torch.Tensor, need_x: bool,
                need_a: bool, need_b: bool, need_m: bool, a_dtype: torch.dtype, b_dtype: torch.dtype) -> tuple:
    """``(dx (tokens, in) in the compute dtype, ∂L/∂A, ∂L/∂B, ∂L/∂m)``, None where not needed, from
    ``gy = ∂L/∂y (tokens, out)`` in the compute dtype and what :func:`_dora_out` returned."""
    from alignlab.kernels.dora import magnitude_grad

    db = None
    if need_b and _dy_pass(gy, xa):  # as in _lora_grads
        from alignlab.kernels.lora_grads import rank_grads

        gb, db = rank_grads(gy, bgs, xa, 1.0, torch.promote_types(b_dtype, torch.float32))
    else:
        gb = gy @ bgs  # (tokens, r): the gradient reaching x Aᵀ
    dx = _adapted_input_grad(gy, weight, gb, ac, g) if need_x else None
    da = _mm_to(gb.T, x2, a_dtype) if need_a else None
    if need_b:
        if db is None:
            db = _mm_to(gy.T, xa, torch.promote_types(b_dtype, torch.float32))
        db = db.mul_(gs.to(db.dtype)).to(b_dtype)
    dm = magnitude_grad(gy, y, bias, magnitude) if need_m else None  # Σ_t gy ⊙ (y - bias) / m, 0 where m == 0
    return dx, da, db, dm


def _plain_base(x2: torch.Tensor, weight, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``x2 Wᵀ (+ bias)`` by differentiable ops in ``dtype`` (an NF4 weight dequantized: a constant)."""
    y = x2 @ _graph_weight(weight, dtype).T
    return y if bias is None else y + bias.to(dtype)


def _split(weight) -> tuple[torch.Tensor | None, NF4Tensor | None]:
    if isinstance(weight, NF4Tensor):
        return None, weight
    if isinstance(weight, torch.Tensor):
        return weight, None
    raise TypeError(f"weight must be a tensor or an NF4Tensor, got {type(weight).__name__}")


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` gives a linear's product on ``x``'s device, or None where it is off
    (autocast leaves fp64 alone)."""
    device = "cuda" if x.is_cuda else x.device.type  # (x.device builds a torch.device: ~1 us per call)
    available = _AUTOCAST_AVAILABLE.get(device)
    if available is None:  # e.g. "meta" has no autocast state to ask about
        available = torch.amp.is_autocast_available(device)
        if not torch.compiler.is_compiling():  # a write traced by Dynamo made the next call recompile
            _AUTOCAST_AVAILABLE[device] = available
    if not available or not torch.is_autocast_enabled(device) or x.dtype is torch.float64:
        return None
    return torch.get_autocast_dtype(device)


# per device type: asked once (a per-call cost otherwise); the common ones at import, so that a first call traced by
# torch.compile finds them (Dynamo guards on what the dict holds)
_AUTOCAST_AVAILABLE: dict[str, bool] = {d: torch.amp.is_autocast_available(d) for d in ("cpu", "cuda")}


def _dtypes(x: torch.Tensor, weight, dtype: torch.dtype | None) -> tuple[torch.dtype, torch.dtype, bool]:
    """``(compute dtype, output dtype, autocast off inside)`` for one call.

    An explicit ``dtype`` wins and the output is in ``x.dtype``. Else, under autocast, the call computes
    in and returns the autocast dtype, as ``F.linear`` does there; else the dense weight's dtype (an NF4
    weight: ``x.dtype``) and ``x.dtype``. Autocast is switched off inside where its dtype is not the
    compute dtype: the products and their epilogues then all run in the compute dtype."""
    ac = _autocast_dtype(x)
    if dtype is None:
        if ac is not None:
            return ac, ac, False
        return (x.dtype if isinstance(weight, NF4Tensor) else weight.dtype), x.dtype, False
    return dtype, x.dtype, ac is not None and ac != dtype


def _check_shapes(x: torch.Tensor, weight, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                  magnitude: torch.Tensor | None = None) -> None:
    """ValueError naming the argument whose shape does not fit ``weight`` ``(out, in)`` (the functional API; a
    mismatch otherwise surfaced as a GEMM's or an in-place add's error, worded by whichever path ran)."""
    n_out, n_in = weight.shape
    if x.dim() == 0 or x.shape[-1] != n_in:
        raise ValueError(f"x must be (..., in) with in = {n_in} (weight is {(n_out, n_in)}), got {tuple(x.shape)}")
    if a.dim() != 2 or a.shape[1] != n_in:
        raise ValueError(f"a must be (r, in) with in = {n_in}, got {tuple(a.shape)}")
    if b.dim() != 2 or b.shape[0] != n_out or b.shape[1] != a.shape[0]:
        raise ValueError(f"b must be (out, r) = ({n_out}, {a.shape[0]}), got {tuple(b.shape)}")
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"bias must be ({n_out},) or None, got {tuple(bias.shape)}")
    if magnitude is not None and magnitude.shape != (n_out,):
        raise ValueError(f"magnitude must be ({n_out},), got {tuple(magnitude.shape)}")


def lora_linear(x: torch.Tensor, weight: torch.Tensor | NF4Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scale: float, dtype: torch.dtype | None = None, *,
                cast: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Fused LoRA linear ``y = x Wᵀ + bias + s·B A x``.

    Args:
        x: ``(..., in)``; weight: ``(out, in)`` dense tensor or NF4Tensor; bias: ``(out,)`` or None;
        a: ``(r, in)``; b: ``(out, r)`` (any float dtype, e.g. fp32 masters).
        scale: ``s``.
        dtype: compute dtype (a dense weight is cast to it per call); default: under ``torch.autocast``
            on ``x``'s device the autocast dtype, else the dense weight's dtype, or ``x.dtype`` for an NF4
            weight. An explicit ``dtype`` holds under autocast too (autocast is off inside the call).
        cast: ``(a, b)`` already in the compute dtype, detached (a module's cache of them), optionally
            with ``s·b`` in that dtype as a third entry; they must hold the current values of ``a`` and
            ``b``. Default: cast per call.
    Returns:
        ``(..., out)`` in ``x.dtype``, or in the autocast dtype where autocast chose the compute dtype (as
        ``F.linear``); gradients for ``x``, ``a``, ``b`` (and a dense ``weight`` / ``bias`` that require
        grad) in their own dtypes.

    Raises:
        ValueError: ``x``, ``a``, ``b`` or ``bias`` whose shape does not fit ``weight``.
    """
    dense_w, quant_w = _split(weight)
    dtype, out_dtype, autocast_off = _dtypes(x, weight, dtype)
    if autocast_off:
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(x, weight, bias, a, b, scale, dtype, cast=cast)
    _check_shapes(x, weight, bias, a, b)
    if torch.is_grad_enabled() and not functorch_active() and (
            x.requires_grad or a.requires_grad or b.requires_grad or (dense_w is not None and dense_w.requires_grad)
            or (bias is not None and bias.requires_grad)):
        if cast is None and decode_grad_applies(x, dense_w, bias, dtype) and takes_decode_kernels(x, a, dtype):
            # decode sizes: the rank-r term by the decode kernels, as without grad (the same output)
            return decode_apply(x, weight, a, b, scale,
                                lambda xx: _decode_product(xx, weight, bias, a, b, scale))
        return _LoRAFn.apply(x, dense_w, bias, a, b, scale, quant_w, dtype, cast, out_dtype)
    if functorch_active():  # torch.func.grad / vmap / jvp cannot transform the Function: plain differentiable ops
        x2 = _to(_rows(x), dtype)
        y = _plain_base(x2, weight, bias, dtype) + ((x2 @ a.to(dtype).T) @ b.to(dtype).T) * scale
        return _to(y.view(*x.shape[:-1], y.shape[-1]), out_dtype)
    # nothing to differentiate (inference, generation): the same math without autograd's per-call cost
    x2 = _to(_rows(x), dtype)
    if takes_decode_kernels(x2, a, dtype):
        y, _ = _decode_product(x2, weight, bias, *((a, b) if cast is None else cast[:2]), scale)
        return _to(y.view(*x.shape[:-1], y.shape[-1]), out_dtype)
    x2, ac, bc = _as_compute(x, a, b, dtype, cast)
    y, _ = _lora_out(x2, weight, bias, ac, bc, scale)
    return _to(y.view(*x.shape[:-1], y.shape[-1]), out_dtype)


def takes_decode_kernels(x: torch.Tensor, a: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a call on ``x (..., in)`` with compute dtype ``dtype`` adds its rank-r term by
    :func:`alignlab.kernels.lora_decode.lora_decode_add_` (``DECODE_KERNELS`` and where its kernels apply,
    :func:`alignlab.kernels.lora_decode.applies`; not while ``torch.compile`` traces). A call that needs a gradient
    takes them too where ``x`` is in ``dtype`` and no dense weight or bias trains (:func:`decode_apply`)."""
    return DECODE_KERNELS and lora_decode_applies(x, a, dtype) and not torch.compiler.is_compiling()


# -- decode sizes with a gradient, and the kept launchers of a QLoRA layer -------------------------------------------
def decode_grad_applies(x: torch.Tensor, dense_w: torch.Tensor | None, bias: torch.Tensor | None,
                        dtype: torch.dtype) -> bool:
    """Whether a decode-sized call that needs a gradient can take :func:`decode_apply` (which gives ``x`` and the
    factors theirs): ``x`` in the compute dtype ``dtype``, and no dense base weight or bias that trains."""
    return (x.dtype == dtype and not (dense_w is not None and dense_w.requires_grad)
            and not (bias is not None and bias.requires_grad))


def _decode_product(x: torch.Tensor, weight, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y (..., out), xa = c(s·x A_cᵀ) (tokens, r))`` for ``x`` in the compute dtype at decode rows: over an NF4 base
    where :func:`_rank_epilogue` says so, ``xa`` by the decode down kernel and ``y`` by one small-M NF4 launch that
    adds ``xa c(B)ᵀ`` in its epilogue; else the base product, then the rank-r term by the decode kernels
    (:func:`alignlab.kernels.lora_decode.lora_decode_add_`)."""
    x2 = _rows(x)
    if _rank_epilogue(x2, weight, b):
        xa = lora_decode_down(x2, a, scale)
        y = rank_matmul(x2, weight, None if bias is None else _to(bias, x2.dtype).contiguous(), xa, b)
        return y.view(*x.shape[:-1], y.shape[-1]), xa
    y = _base_forward(x2, weight, bias)
    xa = lora_decode_add_xa(y, x2, a, b, scale)
    return y.view(*x.shape[:-1], y.shape[-1]), xa


def _rank_epilogue(x2: torch.Tensor, weight, b: torch.Tensor) -> bool:
    """Whether a decode product takes the NF4 small-M kernel's rank-term epilogue (``RANK_EPILOGUE``, an NF4 base
    whose product the small-M kernels make for these rows: :func:`alignlab.kernels.nf4_matmul.takes_rank_term`)."""
    return RANK_EPILOGUE and isinstance(weight, NF4Tensor) and takes_rank_term(x2, weight, b)


def decode_runner(x: torch.Tensor, t: NF4Tensor | torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                  b: torch.Tensor, scale: float):
    """``(run, first)``: ``run(x) -> (y, xa)``, :func:`_decode_product` of a LoRA layer for inputs of ``x``'s layout
    through kept launchers -- over an NF4 base with the rank-term epilogue (:func:`_rank_epilogue`) the decode down
    kernel's (:func:`alignlab.kernels.lora_decode.down_runner`) and the small-M NF4 kernel's
    (:func:`alignlab.kernels.nf4_small.small_m_runner` with ``rank_b``), two launches and two allocations of host
    work per call; else the base product's (NF4: :func:`alignlab.kernels.nf4_matmul.decode_matmul`'s kept launcher;
    a dense weight: the same GEMM call as :func:`_base_forward`'s) and the rank-r kernels'
    (:func:`alignlab.kernels.lora_decode.add_runner`), three launches --; ``first``, ``run(x)`` for this very ``x``,
    computed on the way (binding the launchers runs them once; the layout's first call also compiles), so that the
    call that builds a runner makes each product once. None where one of the launchers cannot be kept (the caller
    then takes :func:`lora_linear`).

    ``x (..., in)``: CUDA, in the compute dtype, at decode rows (:func:`takes_decode_kernels`); a dense ``t`` and
    ``bias`` (None or) in that dtype. Valid for inputs of the layout ``runner_key(x, bias)`` names (shape, strides,
    dtype, alignment, device, stream) while ``t``, ``bias``, ``a`` and ``b`` are these tensors (the factors at these
    addresses) and ``scale`` this value: the caller keys its cache by those (``LoRALinear``). A dense ``t`` is read
    as it is at each call (an in-place write or a new ``.data`` of its shape shows); the runner gives it no gradient.
    """
    if not _qlinear.DECODE_LAUNCHERS or torch.cuda.is_current_stream_capturing():
        return None
    x2 = _rows(x)
    if x2.data_ptr() != x.data_ptr():  # rows not at one stride: _rows copied
        return None
    if isinstance(t, torch.Tensor):
        return _dense_decode_runner(x, x2, t, bias, a, b, scale)
    if _rank_epilogue(x2, t, b):
        first = _decode_product(x, t, bias, a, b, scale)  # compiles both kernels for this layout
        down = lora_down_runner(x2, a, scale)
        base = small_m_runner(x, t, bias, rank_b=b)
        if down is None or base is None:
            return None

        def run(xx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            xa = down(xx)
            return base(xx, bias, xa), xa

        return run, first
    key = runner_key(x, bias)
    base = kept_runner(t, key)
    y = None
    if base is False:  # the layout's first call: compiles and keeps the base launcher (or None, another path)
        y = decode_matmul(x, t, bias)
        base = kept_runner(t, key)
    if not base:
        return None
    if y is None:
        y = base(x, bias)
    bound = lora_decode_runner(_rows(y), x2, a, b, scale)
    if bound is None:
        return None
    lora, xa = bound

    def run(xx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = base(xx, bias)
        return y, lora(y, xx)

    return run, (y, xa)


def _dense_decode_runner(x: torch.Tensor, x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                         a: torch.Tensor, b: torch.Tensor, scale: float):
    """:func:`decode_runner` over a dense base weight ``w (out, in)``: ``F.linear`` (one dispatcher call, the GEMM
    :func:`_base_forward` makes: ``addmm`` with a bias, ``mm`` without) and the rank-r kernels' kept launchers.
    None for a layout where ``F.linear`` would add a bias apart from the GEMM (an input of more than two dimensions
    that it does not fold onto one matrix: more than three, or three not contiguous): the same bits or none."""
    if bias is not None and x.dim() > 2 and not (x.dim() == 3 and x.is_contiguous()):
        return None
    if w.shape != (b.shape[0], a.shape[1]):  # (a .data of another shape: lora_linear names the mismatch)
        return None
    y = _base_forward(x2, w, bias)
    bound = lora_decode_runner(y, x2, a, b, scale)
    if bound is None:
        return None
    lora, xa = bound
    linear, n = torch.nn.functional.linear, y.shape[1]

    def run(xx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = linear(xx, w, bias)
        if y.shape[-1] != n:  # a .data of another shape swapped into the weight: the up kernel writes n columns
            raise ValueError(f"the base weight now has {y.shape[-1]} outputs, its adapter {n}")
        return y, lora(y, xx)

    return run, (y.view(*x.shape[:-1], y.shape[-1]), xa)


class _LoRADecodeFn(torch.autograd.Function):
    """:class:`_LoRAFn` at decode sizes: ``(y, xa) = run(x)`` (:func:`_decode_product` or a kept
    :func:`decode_runner`); saves ``x``, ``xa`` and the master factors (cast again in backward: its products are
    decode-sized too). Four inputs, ``(x, a, b, (run, weight, scale))``: a decode call's host time is the point, and
    ``Function.apply`` walks its arguments in Python."""

    @staticmethod
    def forward(ctx, x, a, b, fixed):
        run, weight, ctx.scale = fixed
        y, xa = run(x)
        # a dense (frozen) weight is saved as a tensor, so that a write into it before backward is caught
        dense = isinstance(weight, torch.Tensor)
        ctx.save_for_backward(x, xa, a, b, weight if dense else None)
        ctx.quant = None if dense else weight
        return y

    @staticmethod
    def backward(ctx, gy):
        if _autocast_dtype(gy) is None:
            return _lora_decode_backward(ctx, gy)
        with torch.autocast(gy.device.type, enabled=False):  # as _LoRAFn.backward
            return _lora_decode_backward(ctx, gy)


def _lora_decode_backward(ctx, gy):
    x, xa, a, b, dense_w = ctx.saved_tensors
    dtype = x.dtype
    weight = dense_w if ctx.quant is None else ctx.quant
    need_x, need_a, need_b, _ = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True: differentiable ops on the inputs, as _LoRAFn's
        ctx.quant_w, ctx.x_shape, ctx.x_dtype, ctx.x_is_input = ctx.quant, x.shape, dtype, True
        dx, _, _, da, db, _ = _backward_graph(ctx, gy, x, dense_w, None, a, b, dtype,
                                              need=(need_x, False, False, need_a, need_b, False))
        return dx, da, db, None
    dx, da, db = _lora_grads(_to(_rows(gy), dtype), _rows(x), weight, _to(a.detach(), dtype),
                             _to(b.detach(), dtype), xa, ctx.scale, None, need_x, need_a, need_b, a.dtype, b.dtype)
    return None if dx is None else dx.view(x.shape), da, db, None


def decode_apply(x: torch.Tensor, weight, a: torch.Tensor, b: torch.Tensor, scale: float, run) -> torch.Tensor:
    """A decode-sized LoRA call that needs a gradient: ``run(x) -> (y, xa)`` (:func:`_decode_product`, or a kept
    :func:`decode_runner`) under one autograd function. ``x`` is in the compute dtype; the dense ``weight`` (if
    dense) is frozen and there is no bias that trains."""
    return _LoRADecodeFn.apply(x, a, b, (run, weight, scale))


# -- under torch.compile: the LoRA / DoRA layer as two opaque ops each ------------------------------
# Traced as plain ops, the adapter term costs Inductor an extra pass: it lowers ``out + (x Aᵀ) Bᵀ`` to an out-of-place
# addmm, which copies the base GEMM's (tokens, out) result before the rank-r GEMM adds into it (cudaMemcpy DtoD, one
# per layer and pass; 1.8 ms of a Llama-3-8B-shaped 4-layer step at batch 4 on an H100), and the widened form of
# _widen is out of its reach. As custom ops the compiled layer runs the eager fused code; Inductor fuses around them.
# Only from OP_MIN_ROWS rows: below, the step is host-bound and the ops' eager host work (the fused path's Python)
# cost more than they saved (H100, QLoRA step at batch 1 = 2048 rows: 33.7 ms against 27.7 traced as plain ops;
# batch 4: 96.7-99.5 against 101.4, QDoRA 102.3 against 105.0).
OP_MIN_ROWS = 4096
# At decode rows (takes_decode_op) a traced LoRA layer takes the op too, whose forward then runs the eager decode
# product (the decode down kernel, and over an NF4 base the small-M kernel with the rank term in its epilogue): traced
# as plain ops, each call cast both factors, made x Aᵀ and the addmm by cuBLAS and copied the output first (Inductor),
# ten or more kernels per layer inside a CUDA-graph decode step (H100, 2026-12-07: HF generate() with a static cache,
# RESULTS.md). DECODE_OP = False (or ALIGNLAB_LORA_DECODE_OP=0, read at import) traces them as plain ops again.
DECODE_OP = env_switch("ALIGNLAB_LORA_DECODE_OP", True)


def takes_decode_op(x: torch.Tensor, a: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a LoRA call traced by ``torch.compile`` on ``x (..., in)`` with compute dtype ``dtype`` and factor ``a``
    takes :func:`lora_linear_op` at decode rows (``DECODE_OP``, and where the decode kernels apply:
    :func:`alignlab.kernels.lora_decode.applies`, a guard on the row count where shapes are dynamic); the op's forward
    then adds the rank-r term by them (:func:`takes_decode_kernels` at run time)."""
    return DECODE_OP and DECODE_KERNELS and lora_decode_applies(x, a, dtype)


def _nf4_fields(t: NF4Tensor | None) -> tuple:
    """An NF4 weight as custom-op arguments (its tensors and metadata); placeholders for a dense weight."""
    if t is None:
        return None, None, None, None, None, [], torch.float32, 0, 0
    return (t.data, t.absmax, t.nested_absmax, t.nested_offset, t.shift, list(t.shape), t.dtype, t.blocksize,
            t.nested_blocksize)


def _weight_from(dense_w, data, absmax, nested_absmax, nested_offset, shift, shape, wdtype, blocksize,
                 nested_blocksize):
    if dense_w is not None:
        return dense_w
    return NF4Tensor(data=data, absmax=absmax, shape=torch.Size(shape), dtype=wdtype, blocksize=blocksize,
                     nested_absmax=nested_absmax, nested_offset=nested_offset, shift=shift,
                     nested_blocksize=nested_blocksize)


@torch.library.custom_op("alignlab::lora_forward", mutates_args=())
def _lora_forward_op(x2: torch.Tensor, dense_w: torch.Tensor | None, data: torch.Tensor | None,
                     absmax: torch.Tensor | None, nested_absmax: torch.Tensor | None,
                     nested_offset: torch.Tensor | None, shift: torch.Tensor | None, shape: list[int],
                     wdtype: torch.dtype, blocksize: int, nested_blocksize: int, bias: torch.Tensor | None,
                     a: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    weight = _weight_from(dense_w, data, absmax, nested_absmax, nested_offset, shift, shape, wdtype, blocksize,
                          nested_blocksize)
    if takes_decode_kernels(x2, a, x2.dtype):  # decode rows (takes_decode_op): the eager decode product, no cast
        y, xa = _decode_product(x2, weight, bias, a, b, scale)
        return y, xa
    y, xa = _lora_out(x2, weight, bias, a.to(x2.dtype), b.to(x2.dtype), scale)
    return y, xa


@_lora_forward_op.register_fake
def _(x2, dense_w, data, absmax, nested_absmax, nested_offset, shift, shape, wdtype, blocksize, nested_blocksize,
      bias, a, b, scale):
    return x2.new_empty(x2.shape[0], b.shape[0]), x2.new_empty(x2.shape[0], a.shape[0])


@torch.library.custom_op("alignlab::lora_backward", mutates_args=())
def _lora_backward_op(g: torch.Tensor, x2: torch.Tensor, dense_w: torch.Tensor | None, data: torch.Tensor | None,
                      absmax: torch.Tensor | None, nested_absmax: torch.Tensor | None,
                      nested_offset: torch.Tensor | None, shift: torch.Tensor | None, shape: list[int],
                      wdtype: torch.dtype, blocksize: int, nested_blocksize: int, a: torch.Tensor, b: torch.Tensor,
                      xa: torch.Tensor, scale: float, need_x: bool, need_a: bool, need_b: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    weight = _weight_from(dense_w, data, absmax, nested_absmax, nested_offset, shift, shape, wdtype, blocksize,
                          nested_blocksize)
    dx, da, db = _lora_grads(g, x2, weight, a.to(g.dtype), b.to(g.dtype), xa, scale, None, need_x, need_a, need_b,
                             a.dtype, b.dtype)
    # an op returns tensors (none aliasing another): a fresh empty one where a gradient is not needed
    return tuple(g.new_empty(0) if t is None else t for t in (dx, da, db))


@_lora_backward_op.register_fake
def _(g, x2, dense_w, data, absmax, nested_absmax, nested_offset, shift, shape, wdtype, blocksize, nested_blocksize,
      a, b, xa, scale, need_x, need_a, need_b):
    return (g.new_empty(g.shape[0], x2.shape[1]) if need_x else g.new_empty(0),
            a.new_empty(a.shape) if need_a else g.new_empty(0), b.new_empty(b.shape) if need_b else g.new_empty(0))


def _lora_op_setup(ctx, inputs, output) -> None:
    x2, dense_w, data, absmax, nested_absmax, nested_offset, shift, shape, wdtype, bs, nbs, _, a, b, scale = inputs
    ctx.save_for_backward(x2, dense_w, data, absmax, nested_absmax, nested_offset, shift, a, b, output[1])
    ctx.meta = (shape, wdtype, bs, nbs, scale)


def _lora_op_backward(ctx, gy, _gxa):
    x2, dense_w, data, absmax, nested_absmax, nested_offset, shift, a, b, xa = ctx.saved_tensors
    shape, wdtype, bs, nbs, scale = ctx.meta
    need = ctx.needs_input_grad
    dx, da, db = torch.ops.alignlab.lora_backward(gy, x2, dense_w, data, absmax, nested_absmax, nested_offset,
                                                  shift, shape, wdtype, bs, nbs, a, b, xa, scale, need[0],
                                                  need[12], need[13])
    return (dx if need[0] else None, *(None,) * 11, da if need[12] else None, db if need[13] else None, None)


_lora_forward_op.register_autograd(_lora_op_backward, setup_context=_lora_op_setup)


def lora_linear_op(x: torch.Tensor, weight: torch.Tensor | NF4Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                   b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """:func:`lora_linear` with an explicit compute ``dtype`` as the custom ops ``alignlab::lora_forward`` /
    ``alignlab::lora_backward``: the same products, for traced code (``torch.compile``; :class:`LoRALinear` takes it
    there). Gradients for ``x``, ``a``, ``b``; a dense ``weight`` and ``bias`` must not require grad (the caller's
    plain path covers those). Output in ``x.dtype``."""
    dense_w, quant_w = _split(weight)
    x2 = _to(_rows(x), dtype)
    y, _ = torch.ops.alignlab.lora_forward(x2, dense_w, *_nf4_fields(quant_w), bias, a, b, float(scale))
    return _to(y.view(*x.shape[:-1], y.shape[-1]), x.dtype)


@torch.library.custom_op("alignlab::dora_forward", mutates_args=())
def _dora_forward_op(x2: torch.Tensor, dense_w: torch.Tensor | None, data: torch.Tensor | None,
                     absmax: torch.Tensor | None, nested_absmax: torch.Tensor | None,
                     nested_offset: torch.Tensor | None, shift: torch.Tensor | None, shape: list[int],
                     wdtype: torch.dtype, blocksize: int, nested_blocksize: int, bias: torch.Tensor | None,
                     a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    weight = _weight_from(dense_w, data, absmax, nested_absmax, nested_offset, shift, shape, wdtype, blocksize,
                          nested_blocksize)
    norm, *factors = dora_norm(weight, a, b, scale, x2.dtype, magnitude=magnitude)
    y, xa, g, gs, bgs = _dora_out(x2, weight, bias, a.to(x2.dtype), b, magnitude, scale, x2.dtype, norm, factors)
    return y, xa, g, gs, bgs


@_dora_forward_op.register_fake
def _(x2, dense_w, data, absmax, nested_absmax, nested_offset, shift, shape, wdtype, blocksize, nested_blocksize,
      bias, a, b, magnitude, scale):
    rows, out, f32 = x2.shape[0], b.shape[0], torch.float32  # g and s·g in fp32 (callers keep fp64 off this op)
    return (x2.new_empty(rows, out), x2.new_empty(rows, a.shape[0]), x2.new_empty(out, dtype=f32),
            x2.new_empty(out, 1, dtype=f32), x2.new_empty(out, a.shape[0]))


@torch.library.custom_op("alignlab::dora_backward", mutates_args=())
def _dora_backward_op(gy: torch.Tensor, x2: torch.Tensor, dense_w: torch.Tensor | None, data: torch.Tensor | None,
                      absmax: torch.Tensor | None, nested_absmax: torch.Tensor | None,
                      nested_offset: torch.Tensor | None, shift: torch.Tensor | None, shape: list[int],
                      wdtype: torch.dtype, blocksize: int, nested_blocksize: int, bias: torch.Tensor | None,
                      a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor, xa: torch.Tensor, y: torch.Tensor,
                      g: torch.Tensor, gs: torch.Tensor, bgs: torch.Tensor, need_x: bool, need_a: bool, need_b: bool,
                      need_m: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    weight = _weight_from(dense_w, data, absmax, nested_absmax, nested_offset, shift, shape, wdtype, blocksize,
                          nested_blocksize)
    grads = _dora_grads(gy, x2, weight, a.to(gy.dtype), bgs, xa, y, magnitude, bias, g, gs, need_x, need_a, need_b,
                        need_m, a.dtype, b.dtype)
    return tuple(gy.new_empty(0) if t is None else t for t in grads)  # as _lora_backward_op


@_dora_backward_op.register_fake
def _(gy, x2, dense_w, data, absmax, nested_absmax, nested_offset, shift, shape, wdtype, blocksize, nested_blocksize,
      bias, a, b, magnitude, xa, y, g, gs, bgs, need_x, need_a, need_b, need_m):
    return (gy.new_empty(gy.shape[0], x2.shape[1]) if need_x else gy.new_empty(0),
            a.new_empty(a.shape) if need_a else gy.new_empty(0), b.new_empty(b.shape) if need_b else gy.new_empty(0),
            magnitude.new_empty(magnitude.shape) if need_m else gy.new_empty(0))


def _dora_op_setup(ctx, inputs, output) -> None:
    x2, dense_w, data, absmax, nested_absmax, nested_offset, shift, shape, wdtype, bs, nbs, bias, a, b, m, _ = inputs
    y, xa, g, gs, bgs = output
    ctx.save_for_backward(x2, dense_w, data, absmax, nested_absmax, nested_offset, shift, bias, a, b, m, xa, y, g, gs,
                          bgs)
    ctx.meta = (shape, wdtype, bs, nbs)


def _dora_op_backward(ctx, gy, *_):
    x2, dense_w, data, absmax, nested_absmax, nested_offset, shift, bias, a, b, m, xa, y, g, gs, bgs = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, da, db, dm = torch.ops.alignlab.dora_backward(gy, x2, dense_w, data, absmax, nested_absmax, nested_offset,
                                                      shift, *ctx.meta, bias, a, b, m, xa, y, g, gs, bgs, need[0],
                                                      need[12], need[13], need[14])
    return (dx if need[0] else None, *(None,) * 11, da if need[12] else None, db if need[13] else None,
            dm if need[14] else None, None)


_dora_forward_op.register_autograd(_dora_op_backward, setup_context=_dora_op_setup)


def dora_linear_op(x: torch.Tensor, weight: torch.Tensor | NF4Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                   b: torch.Tensor, scale: float, magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`dora_linear` (norm computed per call) as the custom ops ``alignlab::dora_forward`` /
    ``alignlab::dora_backward``, for traced code, as :func:`lora_linear_op` (gradients for ``x``, ``a``, ``b`` and
    ``magnitude``)."""
    dense_w, quant_w = _split(weight)
    x2 = _to(_rows(x), dtype)
    y = torch.ops.alignlab.dora_forward(x2, dense_w, *_nf4_fields(quant_w), bias, a, b, magnitude, float(scale))[0]
    return _to(y.view(*x.shape[:-1], y.shape[-1]), x.dtype)


def dora_linear(x: torch.Tensor, weight: torch.Tensor | NF4Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scale: float, magnitude: torch.Tensor, dtype: torch.dtype | None = None, *,
                cast: tuple[torch.Tensor, torch.Tensor] | None = None, norm: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Fused DoRA linear: ``y = m ⊙ (W + sBA) x / ‖W + sBA‖_row + bias`` (norm detached, as in the paper).

    The row norm comes from :func:`alignlab.kernels.dora.dora_row_norm` (one pass over the
    packed or dense weight, never forming ``W + sBA``), with ``A``, ``B`` in the compute dtype.

    Args:
        as :func:`lora_linear` (autocast too), plus magnitude: ``m``, ``(out,)``; norm: the row norms for
        the current ``W``, ``a``, ``b`` (a module's cache of them; default: computed per call).
    Returns:
        ``(..., out)`` in ``x.dtype`` (under autocast: as :func:`lora_linear`); same values and gradients
        as the unfused DoRA expression, but for ``∂L/∂m`` on a row whose ``m`` is exactly 0 and whose norm is not:
        0 here (forward kept no ``z`` for it, see :class:`_DoRAFn`), ``Σ_t ∂L/∂y ⊙ z / norm`` unfused and in PEFT.

    Raises:
        ValueError: ``x``, ``a``, ``b``, ``bias`` or ``magnitude`` whose shape does not fit ``weight``.
    """
    dense_w, quant_w = _split(weight)
    dtype, out_dtype, autocast_off = _dtypes(x, weight, dtype)
    if autocast_off:
        with torch.autocast(x.device.type, enabled=False):
            return dora_linear(x, weight, bias, a, b, scale, magnitude, dtype, cast=cast, norm=norm)
    _check_shapes(x, weight, bias, a, b, magnitude)
    factors = None
    if norm is None:  # the norm and the per-row factors from one kernel
        norm, *factors = dora_norm(weight, a, b, scale, dtype, cast, magnitude=magnitude)
    if functorch_active():  # as lora_linear: plain differentiable ops, the norm a constant
        from alignlab.adapters.dora import dora_gain

        x2 = _to(_rows(x), dtype)
        z = _plain_base(x2, weight, None, dtype) + ((x2 @ a.to(dtype).T) @ b.to(dtype).T) * scale
        y = z * dora_gain(magnitude, norm).to(dtype)
        y = y if bias is None else y + bias.to(dtype)
        return _to(y.view(*x.shape[:-1], y.shape[-1]), out_dtype)
    if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad or magnitude.requires_grad
                                    or (dense_w is not None and dense_w.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        return _DoRAFn.apply(x, dense_w, bias, a, b, magnitude, scale, quant_w, dtype, norm, cast, factors,
                             out_dtype)
    x2, ac, _ = _as_compute(x, a, b, dtype, cast)  # nothing to differentiate: no autograd bookkeeping
    y = _dora_out(x2, weight, bias, ac, b, magnitude, scale, dtype, norm, factors)[0]
    return _to(y.view(*x.shape[:-1], y.shape[-1]), out_dtype)


def dora_norm(weight: torch.Tensor | NF4Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype,
              cast: tuple[torch.Tensor, torch.Tensor] | None = None, magnitude: torch.Tensor | None = None):
    """``‖W + s·B A‖_row`` (detached) as :func:`dora_linear` uses it, with ``A``, ``B`` in ``dtype``.

    With ``magnitude``, returns ``(norm, g, s·g, s·g ⊙ B)`` instead, the factors written by the same kernel
    (:func:`alignlab.kernels.dora.dora_norm_and_scales`, ``B`` taken from ``b`` as given, e.g. the fp32 master).
    """
    from alignlab.kernels.dora import dora_norm_and_scales, dora_row_norm

    with torch.no_grad():
        if cast is None:
            cast = a.detach().to(dtype), b.detach().to(dtype)
        if magnitude is None:
            return dora_row_norm(weight, cast[0], cast[1], scale)
        return dora_norm_and_scales(weight, cast[0], cast[1], scale, magnitude, b, dtype)
