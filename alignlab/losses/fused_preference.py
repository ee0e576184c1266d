r"""Preference losses straight from the last hidden states and the ``lm_head`` weight.

The unfused path builds the ``(tokens, vocab)`` logits, a log-softmax of the same size and their gradients:
for 4 sequences x 1024 tokens x 128k vocab in bf16 that is several GiB.  Here the logits only ever exist
one chunk of rows at a time, and everything after the per-token log-probs (sums per sequence, the loss
formula) is the log-prob loss of :mod:`alignlab.losses.preference` on small ``(batch, seq)`` tensors: the
numbers are the unfused ones, only time and memory differ.

Two schedules, one result:

* ``eager=False`` (default): per-token log-probs from :func:`alignlab.losses.logprobs.linear_logprobs`,
  whose custom backward recomputes each chunk.  Four ``(tokens x hidden x vocab)`` matmuls (one forward,
  three backward), workspace of one chunk, ordinary autograd semantics (any number of backward calls,
  the log-probs can feed anything).
* ``eager=True``: the loss and its gradients are computed in the forward call, in two passes over the
  chunks: pass 1 gets each row's log-sum-exp and label logit, the loss then gives the per-token upstream
  gradient, pass 2 turns each chunk into ``dL/dZ`` in place and runs the two gradient matmuls.  Chunks that
  fit in ``resident_bytes`` stay alive between the passes (as one block, one matmul per direction) and are
  not recomputed, so a batch that fits costs three matmuls (Liger-Kernel's count) instead of four;
  ``resident_bytes=0`` gives the lean four-matmul schedule.  Backward only scales the stored gradients, which
  are handed over once: a second ``backward`` through the same loss (``retain_graph=True``) raises a
  ``RuntimeError`` instead of silently giving no gradient.

Layout: ``hidden`` is ``(2B, seq, hidden)`` with the B chosen sequences first and the B rejected ones after
(the concatenated batch of TRL / Liger); ``labels`` is ``(2B, seq)`` **aligned with** ``hidden``
(``labels[:, t]`` is the token scored from ``hidden[:, t]``; for a causal LM shift first:
``hidden[:, :-1]``, ``input_ids[:, 1:]``), with ``ignore_index`` on prompt and padding positions.

The reference can be given as precomputed sequence log-probs (``ref_chosen_logps``/``ref_rejected_logps``)
or as reference hidden states (``ref_hidden``, optionally ``ref_weight``/``ref_bias``); the lm_head defaults to
the policy's (the usual LoRA set-up, where the head is frozen and shared). Either way the reference is a
constant: no gradient reaches it, on both schedules (the log-prob losses detach precomputed log-probs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from alignlab._checks import ArgumentTypeError, as_bool, check_finite_number, is_int, is_real
from alignlab.kernels.linear_logprobs import chunk_softmax_grad_
from alignlab.losses.logprobs import (
    _check_ignore_index,
    _fp16_grad_unit,
    check_linear_inputs,
    chunk_backward,
    chunk_logits,
    default_chunk_rows,
    hand_over_grads,
    linear_chunked_pass,
    linear_logprobs,
    scatter_rows,
    select_scored_rows,
)
from alignlab.losses.preference import (
    _LENGTH_NORMALISED,
    _lengths_known_valid,
    check_num_items,
    cpo_loss,
    dpo_loss,
    dpo_loss_types,
    kto_loss,
    orpo_loss,
    simpo_loss,
    step_count,
)

__all__ = [
    "completion_logps",
    "fused_linear_preference",
    "fused_linear_dpo",
    "fused_linear_orpo",
    "fused_linear_simpo",
    "fused_linear_cpo",
    "fused_linear_kto",
]

LossFromTokens = Callable[[torch.Tensor], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]
_DEFAULT_RESIDENT_BYTES = 2**30
_SECOND_BACKWARD = ("eager=True computes the gradients in the forward call and hands them over in the first backward; "
                    "a second backward through the same loss has none left (it gave no gradient at all before): "
                    "compute the loss again, or use eager=False, for another backward")


def completion_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Per-token and per-sequence completion log-probs without the full logits.

    Args:
        hidden: ``(batch, seq, hidden)``; weight: ``(vocab, hidden)``; labels: ``(batch, seq)`` aligned with
            ``hidden``; bias: optional ``(vocab,)``.

    Returns:
        ``(token_logps, seq_logps, counts)``: ``(batch, seq)`` log-probs (0 at ignored positions),
        ``(batch,)`` their sums :math:`\sum_t \log p(y_t)`, ``(batch,)`` number of scored tokens (float).

    Raises:
        ValueError/TypeError: as :func:`~alignlab.losses.logprobs.linear_logprobs`, or ``hidden`` not 3-D.
    """
    _check_3d(hidden)
    tok = linear_logprobs(hidden, weight, labels, bias, chunk_size=chunk_size, ignore_index=ignore_index)
    return tok, tok.sum(dim=1), _scored_counts(labels, ignore_index, hidden)


