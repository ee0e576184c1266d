"""Token and sequence log-probabilities, from logits or straight from hidden states.

The log-probability of the label ``y_t`` under a language model head is

    log p(y_t | x_<t) = z_{t, y_t} - log sum_v exp(z_{t, v}),   z_t = W h_t (+ b)

with ``h_t`` the last hidden state ``(hidden,)``, ``W`` the ``lm_head`` weight
``(vocab, hidden)``. Preference and RL losses (DPO and friends, arXiv:2305.18290;
PPO/GRPO) consume per-sequence sums of these.

:func:`linear_logprobs` never builds the ``(tokens, vocab)`` logits in full:
tokens are processed in chunks of rows; for each chunk one matmul gives the
chunk's logits, one kernel (:mod:`alignlab.kernels.linear_logprobs`, Triton on
CUDA) reduces them to the log-sum-exp in fp32, and the backward pass recomputes
the chunk and turns it in place into ``dL/dz`` for the two gradient matmuls.
The same engine (:func:`linear_chunked_pass`) drives
:func:`alignlab.losses.cross_entropy.linear_cross_entropy`.

Label convention: ``labels[..., t]`` is the token scored by ``logits[..., t, :]``
(or ``hidden[..., t, :]``). For a causal LM, shift first:
``logits[:, :-1]`` with ``labels[:, 1:]``.
"""

from __future__ import annotations

import itertools
import math

import torch

from alignlab._checks import ArgumentTypeError, as_bool, check_finite_number, is_int
from alignlab.kernels.dispatch import MM_OUT_DTYPE
from alignlab.kernels.linear_logprobs import RowStats, check_label_range, chunk_softmax_grad_

__all__ = [
    "check_linear_inputs",
    "accumulate_weight_grad",
    "check_mask_values",
    "chunk_backward",
    "chunk_logits",
    "default_chunk_rows",
    "linear_chunked_pass",
    "linear_logprobs",
    "scatter_rows",
    "select_scored_rows",
    "sequence_logprobs",
    "token_logprobs",
]

