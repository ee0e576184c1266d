"""Row-wise softmax statistics and logit gradients for one chunk of logits.

This is the elementwise heart of the chunked log-prob engine
(:mod:`alignlab.losses.logprobs`, :mod:`alignlab.losses.cross_entropy`). The
engine computes a chunk of logits ``Z = H_c W^T (+ b)`` with one cuBLAS matmul;
this module turns that ``(rows, vocab)`` block, **in place**, into the gradient
``dL/dZ`` while producing the per-row statistics, so that the two backward
matmuls (``dL/dH_c = dZ W`` and ``dL/dW += dZ^T H_c``) can read it directly. The
three matmuls are the floor of the problem; this kernel is the only extra
memory traffic (two reads and one write of the chunk).

For row ``t`` with target ``y``, optional soft cap ``c`` (Gemma 2,
arXiv:2408.00118) ``z = c tanh(Z / c)`` (else ``z = Z``), the statistics are

    lse_t  = log sum_v exp(z_v)           (fp32 online log-sum-exp)
    tgt_t  = z_y
    mean_t = (1 / V) sum_v z_v            (only for label smoothing)

and the per-row loss whose gradient is written is

    l_t = (1 - eps) (lse_t - z_y) + eps (lse_t - mean_t) + zeta lse_t^2

(label smoothing ``eps`` as in "Rethinking the Inception Architecture",
arXiv:1512.00567; z-loss ``zeta`` as in PaLM, arXiv:2204.02311), so

    dL/dZ_v = g_t [ p_v (1 + 2 zeta lse_t) - eps / V - (1 - eps) [v = y] ] * (1 - (z_v / c)^2)

with ``p = softmax(z)`` and ``g_t`` the per-row gradient scale. A log-prob
``z_y - lse`` is the loss with ``eps = zeta = 0`` and ``g_t = -dL/dlogp_t``.

Optionally (RL losses log it, and may reward it) the entropy of each row,

    ent_t = lse_t - E_t,   E_t = sum_v p_v z_v,

comes out of the same statistics pass (one more online sum), and its gradient
``e_t * dent_t/dz_v = -e_t p_v (z_v - E_t)`` (``e_t`` the per-row upstream
gradient of the entropy) is added to ``dL/dz`` in the gradient pass.

Two implementations with the same contract: a Triton kernel (one program per
row, two passes over the vocabulary in blocks) and a PyTorch reference.
:func:`chunk_softmax_grad_` picks one through :func:`alignlab.kernels.dispatch.use_triton`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from alignlab.kernels.dispatch import interpreting, triton_available, use_triton
from alignlab.kernels.launch import next_power_of_2, options, sm_count

__all__ = ["RowStats", "check_label_range", "chunk_softmax_grad_", "chunk_softmax_grad_reference_"]


class RowStats(NamedTuple):
    """Per-row statistics of a logits chunk, each ``(rows,)`` in float32 (float64 for float64 logits).

    ``mean`` is ``None`` unless it was asked for; ``entropy`` and ``expected`` (``E_t``) unless
    ``want_entropy``. ``mean`` and ``entropy`` are ``None`` too when a saved ``lse`` skipped the statistics pass.
    """

    lse: torch.Tensor
    target: torch.Tensor
    mean: torch.Tensor | None
    entropy: torch.Tensor | None = None
    expected: torch.Tensor | None = None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_label_range(labels: torch.Tensor, vocab: int, or_else: str = "") -> None:
    """``ValueError`` naming ``labels`` and ``[0, vocab)`` unless every entry of the integer tensor lies there.

    Both bounds come back in one host read (one device sync on CUDA); nothing is read for an empty tensor, nor
    under ``torch.compile`` (a host read would break the graph; gather's own bounds check stands there).
    ``or_else`` follows the range in the message (the losses': ``" or ignore_index=-100"``).
    """
    if labels.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = torch.stack(torch.aminmax(labels)).tolist()
    if lo < 0 or hi >= vocab:
        raise ValueError(f"labels must be in [0, {vocab}){or_else}, got {lo if lo < 0 else hi}")


def _check(logits, labels, lse, grad_scale, smoothing, z_loss, softcap, expected=None, entropy_grad=None,
           labels_checked=False) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (rows, vocab), got shape {tuple(logits.shape)}")
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous along the vocabulary dimension")
    rows = logits.shape[0]
    if labels.dtype not in (torch.int32, torch.int64):  # what the reference's gather takes
        raise TypeError(f"labels must be int32 or int64, got {labels.dtype}")
    if labels.shape != (rows,):
        raise ValueError(f"labels must have shape ({rows},), got {tuple(labels.shape)}")
    if lse is not None and lse.shape != (rows,):
        raise ValueError(f"lse must have shape ({rows},), got {tuple(lse.shape)}")
    if grad_scale is not None and grad_scale.shape != (rows,):
        raise ValueError(f"grad_scale must have shape ({rows},), got {tuple(grad_scale.shape)}")
    if lse is not None and grad_scale is None:
        raise ValueError("lse is only taken together with grad_scale (the gradient pass)")
    if entropy_grad is not None:
        if grad_scale is None or entropy_grad.shape != (rows,):
            raise ValueError(f"entropy_grad must have shape ({rows},) and come with grad_scale")
        if lse is not None and (expected is None or expected.shape != (rows,)):
            raise ValueError(f"entropy_grad with a saved lse needs the saved expected logits ({rows},)")
    for name, t in (("labels", labels), ("lse", lse), ("grad_scale", grad_scale), ("expected", expected),
                    ("entropy_grad", entropy_grad)):
        # the kernel takes raw pointers: another device's tensor was read as this one's memory
        if t is not None and t.device != logits.device:
            raise ValueError(f"{name} must be on the logits' device {logits.device}, got {t.device}")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
    if z_loss < 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not softcap > 0.0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if not labels_checked:
        # the kernel reads z[y] at the label: one past the vocabulary read another row's (or no one's) memory,
        # and the reference's gather raised an unnamed RuntimeError (a device assert on CUDA)
        check_label_range(labels, logits.shape[1])


def chunk_softmax_grad_reference_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    lse: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    want_mean: bool = False,
    smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    want_entropy: bool = False,
    expected: torch.Tensor | None = None,
    entropy_grad: torch.Tensor | None = None,
    labels_checked: bool = False,
) -> RowStats:
    """PyTorch reference of :func:`chunk_softmax_grad_` (same arguments, same contract)."""
    _check(logits, labels, lse, grad_scale, smoothing, z_loss, softcap, expected, entropy_grad, labels_checked)
    acc = _acc_dtype(logits.dtype)
    z = logits.to(acc)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    fresh = lse is None
    if fresh:
        lse = torch.logsumexp(z, dim=1)
    else:
        lse = lse.to(acc)
    target = z.gather(1, labels.view(-1, 1)).squeeze(1)
    mean = z.mean(dim=1) if want_mean and fresh else None
    entropy = None
    if fresh and (want_entropy or entropy_grad is not None):
        p = torch.exp(z - lse[:, None])
        # p_v z_v is 0 where p_v is: a -inf logit gave 0 * -inf = NaN (a NaN p still spoils its row)
        expected = torch.where(p == 0, 0.0, p * z).sum(dim=1)
        entropy = lse - expected
    if not want_entropy:
        entropy = None
    if grad_scale is not None:
        vocab = logits.shape[1]
        g = grad_scale.to(acc)
        # without a z-loss the coefficient is g alone: 0 * lse was NaN for an infinite lse, spoiling the whole row
        coef = (g * (1.0 + 2.0 * z_loss * lse) if z_loss else g)[:, None]
        p = torch.exp(z - lse[:, None])
        if entropy_grad is not None:
            coef = coef - entropy_grad.to(acc)[:, None] * (z - expected.to(acc)[:, None])
            d = torch.where(p == 0, 0.0, p * coef)  # as for the entropy: p_v = 0 contributes 0, not 0 * inf
        else:
            d = p * coef
        if smoothing:
            d -= (g * (smoothing / vocab))[:, None]
        d.scatter_add_(1, labels.view(-1, 1), -(g * (1.0 - smoothing))[:, None])
        if softcap is not None:
            d *= 1.0 - (z / softcap) ** 2
        logits.copy_(d)
    return RowStats(lse, target, mean, entropy, expected if want_entropy else None)


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _tanh(x):
        # tanh through exp: portable between the GPU and the interpreter.
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _finite_or_zero(m):
        # the shift of an online log-sum-exp: torch.logsumexp's, 0 where the running max is infinite
        return tl.where((m == float("inf")) | (m == float("-inf")), 0.0, m)

    @triton.jit
    def _load_capped(base, cols, V, softcap, HAS_CAP: tl.constexpr):
        # One block of a row for the statistics pass: fp32 logits, soft-capped, 0 past the vocabulary.
        msk = cols < V
        z = tl.load(base + cols, mask=msk, other=0.0).to(tl.float32)
        if HAS_CAP:
            z = softcap * _tanh(z / softcap)
        return z, msk

    @triton.jit
    def _chunk_softmax_grad_kernel(
        logits_ptr,
        stride_row,
        labels_ptr,
        gscale_ptr,
        lse_ptr,
        tgt_ptr,
        mean_ptr,
        ent_ptr,
        ez_ptr,
        egrad_ptr,
        n_rows,
        V,
        smoothing,
        z_loss,
        softcap,
        HAS_CAP: tl.constexpr,
        LSE_IN: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
        WANT_MEAN: tl.constexpr,
        BLOCK_V: tl.constexpr,
        VEC_LSE: tl.constexpr,
        WANT_ENT: tl.constexpr,
        ENT_GRAD: tl.constexpr,
    ):
        # Rows are strided over the programs (a persistent grid when there are fewer
        # programs than rows): fewer rows in flight keeps more of each row in L2
        # between the statistics pass and the gradient pass.
        offs = tl.arange(0, BLOCK_V)
        n_blocks = tl.cdiv(V, BLOCK_V)
        for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
            # int64 offsets: rows * vocab passes 2**31 at 16k rows of a 128k vocabulary.
            base = logits_ptr + (row + tl.zeros([], dtype=tl.int64)) * stride_row
            y = tl.load(labels_ptr + row).to(tl.int64)
            # never read outside the row: a label past the vocabulary (unchecked caller) gives a NaN target
            zy = tl.load(base + y, mask=(y >= 0) & (y < V), other=float("nan")).to(tl.float32)
            if HAS_CAP:
                zy = softcap * _tanh(zy / softcap)
            tl.store(tgt_ptr + row, zy)
            ez = tl.zeros([], dtype=tl.float32)
            if LSE_IN:
                lse = tl.load(lse_ptr + row).to(tl.float32)
                if ENT_GRAD:
                    ez = tl.load(ez_ptr + row).to(tl.float32)
            elif VEC_LSE:
                # Online log-sum-exp kept per lane: two exps per element but no cross-warp
                # reduction (and barrier) inside the loop; lanes are merged once at the end.
                m_v = tl.zeros([BLOCK_V], dtype=tl.float32) - float("inf")
                s_v = tl.zeros([BLOCK_V], dtype=tl.float32)
                zs_v = tl.zeros([BLOCK_V], dtype=tl.float32)
                for blk in range(0, n_blocks):
                    z, msk = _load_capped(base, blk * BLOCK_V + offs, V, softcap, HAS_CAP)
                    if WANT_MEAN:
                        zs_v += tl.where(msk, z, 0.0)
                    z = tl.where(msk, z, float("-inf"))
                    new_m = tl.maximum(m_v, z)
                    safe_m = _finite_or_zero(new_m)
                    s_v = s_v * tl.exp(m_v - safe_m) + tl.exp(z - safe_m)
                    m_v = new_m
                m = tl.max(m_v, axis=0)
                lse = m + tl.log(tl.sum(s_v * tl.exp(m_v - _finite_or_zero(m)), axis=0))
                zs = tl.sum(zs_v, axis=0)
            else:
                # Online log-sum-exp: one exp per element, block maxima rescale the running sum.
                m = tl.zeros([], dtype=tl.float32) - float("inf")
                s = tl.zeros([], dtype=tl.float32)
                zs = tl.zeros([], dtype=tl.float32)
                sz = tl.zeros([], dtype=tl.float32)  # sum exp(z - m) z, for the entropy
                for blk in range(0, n_blocks):
                    z, msk = _load_capped(base, blk * BLOCK_V + offs, V, softcap, HAS_CAP)
                    if WANT_MEAN:
                        zs += tl.sum(tl.where(msk, z, 0.0), axis=0)
                    zv = z
                    z = tl.where(msk, z, float("-inf"))
                    new_m = tl.maximum(m, tl.max(z, axis=0))
                    # shift by 0, not by an infinite max (exp(inf - inf) was NaN): lse = +-inf, as torch.logsumexp
                    safe_m = _finite_or_zero(new_m)
                    e = tl.exp(z - safe_m)
                    s = s * tl.exp(m - safe_m) + tl.sum(e, axis=0)
                    if WANT_ENT or ENT_GRAD:
                        # p_v z_v is 0 where p_v is (a -inf logit: 0 * -inf was NaN; lanes past V have e = 0)
                        sz = sz * tl.exp(m - safe_m) + tl.sum(tl.where(e == 0.0, 0.0, e * zv), axis=0)
                    m = new_m
                lse = m + tl.log(s)
                ez = sz / s
            if not LSE_IN:
                tl.store(lse_ptr + row, lse)
                if WANT_MEAN:
                    tl.store(mean_ptr + row, zs / V)
                if WANT_ENT:
                    tl.store(ent_ptr + row, lse - ez)
                    tl.store(ez_ptr + row, ez)
            if WRITE_GRAD:
                g = tl.load(gscale_ptr + row).to(tl.float32)
                # z_loss = 0: g alone, as the reference (0 * lse was NaN for an infinite lse, spoiling the whole row)
                coef = g + tl.where(z_loss == 0.0, 0.0, 2.0 * z_loss * lse * g)
                off = g * smoothing / V
                hit = g * (1.0 - smoothing)
                eg = tl.zeros([], dtype=tl.float32)
                if ENT_GRAD:
                    eg = tl.load(egrad_ptr + row).to(tl.float32)
                # Walk the row backwards: the blocks read last by the statistics pass
                # are the likeliest to still sit in L2.
                for i in range(0, n_blocks):
                    cols = (n_blocks - 1 - i) * BLOCK_V + offs
                    msk = cols < V
                    z = tl.load(base + cols, mask=msk, other=0.0).to(tl.float32)
                    if HAS_CAP:
                        t = _tanh(z / softcap)
                        z = softcap * t
                    if ENT_GRAD:
                        p = tl.exp(z - lse)
                        # p_v = 0 (a -inf logit) contributes 0, not 0 * inf = NaN, through the entropy term
                        d = tl.where(p == 0.0, 0.0, p * (coef - eg * (z - ez))) - off - tl.where(cols == y, hit, 0.0)
                    else:
                        d = tl.exp(z - lse) * coef - off - tl.where(cols == y, hit, 0.0)
                    if HAS_CAP:
                        d = d * (1.0 - t * t)
                    tl.store(base + cols, d.to(logits_ptr.dtype.element_ty), mask=msk)


def _launch_config(vocab: int) -> tuple[int, int, int, bool]:
    """``(BLOCK_V, num_warps, programs per SM, per-lane lse)``; 0 programs per SM = one per row."""
    if interpreting():
        return min(next_power_of_2(vocab), 256), 1, 0, False
    # Measured on an H100 (bf16, 1024 x 128256 chunk, benchmarks/cross_entropy.py): wide blocks
    # and 32 warps reach ~82% of the copy bandwidth; the per-lane lse and persistent grids lost.
    block_v = min(next_power_of_2(vocab), 16384)
    return block_v, max(4, min(32, block_v // 512)), 0, False


def chunk_softmax_grad_triton_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    lse: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    want_mean: bool = False,
    smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    want_entropy: bool = False,
    expected: torch.Tensor | None = None,
    entropy_grad: torch.Tensor | None = None,
    labels_checked: bool = False,
    _config: tuple[int, int, int, bool] | None = None,
) -> RowStats:
    """Triton launcher of :func:`chunk_softmax_grad_` (float16/bfloat16/float32 logits).

    ``_config`` = ``(BLOCK_V, num_warps, programs per SM, per-lane lse)`` overrides the launch
    configuration (benchmarks, tests); 0 programs per SM launches one program per row.
    """
    _check(logits, labels, lse, grad_scale, smoothing, z_loss, softcap, expected, entropy_grad, labels_checked)
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton path takes float16/bfloat16/float32 logits, got {logits.dtype}")
    rows, vocab = logits.shape
    dev = logits.device
    lse_out = lse.to(torch.float32).contiguous() if lse is not None else torch.empty(rows, device=dev)
    target = torch.empty(rows, device=dev, dtype=torch.float32)
    # a saved lse skips the statistics pass, which alone writes the mean and the entropy: none come back
    stats = lse is None
    mean = torch.empty(rows, device=dev, dtype=torch.float32) if want_mean and stats else None
    ent = torch.empty(rows, device=dev, dtype=torch.float32) if want_entropy and stats else None
    if expected is not None and lse is not None:
        ez = expected.to(torch.float32).contiguous()
    else:
        ez = torch.empty(rows, device=dev, dtype=torch.float32) if want_entropy and stats else None
    if rows == 0:
        return RowStats(lse_out, target, mean, ent, ez if want_entropy else None)
    gscale = grad_scale.to(torch.float32).contiguous() if grad_scale is not None else target
    egrad = entropy_grad.to(torch.float32).contiguous() if entropy_grad is not None else target
    block_v, num_warps, per_sm, vec_lse = _config or _launch_config(vocab)
    if want_entropy or entropy_grad is not None:
        vec_lse = False  # the entropy sum lives in the scalar online loop
    grid = rows
    if per_sm and logits.is_cuda:
        grid = min(rows, per_sm * sm_count(logits.device.index or 0))
    _chunk_softmax_grad_kernel[(grid,)](
        logits,
        logits.stride(0),
        labels.contiguous(),
        gscale,
        lse_out,
        target,
        mean if mean is not None else target,
        ent if ent is not None else target,
        ez if ez is not None else target,
        egrad,
        rows,
        vocab,
        float(smoothing),
        float(z_loss),
        float(softcap) if softcap is not None else 1.0,
        HAS_CAP=softcap is not None,
        LSE_IN=lse is not None,
        WRITE_GRAD=grad_scale is not None,
        WANT_MEAN=want_mean,
        BLOCK_V=block_v,
        VEC_LSE=bool(vec_lse),
        WANT_ENT=bool(want_entropy),
        ENT_GRAD=entropy_grad is not None,
        num_warps=num_warps,
        **options(),
    )
    return RowStats(lse_out, target, mean, ent, ez if want_entropy else None)


def chunk_softmax_grad_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    lse: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    want_mean: bool = False,
    smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    want_entropy: bool = False,
    expected: torch.Tensor | None = None,
    entropy_grad: torch.Tensor | None = None,
    labels_checked: bool = False,
) -> RowStats:
    """Row statistics of a logits chunk and, optionally, its gradient written in place.

    Args:
        logits: ``(rows, vocab)`` raw logits ``Z`` (before the soft cap), contiguous along vocab.
            Overwritten with ``dL/dZ`` (same dtype) when ``grad_scale`` is given, else untouched.
        labels: ``(rows,)`` integer targets, every one in ``[0, vocab)`` (the caller drops
            ignored rows before calling); checked (:func:`check_label_range`, one host read) unless
            ``labels_checked``.
        lse: ``(rows,)`` log-sum-exp saved by an earlier pass; skips the statistics pass
            (only together with ``grad_scale``).
        grad_scale: ``(rows,)`` per-row scale ``g_t`` of the gradient; ``None`` = statistics only.
        want_mean: also return the mean capped logit per row (label smoothing needs it); like the entropy, it
            comes from the statistics pass, so it is None with a saved ``lse``.
        smoothing, z_loss, softcap: ``eps``, ``zeta`` and ``c`` of the module docstring.
        want_entropy: also return each row's entropy and expected logit ``E_t`` (statistics pass).
        expected: ``(rows,)`` ``E_t`` saved by an earlier pass (with ``lse`` and ``entropy_grad``).
        entropy_grad: ``(rows,)`` upstream gradient ``e_t`` of the entropy, added to the written gradient
            (with ``grad_scale``; pass ``0`` scales for an entropy-only gradient).
        labels_checked: the caller has checked every label against ``[0, vocab)`` already (the losses do, once
            per call): skip the check and its host read, which would stall a CUDA stream once per chunk (and
            which a CUDA-graph capture refuses: pass ``True`` when capturing).
            A label outside the range then gives a NaN target on the Triton path (it is never read past the row)
            and gather's own error on the reference.

    An infinite logit gives what ``torch.logsumexp`` gives on both paths: ``lse = +inf`` for a ``+inf`` logit
    (``-inf`` for a row of ``-inf``), so a log-prob ``z_y - lse`` is ``-inf`` at the other labels and NaN at the
    infinite one, and the written gradient is NaN where ``p_v`` is; a ``-inf`` logit has ``p_v = 0`` and adds
    nothing to the entropy or its gradient.

    Returns:
        :class:`RowStats` ``(lse, target, mean)``, float32 (float64 for float64 logits).

    Raises:
        TypeError: labels not int32/int64.
        ValueError: on mismatched shapes or devices, out-of-range ``smoothing``/``z_loss``/``softcap``, or a label
            outside ``[0, vocab)`` (unless ``labels_checked``).
    """
    kernel = use_triton(logits) and logits.dtype in (torch.float16, torch.bfloat16, torch.float32)
    impl = chunk_softmax_grad_triton_ if kernel else chunk_softmax_grad_reference_
    return impl(
        logits, labels, lse=lse, grad_scale=grad_scale, want_mean=want_mean,
        smoothing=smoothing, z_loss=z_loss, softcap=softcap, want_entropy=want_entropy,
        expected=expected, entropy_grad=entropy_grad, labels_checked=labels_checked,
    )