def _check_3d(hidden: torch.Tensor) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        kind = ValueError if isinstance(hidden, torch.Tensor) else ArgumentTypeError
        raise kind(f"hidden must be (batch, seq, hidden), got {getattr(hidden, 'shape', type(hidden))}")


def _scored_counts(labels: torch.Tensor, ignore_index: int, hidden: torch.Tensor) -> torch.Tensor:
    """``(batch,)`` scored tokens per sequence, in the dtype of the log-probs (float64 for float64 hidden)."""
    _check_ignore_index(ignore_index)  # a str compared with the labels gave a plain False (AttributeError on .sum)
    return (labels != ignore_index).sum(dim=1).to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)


# ------------------------------------------------------------------------------------------------------------------
# the eager two-pass schedule
# ------------------------------------------------------------------------------------------------------------------
class _EagerLinearLoss(torch.autograd.Function):
    """Loss and its gradients w.r.t. hidden/weight/bias in the forward call; backward scales them.

    Rows are split into a leading part walked in chunks through one scratch buffer (recomputed in pass 2)
    and a trailing resident block whose logits stay alive between the passes; the block is one matmul in
    each direction (and its weight gradient is written, not accumulated, which saves a read-modify-write of
    the weight-sized buffer per chunk).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, loss_fn, chunk_size, resident_bytes, ignore_index, aux, sel):
        vocab = weight.shape[0]
        n_rows = labels.numel()
        index, h, y = select_scored_rows(hidden, labels, ignore_index, vocab) if sel is None else sel
        rows = y.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        dev = hidden.device
        step = max(1, min(rows, chunk_size or default_chunk_rows(rows, vocab, h.element_size(), dev)))
        row_bytes = vocab * h.element_size()
        if rows * row_bytes <= resident_bytes:
            keep = rows
        else:  # what is left of the budget once the scratch chunk is paid for
            keep = max(0, (resident_bytes - step * row_bytes) // row_bytes)
        r0 = rows - keep
        w_t = weight.t()

        lse = torch.empty(rows, dtype=acc, device=dev)
        tgt = torch.empty(rows, dtype=acc, device=dev)
        scratch = torch.empty(min(step, r0), vocab, dtype=h.dtype, device=dev) if r0 else None
        for s in range(0, r0, step):
            e = min(s + step, r0)
            # labels: select_scored_rows checked them, here or in the caller that passed sel
            st = chunk_softmax_grad_(chunk_logits(h[s:e], w_t, bias, scratch[: e - s]), y[s:e], labels_checked=True)
            lse[s:e], tgt[s:e] = st.lse, st.target
        block = None
        if keep:
            block = chunk_logits(h[r0:], w_t, bias, torch.empty(keep, vocab, dtype=h.dtype, device=dev))
            st = chunk_softmax_grad_(block, y[r0:], labels_checked=True)
            lse[r0:], tgt[r0:] = st.lse, st.target

        tok = scatter_rows(tgt - lse, index, n_rows).view(labels.shape)
        with torch.enable_grad():
            leaf = tok.detach().requires_grad_(True)
            loss, metrics = _loss_and_metrics(loss_fn(leaf))
            if loss.dim() != 0:
                raise ValueError("eager=True needs a scalar loss (reduction='mean' or 'sum')")
            (g_tok,) = torch.autograd.grad(loss, leaf, allow_unused=True)
        aux.update(metrics)
        g = torch.zeros(n_rows, dtype=acc, device=dev) if g_tok is None else g_tok.reshape(-1).to(acc)
        if index is not None:
            g = g.index_select(0, index)
        scale = -g  # d(logp)/dZ = -(d loss_CE/dZ): the kernel's gradient is that of the CE loss
        unit = None
        if h.dtype == torch.float16 and rows:  # fp16 g p_v of a small g would flush: write dZ for g / unit
            unit = _fp16_grad_unit(scale)
            scale = scale / unit

        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None
        grad_b = torch.zeros(vocab, dtype=acc, device=dev) if need_b else None

        def backprop(z: torch.Tensor, s: int, e: int) -> None:
            nonlocal grad_w
            chunk_softmax_grad_(z, y[s:e], lse=lse[s:e], grad_scale=scale[s:e], labels_checked=True)
            grad_w = chunk_backward(z, h[s:e], weight, grad_h[s:e] if need_h else None, grad_w, grad_b, need_w)

        if need_h or need_w or need_b:
            if block is not None:
                backprop(block, r0, rows)
                block = None
            for s in range(0, r0, step):
                e = min(s + step, r0)
                backprop(chunk_logits(h[s:e], w_t, bias, scratch[: e - s]), s, e)
        del block, scratch
        if unit is not None:
            for t in (grad_h, grad_w, grad_b):
                if t is not None:
                    t.mul_(unit)
        if need_w and grad_w is None:
            grad_w = torch.zeros_like(weight)
        if need_h:
            grad_h = scatter_rows(grad_h, index, n_rows).view(hidden.shape)
        ctx.grads = (grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype))
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_loss):
        return (*hand_over_grads(ctx, grad_loss, _SECOND_BACKWARD), None, None, None, None, None, None, None)


def fused_linear_preference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_from_token_logps: LossFromTokens,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    eager: bool = False,
    resident_bytes: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Any loss of the per-token log-probs, computed from hidden states chunk by chunk.

    ``loss_from_token_logps(token_logps) -> (loss, metrics)`` receives the ``(batch, seq)`` float32 log-probs
    (0 at ignored positions) and may do anything differentiable with them; only ``hidden``, ``weight`` and
    ``bias`` receive gradients.  See the module docstring for the two schedules.

    Args:
        hidden: ``(batch, seq, hidden)``; weight: ``(vocab, hidden)``; labels: ``(batch, seq)`` aligned.
        eager: compute the gradients in the forward call (needs a scalar loss).
        resident_bytes: with ``eager``, the most bytes of logits chunks kept alive between the two passes
            (default 1 GiB: the logits of 4096 rows at a 128k vocabulary in bf16); ``0`` recomputes every
            chunk.

    Raises:
        ValueError/TypeError: bad shapes/dtypes (as ``linear_logprobs``), a negative ``resident_bytes``
            (one that is no int: TypeError), a non-scalar loss with ``eager``; ``eager`` not a bool, ``loss_from_token_logps`` not callable or not
            returning ``(loss, metrics)`` (TypeError).
    """
    _check_3d(hidden)
    check_linear_inputs(hidden, weight, labels, bias, chunk_size)
    if not callable(loss_from_token_logps):
        raise TypeError(f"loss_from_token_logps must be callable, got {type(loss_from_token_logps).__name__}")
    return _fused_preference(hidden, weight, labels, loss_from_token_logps, bias, chunk_size, ignore_index, eager,
                             resident_bytes)