# Bytes of one chunk of logits (in the matmul dtype). On the GPU this trades the
# chunk workspace against the cost of re-reading/writing dL/dW once per chunk
# (see docs/losses-logprobs.md); on the CPU it only bounds memory.
_CUDA_CHUNK_BYTES = 256 * 2**20
_CPU_CHUNK_BYTES = 32 * 2**20


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- #
# From logits
# --------------------------------------------------------------------------- #
def check_mask_values(mask: torch.Tensor, arg: str) -> None:
    """``TypeError`` naming ``arg`` unless ``mask`` is a tensor, ``ValueError`` unless it holds bools or exactly 0/1
    (any real dtype).

    A mask selects tokens, it does not weigh them: the losses count its tokens (averages, ``num_items``,
    GSPO's length) and read other inputs only under it, so a 2 or a 0.5 has no single meaning (TRL's
    ``completion_mask`` is 0/1 too). Per-token weights are a separate argument where a loss takes them.
    Non-bool masks cost one device sync.
    """
    if not isinstance(mask, torch.Tensor):  # a list or a str: the wrong kind of thing, not a wrong value
        raise TypeError(f"{arg} must be a tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return
    if mask.is_complex():
        raise ValueError(f"{arg} must hold bools or exactly 0/1, got dtype {mask.dtype}")
    bad = (mask != 0) & (mask != 1)  # NaN included
    if bool(bad.any()):
        got = mask[bad][0].item()
        raise ValueError(f"{arg} must hold bools or exactly 0/1 (a mask, not token weights), got {got!r}")


def _check_ignore_index(ignore_index) -> None:
    # a str compared with a tensor gives a plain False (an AttributeError further on), a float never matches
    if not is_int(ignore_index):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a floating-point tensor")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels))}")
    if logits.dim() < 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits must be labels.shape + (vocab,): got logits {tuple(logits.shape)}, labels {tuple(labels.shape)}"
        )
    if labels.device != logits.device:  # gather raised torch's unnamed device error (or read meta logits)
        raise ValueError(f"labels must be on the logits' device {logits.device}, got {labels.device}")
    if logits.shape[-1] == 0 and labels.numel():  # every label, ignored or not, was then reported as out of range
        raise ValueError(f"logits must have a vocabulary of at least one entry, got shape {tuple(logits.shape)}")


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Log-probability of each label, ``z_y - logsumexp(z)``, 0 where ``labels == ignore_index``.

    Args:
        logits: ``(batch, seq, vocab)`` (any leading shape), any float dtype.
        labels: ``(batch, seq)`` integer targets aligned with ``logits`` (shift first for causal LMs).
        ignore_index: label value that marks positions to skip.

    Returns:
        ``(batch, seq)`` float32 (float64 for float64 logits). The log-sum-exp runs in float32 a chunk of rows
        at a time (32 MiB of fp32 on CPU, 256 MiB on CUDA), and under autograd only the logits themselves are
        kept: the backward recomputes each chunk, so no fp32 ``(tokens, vocab)`` copy is ever made. The
        gradient is written in the logits' dtype, 0 at ignored positions whatever their logits hold.

    Raises:
        TypeError: non-float logits or non-integer labels, ``ignore_index`` not an int.
        ValueError: shapes that do not line up, labels on another device than the logits, labels outside ``[0, vocab)`` (checked in eager mode; under
            ``torch.compile`` the graph has no host read-back and ``gather`` refuses such a label itself).
    """
    _check_logits_labels(logits, labels)
    _check_ignore_index(ignore_index)
    vocab = logits.shape[-1]
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).long()  # gather takes int64 (int32) indices only
    check_label_range(safe, vocab, f" or ignore_index={ignore_index}")  # eager only: no host read under compile
    return _LabelLogprobs.apply(logits, safe, valid)


class _LabelLogprobs(torch.autograd.Function):
    """``out = z_y − logsumexp(z)`` per row of logits ``z (..., vocab)``, 0 where ``valid`` is False (``labels`` are
    in ``[0, vocab)`` everywhere), in fp32 (fp64 for fp64 logits) a chunk of rows at a time.

    Only a chunk is ever upcast, and autograd keeps the logits themselves (no fp32 copy): the backward recomputes
    each chunk and writes ``g·(onehot(y) − softmax(z))`` in the logits' dtype, 0 on rows that are not ``valid``
    (whatever they hold, NaN included). It is made of differentiable ops on the saved logits, so a second
    derivative (``create_graph=True``) is the true one.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        acc = _acc_dtype(logits.dtype)
        out = torch.zeros(labels.shape, dtype=acc, device=logits.device)
        for at in _row_chunks(logits):
            z = logits[at].to(acc)
            picked = z.gather(-1, labels[at].unsqueeze(-1)).squeeze(-1)
            out[at] = torch.where(valid[at], picked - torch.logsumexp(z, dim=-1), 0.0)
        ctx.save_for_backward(logits, labels, valid)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, labels, valid = ctx.saved_tensors
        acc = _acc_dtype(logits.dtype)
        out = torch.zeros_like(logits, memory_format=torch.contiguous_format)
        for at in _row_chunks(logits):
            keep = valid[at].unsqueeze(-1)
            z = torch.where(keep, logits[at].to(acc), 0.0)  # finite rows: the zero scale below then zeroes them
            y = labels[at].unsqueeze(-1)
            dz = torch.softmax(z, dim=-1).neg().scatter_add(-1, y, torch.ones(y.shape, dtype=acc, device=z.device))
            scale = torch.where(keep, grad[at].unsqueeze(-1).to(acc), 0.0)
            out[at] = (dz * scale).to(logits.dtype)
        return out, None, None


