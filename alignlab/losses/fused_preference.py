r"""Preference losses straight from the last hidden states and the ``lm_head`` weight.

The unfused path builds the ``(tokens, vocab)`` logits, a log-softmax of the same size and their gradients:
for 4 sequences x 1024 tokens x 128k vocab in bf16 that is several GiB.  Here the per-token log-probs come
from :func:`alignlab.losses.logprobs.linear_logprobs`, which walks the tokens chunk by chunk (matmul + fused
log-sum-exp, Triton on CUDA) and recomputes each chunk in its custom backward, so only ``(batch, seq)``
log-probs are kept.  Everything after that (sums per sequence, the loss formula) is ordinary autograd on
those small tensors, reusing the log-prob losses of :mod:`alignlab.losses.preference`: the numbers are the
unfused ones, only the memory differs.

Layout: ``hidden`` is ``(2B, seq, hidden)`` with the B chosen sequences first and the B rejected ones after
(the concatenated batch of TRL / Liger); ``labels`` is ``(2B, seq)`` **aligned with** ``hidden``
(``labels[:, t]`` is the token scored from ``hidden[:, t]``; for a causal LM shift first:
``hidden[:, :-1]``, ``input_ids[:, 1:]``), with ``ignore_index`` on prompt and padding positions.

The reference can be given as precomputed sequence log-probs (``ref_chosen_logps``/``ref_rejected_logps``)
or as reference hidden states (``ref_hidden``, optionally ``ref_weight``/``ref_bias``; no gradient); the
lm_head defaults to the policy's (the usual LoRA set-up, where the head is frozen and shared).
"""

from __future__ import annotations

import torch

from alignlab.losses.logprobs import linear_logprobs
from alignlab.losses.preference import cpo_loss, dpo_loss, kto_loss, orpo_loss, simpo_loss

__all__ = [
    "completion_logps",
    "fused_linear_dpo",
    "fused_linear_orpo",
    "fused_linear_simpo",
    "fused_linear_cpo",
    "fused_linear_kto",
]


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
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be (batch, seq, hidden), got {getattr(hidden, 'shape', type(hidden))}")
    tok = linear_logprobs(hidden, weight, labels, bias, chunk_size=chunk_size, ignore_index=ignore_index)
    counts = (labels != ignore_index).sum(dim=1).to(tok.dtype)
    return tok, tok.sum(dim=1), counts