def _loss_and_metrics(out) -> tuple[torch.Tensor, dict]:
    """``loss_from_token_logps``' result, which must be ``(loss tensor, metrics dict)`` on both schedules (a bare
    loss came back as is from the lazy one and failed without a name in the eager one)."""
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor) and isinstance(out[1], dict)):
        raise TypeError("loss_from_token_logps must return (loss, metrics): a tensor and a dict (may be empty), got "
                        f"{type(out).__name__}")
    return out


def _eager_with_grad(eager: bool, *tensors: torch.Tensor | None) -> bool:
    return eager and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fused_preference(hidden, weight, labels, loss_from_token_logps, bias, chunk_size, ignore_index, eager,
                      resident_bytes, sel=None):
    """:func:`fused_linear_preference` after its checks; ``sel`` is ``select_scored_rows``' result when the
    caller already has it (it costs a host sync)."""
    eager = as_bool(eager, "eager")
    # checked on both schedules: a bad value passed unnoticed wherever the eager one did not run
    if resident_bytes is not None and (not is_int(resident_bytes) or resident_bytes < 0):
        kind = ValueError if is_int(resident_bytes) else ArgumentTypeError
        raise kind(f"resident_bytes must be an int >= 0, got {resident_bytes!r}")
    if not _eager_with_grad(eager, hidden, weight, bias):
        tok = linear_logprobs(hidden, weight, labels, bias, chunk_size=chunk_size, ignore_index=ignore_index)
        return _loss_and_metrics(loss_from_token_logps(tok))
    if resident_bytes is None:
        resident_bytes = _DEFAULT_RESIDENT_BYTES
    aux: dict[str, torch.Tensor] = {}
    loss = _EagerLinearLoss.apply(
        hidden, weight, bias, labels, loss_from_token_logps, chunk_size, resident_bytes, ignore_index, aux, sel
    )
    return loss, aux