def _row_chunks(logits: torch.Tensor, cuda_budget: int = _CUDA_CHUNK_BYTES):
    """Index tuples covering every row of ``logits (..., vocab)``, each a view of at most one fp32 chunk of the
    CPU/CUDA logits budget (:func:`default_chunk_rows`, ``cuda_budget`` bytes on CUDA): whole rows of the
    last-but-one leading dimension together where one fits, else one row in pieces. Views only, so a
    non-contiguous ``logits[:, :-1]`` (the causal shift) is never copied; every tuple names the last leading
    dimension's range explicitly, so the chunks of ``logits[:, :-1]`` also index the full logits."""
    if logits.dim() == 1:  # one row, labels 0-dim
        yield ()
        return
    *outer, n = logits.shape[:-1]
    if n == 0 or 0 in outer:
        return
    step = default_chunk_rows(
        math.prod(outer) * n, logits.shape[-1], _acc_dtype(logits.dtype).itemsize, logits.device, cuda_budget
    )
    if step >= n and outer:
        per = step // n
        for idx in itertools.product(*(range(d) for d in outer[:-1])):
            for b in range(0, outer[-1], per):
                yield (*idx, slice(b, b + per), slice(0, n))
        return
    for idx in itertools.product(*(range(d) for d in outer)):
        for start in range(0, n, step):
            yield (*idx, slice(start, min(start + step, n)))


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    average: bool = False,
) -> torch.Tensor:
    """Per-sequence sum (or mean) of token log-probs: ``sum_t m_t log p(y_t)``.

    Args:
        logits: ``(batch, seq, vocab)``.
        labels: ``(batch, seq)`` aligned with ``logits`` (shift first for causal LMs).
        mask: optional ``(batch, seq)`` tensor of bools or exactly 0/1 (:func:`check_mask_values`); positions
            with 0 are skipped on top of ``ignore_index``. It is not a token weight: ``average`` counts its tokens.
        ignore_index: label value that marks positions to skip.
        average: divide by the number of counted tokens (SimPO/IPO-style length
            normalisation); a sequence with no counted token gives 0.

    Returns:
        ``(batch,)`` float32 (float64 for float64 logits).

    Raises:
        TypeError/ValueError: as :func:`token_logprobs`; a ``mask`` whose shape or device differs from ``labels``
            or that holds anything but bools or 0/1 (0.5, 2, NaN: ValueError); ``average`` not a bool (TypeError).
    """
    _check_logits_labels(logits, labels)
    average = as_bool(average, "average")
    if labels.dim() < 1:
        raise ValueError("labels must have at least a batch dimension")
    tok = token_logprobs(logits, labels, ignore_index)
    keep = (labels != ignore_index).to(tok.dtype)
    if mask is not None:
        if isinstance(mask, torch.Tensor) and mask.device != labels.device:  # before its values are read
            raise ValueError(f"mask must be on the labels' device {labels.device}, got {mask.device}")
        check_mask_values(mask, "mask")
        if mask.shape != labels.shape:
            raise ValueError(f"mask must have shape {tuple(labels.shape)}, got {tuple(mask.shape)}")
        keep = keep * mask.to(tok.dtype)
    dims = tuple(range(1, labels.dim()))
    total = (tok * keep).sum(dim=dims) if dims else tok * keep
    if not average:
        return total
    count = keep.sum(dim=dims) if dims else keep
    return total / count.clamp_min(1.0)