def _split_pairs(name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if t.shape[0] % 2:
        raise ValueError(f"{name} must stack B chosen then B rejected sequences (even batch), got batch {t.shape[0]}")
    half = t.shape[0] // 2
    return t[:half], t[half:]


def _nll(tok: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean token NLL over all scored tokens of the given sequences (TRL/Liger's chosen NLL)."""
    return -tok.sum() / counts.sum().clamp(min=1)


def _reference_logps(
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    ref_hidden: torch.Tensor | None,
    ref_weight: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_size: int | None,
    ignore_index: int,
    average: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if ref_hidden is None:
        return ref_chosen_logps, ref_rejected_logps
    if ref_chosen_logps is not None or ref_rejected_logps is not None:
        raise ValueError("pass either ref_hidden or ref_chosen_logps/ref_rejected_logps, not both")
    with torch.no_grad():
        w = weight if ref_weight is None else ref_weight
        b = bias if ref_weight is None and ref_bias is None else ref_bias
        _, seq, counts = completion_logps(
            ref_hidden.detach(), w.detach(), labels, None if b is None else b.detach(),
            chunk_size=chunk_size, ignore_index=ignore_index,
        )
        if average:
            seq = seq / counts.clamp(min=1)
    return _split_pairs("ref_hidden", seq)


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
    **dpo_kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""DPO (every :func:`~alignlab.losses.preference.dpo_loss` variant) from hidden states.

    :math:`\pi_c, \pi_r` are the completion log-prob sums (means with ``average_log_prob``) computed chunk by
    chunk, then :math:`\mathcal L = \mathrm{dpo\_loss}(\pi_c, \pi_r, \rho_c, \rho_r) + \alpha\,
    \mathcal L_{\mathrm{NLL}}(y_c)`; the NLL term (``nll_alpha`` :math:`\alpha`) is RPO's, "Iterative
    Reasoning Preference Optimization" (arXiv 2404.19733), the mean token NLL of the chosen completions.
    The completion token counts are passed to ``dpo_loss`` as ``chosen_lengths``/``rejected_lengths``
    (``ipo`` and ``sigmoid_norm`` normalise by them, as TRL; R-DPO's ``length_alpha`` uses them).

    Args:
        policy_hidden: ``(2B, seq, hidden)``, chosen first.
        lm_head_weight: ``(vocab, hidden)``, same dtype as ``policy_hidden``.
        labels: ``(2B, seq)`` aligned with ``policy_hidden``; ``ignore_index`` marks unscored positions.
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` precomputed reference log-probs, or
        ref_hidden: ``(2B, seq, hidden)`` reference hidden states (with ``ref_weight``/``ref_bias``, default the
            policy head); neither = pass ``reference_free=True``.
        beta, loss_type, label_smoothing, **dpo_kwargs: as :func:`~alignlab.losses.preference.dpo_loss`.
        chunk_size: rows of logits per chunk (see ``linear_logprobs``).

    Returns:
        ``(loss, metrics)`` as ``dpo_loss`` (plus ``nll_loss`` when ``nll_alpha`` != 0); gradients reach
        ``policy_hidden``, ``lm_head_weight`` and ``bias``.

    Raises:
        ValueError: odd batch, both reference forms given, and everything ``dpo_loss``/``linear_logprobs``
            reject.
    """
    tok, seq, counts = completion_logps(
        policy_hidden, lm_head_weight, labels, bias, chunk_size=chunk_size, ignore_index=ignore_index
    )
    if average_log_prob:
        seq = seq / counts.clamp(min=1)
    pc, pr = _split_pairs("policy_hidden", seq)
    rc, rr = _reference_logps(
        ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias, lm_head_weight, bias, labels,
        chunk_size, ignore_index, average_log_prob,
    )
    len_c, len_r = _split_pairs("labels", counts.clamp(min=1))
    dpo_kwargs.setdefault("chosen_lengths", len_c)
    dpo_kwargs.setdefault("rejected_lengths", len_r)
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, **dpo_kwargs)
    if nll_alpha:
        tok_c, _ = _split_pairs("policy_hidden", tok)
        cnt_c, _ = _split_pairs("labels", counts)
        nll = _nll(tok_c, cnt_c)
        loss = loss + nll_alpha * nll
        metrics["nll_loss"] = nll.detach()
    return loss, metrics


def fused_linear_orpo(
    policy_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    beta: float = 0.1,
    chunk_size: int | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""ORPO (:func:`~alignlab.losses.preference.orpo_loss`) from hidden states: per-token averaged
    log-probs for the odds ratio plus the chosen completions' mean token NLL.

    Shapes, layout and errors as :func:`fused_linear_dpo`.
    """
    tok, seq, counts = completion_logps(
        policy_hidden, lm_head_weight, labels, bias, chunk_size=chunk_size, ignore_index=ignore_index
    )
    pc, pr = _split_pairs("policy_hidden", seq / counts.clamp(min=1))
    tok_c, _ = _split_pairs("policy_hidden", tok)
    cnt_c, _ = _split_pairs("labels", counts)
    return orpo_loss(pc, pr, _nll(tok_c, cnt_c), beta=beta)


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""SimPO (:func:`~alignlab.losses.preference.simpo_loss`) from hidden states (length-normalised by the
    scored-token counts).  Shapes, layout and errors as :func:`fused_linear_dpo`."""
    _, seq, counts = completion_logps(
        policy_hidden, lm_head_weight, labels, bias, chunk_size=chunk_size, ignore_index=ignore_index
    )
    pc, pr = _split_pairs("policy_hidden", seq)
    lc, lr = _split_pairs("labels", counts.clamp(min=1))
    return simpo_loss(pc, pr, beta=beta, gamma=gamma, label_smoothing=label_smoothing, chosen_lengths=lc, rejected_lengths=lr)


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
    average_log_prob: bool | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""CPO (:func:`~alignlab.losses.preference.cpo_loss`) from hidden states, NLL of the chosen completions
    included.  ``average_log_prob`` defaults to True for ``ipo``/``simpo`` (TRL's choice), else False.
    Shapes, layout and errors as :func:`fused_linear_dpo`."""
    tok, seq, counts = completion_logps(
        policy_hidden, lm_head_weight, labels, bias, chunk_size=chunk_size, ignore_index=ignore_index
    )
    if average_log_prob is None:
        average_log_prob = loss_type in ("ipo", "simpo")
    if average_log_prob:
        seq = seq / counts.clamp(min=1)
    pc, pr = _split_pairs("policy_hidden", seq)
    tok_c, _ = _split_pairs("policy_hidden", tok)
    cnt_c, _ = _split_pairs("labels", counts)
    return cpo_loss(
        pc, pr, _nll(tok_c, cnt_c) if cpo_alpha else None, beta=beta, loss_type=loss_type,
        label_smoothing=label_smoothing, cpo_alpha=cpo_alpha, simpo_gamma=simpo_gamma,
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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""KTO (:func:`~alignlab.losses.preference.kto_loss`) from hidden states, on unpaired completions.

    Args:
        policy_hidden: ``(batch, seq, hidden)`` (no chosen/rejected layout: ``desirable`` labels each row).
        labels: ``(batch, seq)`` aligned with ``policy_hidden``.
        desirable: ``(batch,)`` bool.
        ref_logps: ``(batch,)`` reference log-probs, or ``ref_hidden`` (+ ``ref_weight``/``ref_bias``).
        kl, policy_kl_logps, ref_kl_logps: the KL reference point, as ``kto_loss``.

    Returns / Raises: as :func:`~alignlab.losses.preference.kto_loss`.
    """
    _, seq, _ = completion_logps(
        policy_hidden, lm_head_weight, labels, bias, chunk_size=chunk_size, ignore_index=ignore_index
    )
    if ref_hidden is not None:
        if ref_logps is not None:
            raise ValueError("pass either ref_hidden or ref_logps, not both")
        with torch.no_grad():
            w = lm_head_weight if ref_weight is None else ref_weight
            b = bias if ref_weight is None and ref_bias is None else ref_bias
            _, ref_logps, _ = completion_logps(
                ref_hidden.detach(), w.detach(), labels, None if b is None else b.detach(),
                chunk_size=chunk_size, ignore_index=ignore_index,
            )
    if ref_logps is None:
        raise ValueError("fused_linear_kto needs ref_logps or ref_hidden")
    return kto_loss(
        seq, ref_logps, desirable, policy_kl_logps, ref_kl_logps, beta=beta, desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight, kl=kl, loss_type=loss_type,
    )