# ------------------------------------------------------------------------------------------------------------------
# the losses
# ------------------------------------------------------------------------------------------------------------------
def _split_pairs(name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if t.shape[0] % 2:
        raise ValueError(f"{name} must stack B chosen then B rejected sequences (even batch), got batch {t.shape[0]}")
    half = t.shape[0] // 2
    return t[:half], t[half:]


def _pair_logps(tok: torch.Tensor, counts: torch.Tensor, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected sequence log-probs, ``(B,)`` each: sums, or means over the scored tokens."""
    seq = tok.sum(dim=1)
    if average:
        seq = seq / counts.clamp(min=1)
    return _split_pairs("policy_hidden", seq)


def _chosen_nll(tok: torch.Tensor, counts: torch.Tensor, num_nll_tokens=None) -> torch.Tensor:
    """Mean token NLL over all scored tokens of the chosen sequences (TRL/Liger's chosen NLL); with
    ``num_nll_tokens``, their NLL sum over that step-wide count instead."""
    tok_c, _ = _split_pairs("policy_hidden", tok)
    counts_c, _ = _split_pairs("labels", counts)
    if num_nll_tokens is not None:
        total = -tok_c.sum()
        return total / step_count("num_nll_tokens", num_nll_tokens, counts_c.sum(), total.dtype, total.device)
    return -tok_c.sum() / counts_c.sum().clamp(min=1)


def _reference_seq_logps(
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_size: int | None,
    ignore_index: int,
    sel: tuple | None = None,
) -> torch.Tensor:
    """Reference sequence log-prob sums from reference hidden states, without gradient.

    ``sel``: the policy's ``select_scored_rows`` result for the same labels, reused (saves a host sync); its labels
    were checked against the policy's vocabulary only, so a reference head with fewer rows checks them again (the
    row kernel read past its logits: a made-up reference log-prob).
    """
    for name, t in (("ref_hidden", ref_hidden), ("ref_weight", ref_weight), ("ref_bias", ref_bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    with torch.no_grad():
        w = (weight if ref_weight is None else ref_weight).detach()
        b = bias if ref_weight is None and ref_bias is None else ref_bias
        b = None if b is None else b.detach()
        # named as the caller passed them (a wrong reference shape was reported as the policy's)
        check_linear_inputs(ref_hidden, w, labels, b, chunk_size,
                            names=("ref_hidden", "lm_head_weight" if ref_weight is None else "ref_weight",
                                   "bias" if ref_weight is None and ref_bias is None else "ref_bias"))
        if sel is None:
            _, seq, _ = completion_logps(ref_hidden.detach(), w, labels, b, chunk_size=chunk_size,
                                         ignore_index=ignore_index)
            return seq
        index, _, y = sel
        if w.shape[0] < weight.shape[0] and y.numel() and int(y.max()) >= w.shape[0]:
            raise ValueError(f"labels must be in [0, {w.shape[0]}) (the reference head's vocabulary) or "
                             f"ignore_index={ignore_index}")
        rows = ref_hidden.detach().reshape(-1, ref_hidden.shape[-1])
        rows = rows if index is None else rows.index_select(0, index)
        st, _, _, _ = linear_chunked_pass(rows.contiguous(), w, y, b, chunk_size=chunk_size, labels_checked=True)
        return scatter_rows(st.target - st.lse, index, labels.numel()).view(labels.shape).sum(dim=1)


def _check_ref_head(ref_hidden: torch.Tensor | None, ref_weight: torch.Tensor | None,
                    ref_bias: torch.Tensor | None) -> None:
    """``ValueError`` for a reference head (``ref_weight``/``ref_bias``) without the hidden states it would score:
    it was dropped without a word, with precomputed reference log-probs or with none."""
    if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
        raise ValueError("ref_weight/ref_bias score ref_hidden, the reference hidden states, which was not given: "
                         "pass ref_hidden too, or drop them")


def fused_linear_dpo(
    policy_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    average_log_prob: bool = False,
    nll_alpha: float = 0.0,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    eager: bool = False,
    resident_bytes: int | None = None,
    num_nll_tokens: int | torch.Tensor | None = None,
    **dpo_kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""DPO (every :func:`~alignlab.losses.preference.dpo_loss` variant) from hidden states.

    :math:`\pi_c, \pi_r` are the completion log-prob sums (means with ``average_log_prob``) computed chunk by
    chunk, then :math:`\mathcal L = \mathrm{dpo\_loss}(\pi_c, \pi_r, \rho_c, \rho_r) + \alpha\,
    \mathcal L_{\mathrm{NLL}}(y_c)`; the NLL term (``nll_alpha`` :math:`\alpha`) is RPO's, "Iterative
    Reasoning Preference Optimization" (arXiv 2404.19733), the mean token NLL of the chosen completions. It is one
    number for the batch: with ``reduction="none"`` it is added to every pair's loss (their mean is then the
    batch loss), so the per-pair values do not carry each pair's own NLL; ``metrics["nll_loss"]`` holds it apart.
    The completion token counts are passed to ``dpo_loss`` as ``chosen_lengths``/``rejected_lengths``
    (``ipo`` and ``sigmoid_norm`` normalise by them, as TRL; R-DPO's ``length_alpha`` uses them).

    Gradient accumulation (exact, micro-batches and ranks): ``num_items`` (passed on to ``dpo_loss``) = pairs
    of the whole optimiser step divides this batch's sum of the pair term, ``num_nll_tokens`` = scored chosen
    tokens of the step divides this batch's chosen-token NLL sum; summing the micro-batch losses then gives
    the big-batch loss and gradients.  With only ``num_items`` the NLL stays this batch's token mean (not
    exact when micro-batches hold different numbers of chosen tokens).

    Args:
        policy_hidden: ``(2B, seq, hidden)``, chosen first.
        lm_head_weight: ``(vocab, hidden)``, same dtype as ``policy_hidden``.
        labels: ``(2B, seq)`` aligned with ``policy_hidden``; ``ignore_index`` marks unscored positions.
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` precomputed reference log-probs, on the policy's scale:
            completion sums, or per-token means with ``average_log_prob=True`` (they are used as given), or
        ref_hidden: ``(2B, seq, hidden)`` reference hidden states (with ``ref_weight``/``ref_bias``, default the
            policy head); neither = pass ``reference_free=True``.
        beta, loss_type, label_smoothing, **dpo_kwargs: as :func:`~alignlab.losses.preference.dpo_loss`.
        chunk_size: rows of logits per chunk (see ``linear_logprobs``).
        eager, resident_bytes: the schedule (module docstring).
        num_nll_tokens: scored chosen tokens of the whole step, the normaliser of the NLL term (above).
        nll_alpha: the NLL term's weight, a finite number >= 0 (0: no term).

    Returns:
        ``(loss, metrics)`` as ``dpo_loss`` (plus ``nll_loss`` when ``nll_alpha`` != 0); gradients reach
        ``policy_hidden``, ``lm_head_weight`` and ``bias``.

    Raises:
        ValueError: odd batch, no reference (or both forms) given, a NaN, infinite or negative ``nll_alpha``
            (TypeError: not a real number), ``ref_weight``/``ref_bias`` without
            ``ref_hidden``, ``average_log_prob`` with ``ipo``/``sigmoid_norm``
            (they average per token already: the log-probs would be divided by the counts twice), and
            everything ``dpo_loss``/``linear_logprobs`` reject.
    """
    _check_3d(policy_hidden)
    check_linear_inputs(policy_hidden, lm_head_weight, labels, bias, chunk_size)
    check_num_items("num_nll_tokens", num_nll_tokens)
    nll_alpha = check_finite_number(nll_alpha, "nll_alpha", minimum=0.0)  # a NaN / negative weight went through
    average_log_prob = as_bool(average_log_prob, "average_log_prob")
    normalised = _LENGTH_NORMALISED.intersection(dpo_loss_types(loss_type))
    if average_log_prob and normalised:
        raise ValueError(f"loss_type {sorted(normalised)} divides the log-ratios by the completion lengths itself; "
                         "average_log_prob=True would divide them twice: leave it False")
    _check_ref_head(ref_hidden, ref_weight, ref_bias)
    rc, rr = ref_chosen_logps, ref_rejected_logps
    if ref_hidden is None and rc is None and rr is None and not dpo_kwargs.get("reference_free", False):
        raise ValueError("fused_linear_dpo needs a reference: ref_hidden (the reference's (2B, seq, hidden) hidden "
                         "states), or ref_chosen_logps and ref_rejected_logps, or reference_free=True")
    counts = _scored_counts(labels, ignore_index, policy_hidden)
    len_c, len_r = _split_pairs("labels", counts)  # 0 for an empty completion: dpo_loss averages it to 0
    sel = None
    if ref_hidden is not None:
        if rc is not None or rr is not None:
            raise ValueError("pass either ref_hidden or ref_chosen_logps/ref_rejected_logps, not both")
        if _eager_with_grad(eager, policy_hidden, lm_head_weight, bias):
            sel = select_scored_rows(policy_hidden, labels, ignore_index, lm_head_weight.shape[0])
        ref_seq = _reference_seq_logps(
            ref_hidden, ref_weight, ref_bias, lm_head_weight, bias, labels, chunk_size, ignore_index, sel
        )
        if average_log_prob:
            ref_seq = ref_seq / counts.clamp(min=1)
        rc, rr = _split_pairs("ref_hidden", ref_seq)
    ours = "chosen_lengths" not in dpo_kwargs and "rejected_lengths" not in dpo_kwargs
    dpo_kwargs.setdefault("chosen_lengths", len_c)
    dpo_kwargs.setdefault("rejected_lengths", len_r)

    def loss_fn(tok: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pc, pr = _pair_logps(tok, counts, average_log_prob)
        with _lengths_known_valid() if ours else contextlib.nullcontext():  # ours are counts, >= 0
            loss, metrics = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                     **dpo_kwargs)
        if nll_alpha:
            nll = _chosen_nll(tok, counts, num_nll_tokens)
            loss = loss + nll_alpha * nll
            metrics["nll_loss"] = nll.detach()
        return loss, metrics

    return _fused_preference(policy_hidden, lm_head_weight, labels, loss_fn, bias, chunk_size, ignore_index, eager,
                             resident_bytes, sel)


def fused_linear_orpo(
    policy_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    beta: float = 0.1,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    eager: bool = False,
    resident_bytes: int | None = None,
    num_items: int | torch.Tensor | None = None,
    num_nll_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""ORPO (:func:`~alignlab.losses.preference.orpo_loss`) from hidden states: per-token averaged
    log-probs for the odds ratio plus the chosen completions' mean token NLL.

    Gradient accumulation (exact, micro-batches and ranks): ``num_items`` = pairs of the whole optimiser step
    divides this batch's sum of the pair term, ``num_nll_tokens`` = scored chosen tokens of the step divides
    this batch's chosen-token NLL sum; summing the micro-batch losses then gives the big-batch loss and
    gradients.  With only ``num_items`` the NLL stays this batch's token mean (not exact when micro-batches
    hold different numbers of chosen tokens).

    A pair whose chosen or rejected completion has no scored token (all ``ignore_index``) has no odds ratio: it
    adds 0 to that term and is left out of its mean (``orpo_loss`` with the completion lengths); an empty chosen
    completion adds no token to the NLL either, so such a pair changes nothing, as if it were not in the batch.

    Shapes, layout, schedules and errors as :func:`fused_linear_dpo`.
    """
    _check_3d(policy_hidden)
    check_linear_inputs(policy_hidden, lm_head_weight, labels, bias, chunk_size)  # before the counts read labels
    check_num_items("num_items", num_items)
    check_num_items("num_nll_tokens", num_nll_tokens)
    counts = _scored_counts(labels, ignore_index, policy_hidden)
    len_c, len_r = _split_pairs("labels", counts)

    def loss_fn(tok):
        pc, pr = _pair_logps(tok, counts, average=True)
        return orpo_loss(pc, pr, _chosen_nll(tok, counts, num_nll_tokens), beta=beta, num_items=num_items,
                         chosen_lengths=len_c, rejected_lengths=len_r)

    return fused_linear_preference(
        policy_hidden, lm_head_weight, labels, loss_fn, bias=bias, chunk_size=chunk_size,
        ignore_index=ignore_index, eager=eager, resident_bytes=resident_bytes,
    )


def fused_linear_simpo(
    policy_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    eager: bool = False,
    resident_bytes: int | None = None,
    num_items: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""SimPO (:func:`~alignlab.losses.preference.simpo_loss`) from hidden states (length-normalised by the
    scored-token counts).  ``num_items``: pairs of the whole optimiser step (exact gradient accumulation).
    Shapes, layout, schedules and errors as :func:`fused_linear_dpo`."""
    _check_3d(policy_hidden)
    check_linear_inputs(policy_hidden, lm_head_weight, labels, bias, chunk_size)  # before the counts read labels
    check_num_items("num_items", num_items)
    _check_ignore_index(ignore_index)
    counts = (labels != ignore_index).sum(dim=1)  # 0 for an empty completion: simpo_loss averages it to 0

    def loss_fn(tok):
        pc, pr = _pair_logps(tok, counts, average=False)
        lc, lr = _split_pairs("labels", counts)
        with _lengths_known_valid():  # counts, >= 0
            return simpo_loss(pc, pr, beta=beta, gamma=gamma, label_smoothing=label_smoothing, chosen_lengths=lc,
                              rejected_lengths=lr, num_items=num_items)

    return fused_linear_preference(
        policy_hidden, lm_head_weight, labels, loss_fn, bias=bias, chunk_size=chunk_size,
        ignore_index=ignore_index, eager=eager, resident_bytes=resident_bytes,
    )


def fused_linear_cpo(
    policy_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    average_log_prob: bool | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    eager: bool = False,
    resident_bytes: int | None = None,
    num_items: int | torch.Tensor | None = None,
    num_nll_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""CPO (:func:`~alignlab.losses.preference.cpo_loss`) from hidden states, NLL of the chosen completions
    included.  ``average_log_prob`` defaults to True for ``ipo``/``simpo`` (TRL's choice) and for AlphaPO
    (``alpha`` :math:`\ne 0`: the reward shape of :func:`~alignlab.losses.preference.cpo_loss`, defined on
    length-normalized log-probs), else False.

    Gradient accumulation (exact, micro-batches and ranks): ``num_items`` = pairs of the whole optimiser step
    divides this batch's sum of the pair term, ``num_nll_tokens`` = scored chosen tokens of the step divides
    this batch's chosen-token NLL sum; summing the micro-batch losses then gives the big-batch loss and
    gradients.  With only ``num_items`` the NLL stays this batch's token mean (not exact when micro-batches
    hold different numbers of chosen tokens).

    Shapes, layout, schedules and errors as :func:`fused_linear_dpo`."""
    _check_3d(policy_hidden)
    check_linear_inputs(policy_hidden, lm_head_weight, labels, bias, chunk_size)  # before the counts read labels
    check_num_items("num_items", num_items)
    check_num_items("num_nll_tokens", num_nll_tokens)
    counts = _scored_counts(labels, ignore_index, policy_hidden)
    if average_log_prob is None:
        average_log_prob = loss_type in ("ipo", "simpo") or (is_real(alpha) and alpha != 0)
    average_log_prob = as_bool(average_log_prob, "average_log_prob")

    def loss_fn(tok):
        pc, pr = _pair_logps(tok, counts, average_log_prob)
        nll = _chosen_nll(tok, counts, num_nll_tokens) if cpo_alpha else None
        return cpo_loss(
            pc, pr, nll, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
            cpo_alpha=cpo_alpha, simpo_gamma=simpo_gamma, alpha=alpha, num_items=num_items,
        )

    return fused_linear_preference(
        policy_hidden, lm_head_weight, labels, loss_fn, bias=bias, chunk_size=chunk_size,
        ignore_index=ignore_index, eager=eager, resident_bytes=resident_bytes,
    )


def fused_linear_kto(
    policy_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    desirable: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    kl: torch.Tensor | float | None = None,
    policy_kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    chunk_size: int | None = None,
    ignore_index: int = -100,
    eager: bool = False,
    resident_bytes: int | None = None,
    num_items: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""KTO (:func:`~alignlab.losses.preference.kto_loss`) from hidden states, on unpaired completions.

    Args:
        policy_hidden: ``(batch, seq, hidden)`` (no chosen/rejected layout: ``desirable`` labels each row).
        labels: ``(batch, seq)`` aligned with ``policy_hidden``.
        desirable: ``(batch,)`` bool.
        ref_logps: ``(batch,)`` reference log-probs, or ``ref_hidden`` (+ ``ref_weight``/``ref_bias``).
        kl, policy_kl_logps, ref_kl_logps: the KL reference point, as ``kto_loss``.
        num_items: completions of the whole optimiser step; with ``kl`` from the step (``kto_loss``'s two-pass
            recipe) the micro-batch losses sum to the big-batch loss exactly.

    Returns / Raises: as :func:`~alignlab.losses.preference.kto_loss`; ``ValueError`` without a reference.
    """
    _check_3d(policy_hidden)
    check_linear_inputs(policy_hidden, lm_head_weight, labels, bias, chunk_size)  # before the reference pass reads them
    check_num_items("num_items", num_items)
    _check_ref_head(ref_hidden, ref_weight, ref_bias)
    if ref_hidden is not None:
        if ref_logps is not None:
            raise ValueError("pass either ref_hidden or ref_logps, not both")
        ref_logps = _reference_seq_logps(
            ref_hidden, ref_weight, ref_bias, lm_head_weight, bias, labels, chunk_size, ignore_index
        )
    if ref_logps is None:
        raise ValueError("fused_linear_kto needs ref_logps or ref_hidden")

    def loss_fn(tok):
        return kto_loss(
            tok.sum(dim=1), ref_logps, desirable, policy_kl_logps, ref_kl_logps, beta=beta,
            desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, kl=kl, loss_type=loss_type,
            num_items=num_items,
        )

    return fused_linear_preference(
        policy_hidden, lm_head_weight, labels, loss_fn, bias=bias, chunk_size=chunk_size,
        ignore_index=ignore_index, eager=eager, resident_bytes=resident_bytes,
    )