# --------------------------------------------------------------------------- #
# The chunked engine: hidden states + lm_head weight, never the full logits
# --------------------------------------------------------------------------- #
def default_chunk_rows(
    n_rows: int, vocab: int, itemsize: int, device: torch.device, cuda_budget: int = _CUDA_CHUNK_BYTES
) -> int:
    """Rows per chunk: a logits-chunk budget in bytes, balanced so the last chunk is not a sliver."""
    budget = cuda_budget if device.type == "cuda" else _CPU_CHUNK_BYTES
    rows = max(1, budget // max(1, vocab * itemsize))
    if device.type == "cuda" and rows >= 64:
        rows = 1 << (rows.bit_length() - 1)  # power of two: friendlier matmul tiles
    if n_rows <= rows:
        return max(1, n_rows)
    n_chunks = math.ceil(n_rows / rows)
    return math.ceil(n_rows / n_chunks)


def chunk_logits(h_c: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``Z = H_c W^T (+ b)`` for one chunk: ``h_c`` ``(rows, hidden)``, ``w_t`` ``(hidden, vocab)``, written into
    and returned as ``out`` ``(rows, vocab)`` (one matmul)."""
    if bias is not None:
        return torch.addmm(bias, h_c, w_t, out=out)
    return torch.mm(h_c, w_t, out=out)


def chunk_backward(
    dz: torch.Tensor,
    h_c: torch.Tensor,
    weight: torch.Tensor,
    grad_h_c: torch.Tensor | None,
    grad_w: torch.Tensor | None,
    grad_b: torch.Tensor | None,
    need_weight_grad: bool,
) -> torch.Tensor | None:
    """The gradient matmuls of one chunk from its ``dZ`` ``(rows, vocab)``; returns ``grad_w``.

    ``dH_c = dZ W`` into ``grad_h_c`` ``(rows, hidden)``; ``dW += dZ^T H_c`` when ``need_weight_grad``
    (:func:`accumulate_weight_grad`); ``db += sum_t dZ_t`` into ``grad_b``. A None ``grad_h_c``/``grad_b`` skips
    that gradient.
    """
    if grad_h_c is not None:
        torch.mm(dz, weight, out=grad_h_c)
    if need_weight_grad:
        grad_w = accumulate_weight_grad(grad_w, dz, h_c)
    if grad_b is not None:
        grad_b += dz.sum(dim=0, dtype=grad_b.dtype)
    return grad_w


def accumulate_weight_grad(grad_w: torch.Tensor | None, dz: torch.Tensor, h_c: torch.Tensor) -> torch.Tensor:
    """``grad_w + dZ^T H_c`` for one chunk (``dz`` ``(rows, vocab)``, ``h_c`` ``(rows, hidden)``), in place; with
    ``grad_w`` None, the first chunk, written to a new buffer instead (no weight-sized zero fill).

    float16 sums in float32, within a chunk as over the chunks (and returns float32; autograd casts it to the
    weight's dtype): its ``dZ`` rows are written at O(1) scale, the mean's ``1/N`` or :func:`_fp16_grad_unit`
    kept out so that ``g p_v`` does not flush, so ``dW`` grows with the number of tokens and passed 65504
    (``inf``) for a label seen in ~1e5 tokens where the gradient of the mean is O(1) -- also inside one chunk
    while the chunk's product was written in float16 (:func:`_fp32_product`).
    """
    if dz.dtype == torch.float16:
        part = _fp32_product(dz.t(), h_c)
        return part if grad_w is None else grad_w.add_(part)
    if grad_w is None:
        return dz.t() @ h_c
    return grad_w.addmm_(dz.t(), h_c)


def _fp32_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of float16 operands, summed and written in float32: by the GEMM itself on CUDA, else from
    float32 copies of the operands (the CPU's chunks are small)."""
    if a.is_cuda and MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def scale_grads_(grads, grad_loss: torch.Tensor, factor: torch.Tensor | float = 1.0) -> list:
    """``grads`` (tensors or None) multiplied in place by ``grad_loss * factor`` (0-dim tensors or numbers).

    The product is read back as one Python float (one host sync) and each gradient is multiplied by it in
    float32 (fp64 for fp64 gradients) and rounded once. Casting the scale to a float16 gradient's dtype first
    made a loss scale of 2**16 (``torch.amp.GradScaler``'s default) inf, and in bfloat16 rounded a scale such
    as 1/3 to 8 bits, a bias shared by the whole gradient. Nothing is done when the product is 1."""
    if isinstance(factor, torch.Tensor):  # one host read for both
        grad_loss, factor = grad_loss.double() * factor.to(device=grad_loss.device, dtype=torch.float64), 1.0
    s = float(grad_loss) * float(factor)
    if s == 1.0:
        return list(grads)
    return [None if g is None else g.mul_(s) for g in grads]


def hand_over_grads(ctx, grad_loss: torch.Tensor, second_backward: str) -> list:
    """The gradients a fused loss computed in its forward call (``ctx.grads``), given to its first backward
    scaled by ``grad_loss``; a second backward through the same loss raises ``RuntimeError(second_backward)``.

    Scaled in place by :func:`scale_grads_` (they are not used again, and a weight-sized temporary would double
    the largest buffer of the step), and not at all when ``grad_loss`` is 1 (``loss.backward()``)."""
    if ctx.grads is None:  # handed over (and scaled in place) by an earlier backward: none to give again
        raise RuntimeError(second_backward)
    grads = list(ctx.grads)
    ctx.grads = None
    return scale_grads_(grads, grad_loss)


def _fp16_grad_unit(grad_scale: torch.Tensor) -> torch.Tensor:
    """A power of two at or above ``max |g|``, as a 0-dim tensor in ``[2^-24, 2^15]`` (no host sync).

    fp16 ``dL/dZ = g_t (p_v - [v = y])`` flushes to zero below 2^-24 (``p_v g_t`` of a 32k vocabulary for an
    upstream gradient under ~1e-3: a mean over many tokens) and overflows past 65504 (a loss-scaled ``g``): the
    chunks are written for ``g / unit`` and the gradients scaled back. A power of two in fp16's range divides
    and multiplies exactly. A NaN ``g_t`` is left out of the max, so it spoils its own row only, as before.
    """
    top = torch.nan_to_num(grad_scale.abs(), nan=0.0).max()
    return torch.exp2(torch.log2(top).ceil().clamp(-24.0, 15.0))


def linear_chunked_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    grad_scale: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    want_mean: bool = False,
    smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    need_hidden_grad: bool = True,
    need_weight_grad: bool = True,
    need_bias_grad: bool = True,
    labels_checked: bool = False,
) -> tuple[RowStats, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One pass of the chunked engine over rows that are all scored (no ignored labels).

    For each chunk of rows: ``Z = H_c W^T + b`` (one matmul), row statistics via
    :func:`alignlab.kernels.linear_logprobs.chunk_softmax_grad_`, and, when
    ``grad_scale`` is given, the gradient of ``sum_t g_t l_t`` (``l_t`` as in that
    module) via ``dH_c = dZ W`` and ``dW += dZ^T H_c`` (two more matmuls) and
    ``db += sum_t dZ_t``.

    Args:
        hidden: ``(rows, hidden)``; weight: ``(vocab, hidden)``; labels: ``(rows,)`` in ``[0, vocab)``;
        bias: ``(vocab,)`` or None.
        chunk_size: rows per chunk (default: a logits budget of 256 MiB on CUDA, 32 MiB on CPU).
        grad_scale: ``(rows,)`` per-row gradient scale ``g_t``; None = statistics only.
        lse: ``(rows,)`` saved log-sum-exp (skips the statistics pass; needs ``grad_scale``).
        need_*_grad: which gradients to produce (a frozen ``lm_head`` skips its matmul).
        labels_checked: the caller has checked ``labels`` against ``[0, vocab)`` (:func:`select_scored_rows`
            does): skip the check here, one host read per call (never one per chunk: the chunks skip it).

    Returns:
        ``(stats, grad_hidden, grad_weight, grad_bias)``; the grads are None unless asked
        for and ``grad_scale`` was given. ``grad_weight`` accumulates over chunks in the
        weight's dtype (for bf16 that keeps the memory at one weight-sized buffer, at
        the price of one rounding per chunk), in float32 for float16 (:func:`accumulate_weight_grad`: fp16's
        range, not its precision, is the limit there); ``grad_bias`` is float32/float64. For float16 the chunks'
        ``dL/dZ`` are written for ``g`` scaled to at most 1 (:func:`_fp16_grad_unit`).

    Raises:
        ValueError: a label outside ``[0, vocab)`` (unless ``labels_checked``): the kernel would read past the row.
    """
    rows, hdim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    acc = _acc_dtype(hidden.dtype)
    grads = grad_scale is not None
    need_h = grads and need_hidden_grad
    need_w = grads and need_weight_grad
    need_b = grads and need_bias_grad and bias is not None
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros_like(weight) if need_w and rows == 0 else None
    grad_b = torch.zeros(vocab, dtype=acc, device=dev) if need_b else None
    lse_out = torch.empty(rows, dtype=acc, device=dev)
    tgt_out = torch.empty(rows, dtype=acc, device=dev)
    mean_out = torch.empty(rows, dtype=acc, device=dev) if want_mean else None
    if rows == 0:
        return RowStats(lse_out, tgt_out, mean_out), grad_h, grad_w, grad_b
    if not labels_checked:
        check_label_range(labels, vocab)
    unit = None
    if grads and hidden.dtype == torch.float16:
        unit = _fp16_grad_unit(grad_scale)
        grad_scale = grad_scale / unit
    step = chunk_size or default_chunk_rows(rows, vocab, hidden.element_size(), dev)
    buf = torch.empty(min(step, rows), vocab, dtype=hidden.dtype, device=dev)
    w_t = weight.t()
    for s in range(0, rows, step):
        e = min(s + step, rows)
        z = chunk_logits(hidden[s:e], w_t, bias, buf[: e - s])
        st = chunk_softmax_grad_(
            z,
            labels[s:e],
            lse=lse[s:e] if lse is not None else None,
            grad_scale=grad_scale[s:e] if grads else None,
            want_mean=want_mean,
            smoothing=smoothing,
            z_loss=z_loss,
            softcap=softcap,
            labels_checked=True,  # once for all the chunks, above
        )
        lse_out[s:e] = st.lse
        tgt_out[s:e] = st.target
        if want_mean:
            mean_out[s:e] = st.mean
        if grads:  # z now holds dL/dZ for the chunk
            grad_w = chunk_backward(z, hidden[s:e], weight, grad_h[s:e] if need_h else None, grad_w, grad_b, need_w)
    if unit is not None:
        for t in (grad_h, grad_w, grad_b):
            if t is not None:
                t.mul_(unit)
    return RowStats(lse_out, tgt_out, mean_out), grad_h, grad_w, grad_b


def check_linear_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    chunk_size: int | None,
    names: tuple[str, str, str] = ("hidden", "weight", "bias"),
) -> None:
    """Validate the hidden/weight/labels/bias/chunk_size arguments shared by the fused losses; ``names``: what the
    caller calls the hidden states, the weight and the bias (``("ref_hidden", "ref_weight", "ref_bias")``)."""
    h, w, b = names
    for name, t in ((h, hidden), (w, weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels))}")
    if weight.dim() != 2 or weight.shape[1] == 0:
        raise ValueError(f"{w} must be (vocab, hidden) with hidden >= 1, got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{h} must end in hidden={weight.shape[1]} ({w} is (vocab, hidden)), got {tuple(hidden.shape)}"
        )
    if hidden.shape[:-1] != labels.shape:
        if h != "hidden":  # a second input (the reference's) against the labels the first one fixed
            raise ValueError(f"{h} must be labels.shape + (hidden,) = {tuple(labels.shape) + (weight.shape[1],)}, "
                             f"got {tuple(hidden.shape)}")
        raise ValueError(
            f"labels must have {h}'s leading shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{h} and {w} must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            kind = ValueError if isinstance(bias, torch.Tensor) else ArgumentTypeError
            raise kind(f"{b} must have shape ({weight.shape[0]},), got {getattr(bias, 'shape', bias)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{b} must have {w}'s dtype {weight.dtype}, got {bias.dtype}")
    if hidden.device != weight.device or labels.device != hidden.device:
        raise ValueError(f"{h}, {w} and labels must be on one device")
    if bias is not None and bias.device != weight.device:
        raise ValueError(f"{b} must be on {w}'s device {weight.device}, got {bias.device}")
    if chunk_size is not None and (not is_int(chunk_size) or chunk_size < 1):  # inline: every call runs it
        kind = ValueError if is_int(chunk_size) else ArgumentTypeError
        raise kind(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def select_scored_rows(
    hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int, vocab: int
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Flatten to rows and keep only the scored ones (padding and prompts cost no matmul).

    Returns ``(index, hidden_rows, label_rows)``; ``index`` is None when every row is scored.

    Raises:
        ValueError: a label outside ``[0, vocab)`` that is not ``ignore_index``.
        TypeError: ``ignore_index`` not an int.
    """
    _check_ignore_index(ignore_index)
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    valid = y != ignore_index
    index = valid.nonzero().squeeze(1)
    if index.numel() == y.numel():
        index = None
    else:
        h = h.index_select(0, index)
        y = y.index_select(0, index)
    check_label_range(y, vocab, f" or ignore_index={ignore_index}")  # one device sync for both bounds
    return index, h.contiguous(), y.to(torch.int64).contiguous()


def scatter_rows(values: torch.Tensor, index: torch.Tensor | None, n_rows: int) -> torch.Tensor:
    """Inverse of :func:`select_scored_rows` for per-row values: zeros at unscored rows."""
    if index is None:
        return values
    out = values.new_zeros((n_rows,) + values.shape[1:])
    out.index_copy_(0, index, values)
    return out


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, ignore_index, softcap):
        vocab = weight.shape[0]
        index, h, y = select_scored_rows(hidden, labels, ignore_index, vocab)
        st, _, _, _ = linear_chunked_pass(h, weight, y, bias, chunk_size=chunk_size, softcap=softcap,
                                          labels_checked=True)  # select_scored_rows checked them
        n_rows = labels.numel()
        logp = scatter_rows(st.target - st.lse, index, n_rows).view(labels.shape)
        ctx.save_for_backward(hidden, weight, bias, labels, st.lse)
        ctx.opts = (chunk_size, ignore_index, softcap)
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable  # create_graph=True: first-order grads, no mm(out=) error
    def backward(ctx, grad_logp):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        chunk_size, ignore_index, softcap = ctx.opts
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        index, h, y = select_scored_rows(hidden, labels, ignore_index, weight.shape[0])
        g = grad_logp.reshape(-1)
        if index is not None:
            g = g.index_select(0, index)
        # logp = z_y - lse is minus the unsmoothed loss: scale the loss gradient by -g.
        _, gh, gw, gb = linear_chunked_pass(
            h, weight, y, bias, chunk_size=chunk_size, grad_scale=-g.to(lse.dtype), lse=lse,
            softcap=softcap, need_hidden_grad=need_h, need_weight_grad=need_w, need_bias_grad=need_b,
            labels_checked=True,
        )
        grad_hidden = None
        if need_h:
            grad_hidden = scatter_rows(gh, index, labels.numel()).view(hidden.shape)
        grad_bias = gb.to(bias.dtype) if gb is not None else None
        return grad_hidden, gw, grad_bias, None, None, None, None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Log-probs of the labels straight from the last hidden state, chunk by chunk.

        logp_t = z_{t, y_t} - log sum_v exp(z_{t, v}),   z_t = W h_t + b
        (z_t = c tanh((W h_t + b) / c) with ``logit_softcap=c``, Gemma 2, arXiv:2408.00118)

    The ``(tokens, vocab)`` logits never exist in full: at most ``chunk_size`` rows of
    them at a time (in the weight dtype), with an fp32 log-sum-exp. Rows whose label is
    ``ignore_index`` cost nothing. Backward (custom autograd, any upstream gradient)
    recomputes each chunk and gives gradients to ``hidden``, ``weight`` and ``bias``:
    four matmuls in all. For a temperature ``tau``, pass ``weight / tau`` (and ``bias / tau``).

    Args:
        hidden: ``(batch, seq, hidden)`` (any leading shape), fp16/bf16/fp32/fp64.
        weight: ``(vocab, hidden)`` lm_head weight, same dtype as ``hidden``.
        labels: ``(batch, seq)`` integer targets aligned with ``hidden`` (shift first).
        bias: optional ``(vocab,)``.
        chunk_size: rows of logits per chunk (default: 256 MiB of logits on CUDA, 32 MiB on CPU).
        ignore_index: label value of unscored positions (their log-prob is 0).
        logit_softcap: optional soft cap ``c > 0``.

    Returns:
        ``(batch, seq)`` log-probs, float32 (float64 for float64 inputs), 0 at ignored positions.

    Raises:
        TypeError: non-float hidden/weight, non-integer labels, mismatched dtypes; ``chunk_size`` neither an int nor
            None (an :class:`~alignlab.ArgumentTypeError`, a ``ValueError`` too).
        ValueError: mismatched shapes/devices, labels outside ``[0, vocab)``, ``chunk_size < 1``, a bad softcap (NaN
            and inf included; a non-number softcap is a TypeError).
    """
    check_linear_inputs(hidden, weight, labels, bias, chunk_size)
    # an infinite cap gives inf * tanh(0) = NaN logits: None is "no cap"
    if logit_softcap is not None and not check_finite_number(logit_softcap, "logit_softcap") > 0:
        raise ValueError(f"logit_softcap must be > 0 or None, got {logit_softcap}")
    return _LinearLogprobs.apply(hidden, weight, bias, labels, chunk_size, ignore_index, logit_softcap)
