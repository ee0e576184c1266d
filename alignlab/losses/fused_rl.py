r"""GRPO-family RL losses straight from the last hidden states and the ``lm_head`` weight.

The loss of GRPO / DAPO / Dr. GRPO / GSPO (:func:`alignlab.losses.reward.grpo_loss`) needs, per completion
token, the log-prob :math:`\log\pi(y_t)` under the temperature-scaled policy and, for logging or an entropy
bonus, the entropy :math:`H_t` of :math:`\pi(\cdot\mid x_{<t})`.  The unfused path materialises the
``(batch·seq, vocab)`` logits (and their log-softmax and gradient) for that: 16k completion rows at the Qwen
vocabulary are 5 GB in bf16 per copy.  Here logits exist one chunk of rows at a time:

* per chunk ``Z = (H_c W^T + b) / \tau`` (the temperature folded into the matmul's ``alpha``), log-sum-exp,
  label logit and, when asked for, the entropy :math:`H_t = \mathrm{lse}_t - \sum_v p_v z_v` from the row
  kernel of :mod:`alignlab.kernels.linear_logprobs` (one pass over the chunk);
* the loss is linear in per-token terms (each aggregation is a weighted token sum with weights known before
  the pass), so the upstream gradients :math:`\partial\mathcal L/\partial\log\pi(y_t)` and
  :math:`\partial\mathcal L/\partial H_t` of the chunk's tokens come from a tiny autograd over ``(rows,)``
  vectors of the shared formula (:func:`~alignlab.losses.reward.clipped_surrogate`,
  :func:`~alignlab.losses.reward.kl_penalty`);
* the same kernel turns them into ``dL/dZ`` in place, :math:`\partial\log\pi(y)/\partial z_v = [v=y] - p_v`,
  :math:`\partial H/\partial z_v = -p_v (z_v - \sum_u p_u z_u)`, fed to the chunk's two gradient matmuls.

Token-level ratios cost three matmuls in all (Liger-Kernel's count): one pass, forward and backward per
chunk.  GSPO's sequence-level ratio (and sequence-level importance weights without ``old_logprobs``) couple
the tokens of a sequence, so a statistics pass comes first and the gradient pass recomputes each chunk
(four matmuls); so does float16, whose chunks are written for the gradients over one power of two found
from all of them (a small per-token gradient times ``p_v`` would flush to zero in fp16).  Everything is
computed in the forward call; backward only scales the stored gradients (use them once, as the eager
schedule of :mod:`alignlab.losses.fused_preference`).  The returned loss and
metrics are :func:`~alignlab.losses.reward.grpo_loss` applied to the streamed log-probs: the numbers are the
unfused ones.

Layouts: padded ``hidden`` ``(batch, seq, hidden)`` with ``completion_ids`` ``(batch, seq)`` **aligned** with it
(``hidden[:, t]`` scores ``completion_ids[:, t]``: for a causal LM, the hidden states at positions
``prompt_len - 1 … -2``), or padding-free: ``hidden`` ``(total, hidden)`` / ``(1, total, hidden)`` with
``cu_seqlens`` ``(n_seq + 1,)`` (sequence boundaries, as FlashAttention's varlen; from packed
``position_ids`` via :func:`alignlab.data.cu_seq_lens_from_position_ids`); per-token inputs then come in the
packed layout and ``advantages`` as ``(n_seq,)``.
"""

from __future__ import annotations

import torch

from alignlab._checks import ArgumentTypeError, as_bool, check_finite_number, is_finite_real, is_int, is_real
from alignlab.kernels.linear_logprobs import chunk_softmax_grad_
from alignlab.losses.logprobs import (
    _fp16_grad_unit,
    check_mask_values,
    chunk_backward,
    default_chunk_rows,
    hand_over_grads,
)
from alignlab.losses.preference import step_count
from alignlab.losses.reward import (
    check_grpo_options,
    entropy_normaliser,
    grpo_loss,
    is_weights,
    kl_penalty,
    weighted_surrogate,
)

__all__ = ["fused_linear_grpo", "packed_to_padded"]

# As for the cross-entropy: the weight gradient (vocab x hidden) is read and written once per chunk, so
# larger chunks than the log-prob default pay off on the GPU (2048 rows of a 152k vocabulary in bf16).
_CUDA_CHUNK_BYTES = 2**30


def packed_to_padded(
    values: torch.Tensor, cu_seqlens: torch.Tensor, fill: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack a padding-free tensor into a padded batch (differentiable gather).

    Args:
        values: ``(total, ...)`` (or ``(1, total, ...)``) sequences concatenated. A first dim of 1 is read as the
            batch dim of ``(1, total, ...)`` wherever that fits ``cu_seqlens`` (for total = 1: a second dim of 1 too),
            so ``(1, 1, H)`` and ``(1, 1)`` give ``(1, 1, H)`` and ``(1, 1)``, as ``(1, 2, H)`` gives ``(1, 2, H)``.
        cu_seqlens: ``(n_seq + 1,)`` int boundaries, ``0 = c_0 <= c_1 <= … = total``.
        fill: value at padded positions.

    Returns:
        ``(padded, mask)``: ``(n_seq, max_len, ...)`` and the ``(n_seq, max_len)`` bool mask of real positions.

    Raises:
        ValueError: ``cu_seqlens`` not 1-D, not starting at 0, decreasing, or not ending at ``total``.
        TypeError: ``values`` or ``cu_seqlens`` not a tensor (an :class:`~alignlab.ArgumentTypeError`, a ``ValueError``
            too).
    """
    if not isinstance(values, torch.Tensor):  # a list failed in _packed_rows on values.dim()
        raise ArgumentTypeError(f"values must be a tensor (total, ...), got {type(values).__name__}")
    flat = _packed_rows(values, cu_seqlens)
    total = flat.shape[0]
    pos, n_seq, length = _packed_positions(cu_seqlens, total)
    out = flat.new_full((n_seq * length,) + flat.shape[1:], fill)
    out = out.index_copy(0, pos, flat)
    mask = torch.zeros(n_seq * length, dtype=torch.bool, device=flat.device)
    mask[pos] = True
    return out.view((n_seq, length) + flat.shape[1:]), mask.view(n_seq, length)


def _packed_rows(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``values`` as ``(total, ...)``: ``values[0]`` where it is ``(1, total, ...)`` (a first dim of 1, and a second
    dim that is the packed length where the first one could be it too: total = 1), else ``values``."""
    end = int(cu_seqlens[-1]) if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.numel() else -1
    if values.dim() >= 2 and values.shape[0] == 1 and (end != 1 or values.shape[1] == 1):
        return values[0]
    return values


def _packed_positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, int, int]:
    """Padded flat position of every packed row, the number of sequences and the longest length."""
    # (1,) = [0] is a batch of no sequence, as a padded batch may have 0 rows
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        got = getattr(cu_seqlens, "shape", cu_seqlens)
        kind = ValueError if isinstance(cu_seqlens, torch.Tensor) else ArgumentTypeError
        raise kind(f"cu_seqlens must be a 1-D tensor (n_seq + 1,), got {got}")
    if cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must hold integers, got {cu_seqlens.dtype}")
    cu = cu_seqlens.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or bool((lens < 0).any()) or int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens must rise from 0 to the packed length {total}, got {cu_seqlens.tolist()}")
    n_seq = lens.numel()
    length = max(int(lens.max()), 1) if n_seq else 1
    seq = torch.repeat_interleave(torch.arange(n_seq, device=cu.device), lens)
    pos = seq * length + (torch.arange(total, device=cu.device) - cu[:-1][seq])
    return pos, n_seq, length


# ------------------------------------------------------------------------------------------------------------------
# the chunked pass
# ------------------------------------------------------------------------------------------------------------------
def _logits(h_c, w_t, bias, scale, out):
    if bias is not None:
        return torch.addmm(bias, h_c, w_t, beta=scale, alpha=scale, out=out)
    if scale == 1.0:
        return torch.mm(h_c, w_t, out=out)
    return torch.addmm(out, h_c, w_t, beta=0.0, alpha=scale, out=out)


def _stream(h, weight, bias, y, scale, chunk, want_entropy, grad_fn, need):
    """Walk the rows in chunks: statistics, and with ``grad_fn`` the gradient matmuls of each chunk.

    ``grad_fn(s, e, logp, entropy) -> (g_logp, g_entropy | None)`` gives the upstream gradients of the chunk's
    rows.  Returns ``(logp, entropy | None, grad_h, grad_w, grad_b)``.
    """
    rows, vocab = y.shape[0], weight.shape[0]
    dev = h.device
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    need_h, need_w, need_b = need if grad_fn is not None else (False, False, False)
    need_b = need_b and bias is not None
    logp = torch.empty(rows, dtype=acc, device=dev)
    ent = torch.empty(rows, dtype=acc, device=dev) if want_entropy else None
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = None
    grad_b = torch.zeros(vocab, dtype=acc, device=dev) if need_b else None
    if rows == 0:
        return logp, ent, grad_h, (torch.zeros_like(weight) if need_w else None), grad_b
    buf = torch.empty(min(chunk, rows), vocab, dtype=h.dtype, device=dev)
    w_t = weight.t()
    for s in range(0, rows, chunk):
        e = min(s + chunk, rows)
        z = _logits(h[s:e], w_t, bias, scale, buf[: e - s])
        st = chunk_softmax_grad_(z, y[s:e], want_entropy=want_entropy, labels_checked=True)  # fused_linear_grpo did
        logp[s:e] = st.target - st.lse
        if want_entropy:
            ent[s:e] = st.entropy
        if grad_fn is None:
            continue
        g_lp, g_ent = grad_fn(s, e, logp[s:e], None if ent is None else ent[s:e])
        # the kernel writes the gradient of sum_t (g_t (lse_t - z_y) + e_t H_t) over the chunk: log-probs are
        # minus the first term, and dz/dZ_raw = scale (the temperature)
        chunk_softmax_grad_(z, y[s:e], lse=st.lse, grad_scale=-g_lp * scale,
                            expected=st.expected if g_ent is not None else None,
                            entropy_grad=None if g_ent is None else g_ent * scale, labels_checked=True)
        grad_w = chunk_backward(z, h[s:e], weight, grad_h[s:e] if need_h else None, grad_w, grad_b, need_w)
    return logp, ent, grad_h, grad_w, grad_b


_SECOND_BACKWARD = ("fused_linear_grpo computes its gradients in the forward call and hands them over in the first "
                    "backward; a second backward through the same loss has none left (it gave no gradient at all "
                    "before): compute the loss again for another backward")

class _FusedGRPO(torch.autograd.Function):
    """Gradients computed in the forward call by ``compute(need) -> (grad_h_rows, grad_w, grad_b, loss)``;
    backward scatters the hidden rows back and scales by the upstream gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, compute, rows):
        gh, gw, gb, loss = compute(ctx.needs_input_grad[:3])
        if gh is not None:
            n_total = hidden.numel() // hidden.shape[-1]
            if rows.numel() != n_total:
                gh = gh.new_zeros(n_total, hidden.shape[-1]).index_copy_(0, rows, gh)
            gh = gh.view(hidden.shape)
        ctx.grads = (gh, gw, None if gb is None else gb.to(bias.dtype))
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_loss):
        return (*hand_over_grads(ctx, grad_loss, _SECOND_BACKWARD), None, None)


def _token_grad_fn(row_pos, mask_pad, adv, old_pad, ref_pad, w_pad, samp_pad, opts, n_seq, length, want_ent_grad):
    """Upstream gradients of the loss w.r.t. each row's log-prob (and entropy) for token-level ratios.

    Every aggregation of ``grpo_loss`` is a weighted token sum with weights known up front, so a chunk's
    gradient needs only its own rows: it is the gradient of the chunk's share of the loss, by autograd over
    ``(rows,)`` vectors of the shared formula.
    """
    counts = mask_pad.sum(dim=1)
    n_tok_local = counts.sum()
    loss_type, num_items = opts["loss_type"], opts["num_items"]
    dev = mask_pad.device
    hi = opts["epsilon"] if opts["epsilon_high"] is None else opts["epsilon_high"]

    def norm(local, local_count):  # float64: the weights are rounded once, to the log-prob dtype, when used
        if num_items is None:
            return torch.as_tensor(local, device=dev).to(torch.float64).clamp(min=1)
        return step_count("num_items", num_items, local_count, torch.float64, dev)

    if loss_type == "grpo":
        seq_w = 1.0 / (counts.clamp(min=1) * norm(n_seq, n_seq))
    elif loss_type in ("bnpo", "dapo"):
        seq_w = (1.0 / norm(n_tok_local, n_tok_local)).expand(n_seq)
    else:
        mcl = opts["max_completion_length"] or length
        seq_w = (1.0 / (norm(n_seq, n_seq) * mcl)).expand(n_seq)
    n_tok_ent = entropy_normaliser(loss_type, num_items, opts["num_tokens"], n_tok_local, torch.float64)
    adv_tok = adv.dim() == 2

    def grad_fn(s, e, lp, ent):
        rp = row_pos[s:e]
        seq = torch.div(rp, length, rounding_mode="floor")
        dt = lp.dtype
        a = (adv.reshape(-1)[rp] if adv_tok else adv[seq]).to(dt)
        c = seq_w[seq].to(dt)
        with torch.enable_grad():
            leaf = lp.detach().requires_grad_(True)
            old = leaf.detach() if old_pad is None else old_pad[rp].to(dt)
            if w_pad is not None:
                w = w_pad[rp].to(dt)
            elif samp_pad is not None:
                w = is_weights(old, samp_pad[rp], torch.ones_like(old, dtype=torch.bool), opts["is_mode"],
                               opts["is_min"], opts["is_max"])
            else:
                w = None
            per = weighted_surrogate(leaf - old, a, opts["epsilon"], hi, w)
            if opts["beta"] > 0:
                per = per + opts["beta"] * kl_penalty(leaf, ref_pad[rp].to(dt), opts["kl_estimator"])
            total = (c * per).sum()
            leaves = [leaf]
            if want_ent_grad:
                leaf_e = ent.detach().requires_grad_(True)
                total = total - opts["entropy_coef"] * leaf_e.sum() / n_tok_ent.to(dt)
                leaves.append(leaf_e)
            grads = torch.autograd.grad(total, leaves)
        return grads[0], (grads[1] if want_ent_grad else None)

    return grad_fn


def _rows_of(grad_pad: torch.Tensor | None, row_pos: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if grad_pad is None:
        return torch.zeros_like(like)
    return grad_pad.reshape(-1).index_select(0, row_pos).to(like.dtype)


# ------------------------------------------------------------------------------------------------------------------
# the loss
# ------------------------------------------------------------------------------------------------------------------
def _token_input(name, t, like_shape, padded_index, n_pad, packed, device):
    """A per-token side input in the caller's layout → flat padded ``(n_pad,)`` float tensor (0 elsewhere)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):  # as grpo_loss: the wrong kind of thing a TypeError, a wrong dtype a ValueError
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.shape != like_shape:
        raise ValueError(f"{name} must have completion_ids' shape {tuple(like_shape)}, got {tuple(t.shape)}")
    flat = t.detach().reshape(-1).to(device)
    if not packed:
        return flat
    return flat.new_zeros(n_pad).index_copy(0, padded_index, flat)


def _check_bias(name: str, b, weight: torch.Tensor) -> None:
    """A head's bias: None, or a ``(vocab,)`` tensor in the head weight's dtype."""
    if b is None:
        return
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(b).__name__}")
    if b.shape != (weight.shape[0],) or b.dtype != weight.dtype:
        raise ValueError(f"{name} must be ({weight.shape[0]},) in {weight.dtype}, got {tuple(b.shape)} in {b.dtype}")


def _check_reference_head(hidden, lm_head_weight, ref_hidden, ref_weight, ref_bias) -> None:
    """``ref_hidden`` and the head that scores it (``ref_weight``, default the policy's, and ``ref_bias``).

    A reference head without ``ref_hidden`` was ignored without a word; an integer ``ref_weight`` turned the
    reference hidden states into integers (they are cast to the head's dtype) and a wrong-sized one failed inside
    a matmul without naming it.
    """
    if ref_hidden is None:
        if ref_weight is not None or ref_bias is not None:
            raise ValueError("ref_weight/ref_bias score ref_hidden, the reference hidden states, which was not given: "
                             "pass ref_hidden too, or drop them")
        return
    if not isinstance(ref_hidden, torch.Tensor) or not ref_hidden.is_floating_point():
        raise TypeError(f"ref_hidden must be a floating-point tensor, got "
                        f"{getattr(ref_hidden, 'dtype', type(ref_hidden).__name__)}")
    if ref_hidden.shape != hidden.shape:
        raise ValueError(f"ref_hidden must have hidden's shape {tuple(hidden.shape)}, got {tuple(ref_hidden.shape)}")
    if ref_weight is not None:
        if not isinstance(ref_weight, torch.Tensor) or not ref_weight.is_floating_point():
            raise TypeError(f"ref_weight must be a floating-point tensor, got "
                            f"{getattr(ref_weight, 'dtype', type(ref_weight).__name__)}")
        if ref_weight.dim() != 2 or ref_weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"ref_weight must be (vocab, hidden={hidden.shape[-1]}), got {tuple(ref_weight.shape)}")
    _check_bias("ref_bias", ref_bias, lm_head_weight if ref_weight is None else ref_weight)


def _check_devices(hidden: torch.Tensor, **tensors) -> None:
    """``ValueError`` naming the first given tensor that is not on ``hidden``'s device."""
    for name, t in tensors.items():
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} must be on hidden's device {hidden.device}, got {t.device}")


def fused_linear_grpo(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    sampling_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    kl_estimator: str = "k3",
    temperature: float = 1.0,
    compute_entropy: bool = False,
    entropy_coef: float = 0.0,
    is_mode: str = "token_truncate",
    is_min: float | None = None,
    is_max: float | None = 3.0,
    max_completion_length: int | None = None,
    num_items: int | torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    num_tokens: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""GRPO / BNPO / Dr. GRPO / DAPO / GSPO loss from hidden states, never materialising the full logits.

    Computes exactly :func:`~alignlab.losses.reward.grpo_loss` (same options, same metrics with TRL's names)
    on :math:`\log\pi(y_t) = \log\mathrm{softmax}((W h_t + b)/\tau)_{y_t}`; see the module docstring for the
    schedule.  The reference log-probs are ``ref_logprobs`` or are computed in the same call from
    ``ref_hidden`` (with ``ref_weight``/``ref_bias``, default the policy head; same temperature, no gradient).

    Args:
        hidden: ``(batch, seq, hidden)`` aligned with ``completion_ids``, or packed ``(total, hidden)`` /
            ``(1, total, hidden)`` with ``cu_seqlens``.
        lm_head_weight: ``(vocab, hidden)``, same dtype as ``hidden``.
        completion_ids: ``(batch, seq)`` (packed: ``(total,)`` / ``(1, total)``) sampled token ids.
        advantages: ``(batch,)`` (packed: ``(n_seq,)``) or per token in ``completion_ids``' layout.
        completion_mask: tokens that count (default all), bools or exactly 0/1; masked rows cost no matmul.
        old_logprobs, ref_logprobs, sampling_logprobs: per-token, in ``completion_ids``' layout.
        beta, epsilon, epsilon_high, loss_type: as ``grpo_loss``.
        importance_sampling_level, kl_estimator, entropy_coef: as ``grpo_loss``.
        is_mode, is_min, is_max, max_completion_length, num_items, num_tokens: as ``grpo_loss``.
        temperature: :math:`\tau > 0` of the sampler (TRL divides the logits by it).
        compute_entropy: report the ``entropy`` metric (implied by ``entropy_coef != 0``).
        cu_seqlens: ``(n_seq + 1,)`` boundaries of the packed layout.
        chunk_size: rows of logits per chunk (default: 1 GiB of logits on CUDA, 32 MiB on CPU).

    Returns:
        ``(loss, metrics)`` as ``grpo_loss``; gradients reach ``hidden``, ``lm_head_weight`` and ``bias``.

    Raises:
        TypeError: non-float hidden/weight/``ref_hidden``/``ref_weight``, integer ids of the wrong kind, dtype
            mismatches, a ``bias``/``ref_bias`` that is not a tensor, ``compute_entropy`` not a bool; a per-token
            input (``old_logprobs``, ``sampling_logprobs``, ``ref_logprobs``, per-token ``advantages``) or a
            ``completion_mask`` that is not a tensor (as :func:`~alignlab.losses.reward.grpo_loss`); ``temperature``
            not a real number, ``chunk_size`` neither an int nor None (an :class:`~alignlab.ArgumentTypeError`, a
            ``ValueError`` too).
        ValueError: bad shapes (``ref_weight``, ``bias`` and ``ref_bias`` included), tensors off ``hidden``'s device,
            unknown options (as ``grpo_loss``), both ``ref_logprobs`` and ``ref_hidden``, ``ref_weight``/``ref_bias``
            without ``ref_hidden``, ids outside ``[0, vocab)`` of the policy's or the reference's head,
            ``temperature`` not finite and > 0, ``chunk_size < 1``, a bad ``cu_seqlens``, a ``completion_mask`` holding anything but bools or 0/1
            (a 2 or a 0.5: it selects tokens, it does not weigh them), a per-token input that is not floating-point.
    """
    # ---- checks -------------------------------------------------------------------------------------------
    for name, t in (("hidden", hidden), ("lm_head_weight", lm_head_weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
    if not isinstance(completion_ids, torch.Tensor) or completion_ids.is_floating_point() or \
            completion_ids.dtype == torch.bool:
        raise TypeError(f"completion_ids must be an integer tensor, got {getattr(completion_ids, 'dtype', None)}")
    if hidden.dim() < 1:
        raise ValueError("hidden must be (batch, seq, hidden) or packed (total, hidden), got a 0-d tensor")
    if lm_head_weight.dim() != 2 or hidden.shape[-1] != lm_head_weight.shape[1]:
        raise ValueError(
            f"lm_head_weight must be (vocab, hidden={hidden.shape[-1]}), got {tuple(lm_head_weight.shape)}")
    if hidden.dtype != lm_head_weight.dtype:
        raise TypeError(f"hidden and lm_head_weight must share a dtype, got {hidden.dtype}, {lm_head_weight.dtype}")
    _check_bias("bias", bias, lm_head_weight)
    _check_reference_head(hidden, lm_head_weight, ref_hidden, ref_weight, ref_bias)
    # a meta-device head gave a loss and gradients read from a logits buffer the matmul never wrote
    _check_devices(hidden, lm_head_weight=lm_head_weight, completion_ids=completion_ids, bias=bias,
                   ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
    if hidden.shape[:-1] != completion_ids.shape:
        raise ValueError(f"completion_ids must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(completion_ids.shape)}")
    # inline, not the shared checks: every call runs these, and the valid path stays as cheap as it was
    if not is_finite_real(temperature) or not temperature > 0:
        kind = ValueError if is_real(temperature) else ArgumentTypeError
        raise kind(f"temperature must be a finite number > 0, got {temperature!r}")
    temperature = float(temperature)
    if chunk_size is not None and (not is_int(chunk_size) or chunk_size < 1):
        kind = ValueError if is_int(chunk_size) else ArgumentTypeError
        raise kind(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    check_grpo_options(loss_type, importance_sampling_level, kl_estimator, is_mode)
    compute_entropy = as_bool(compute_entropy, "compute_entropy")
    if ref_hidden is not None and ref_logprobs is not None:
        raise ValueError("pass either ref_logprobs or ref_hidden, not both")
    beta = check_finite_number(beta, "beta", minimum=0.0)  # the rest of the numbers: grpo_loss on the probe below
    if beta > 0 and ref_hidden is None and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs or ref_hidden")
    epsilon = check_finite_number(epsilon, "epsilon")
    hi = epsilon if epsilon_high is None else check_finite_number(epsilon_high, "epsilon_high")
    if not (epsilon > 0 and hi > 0):
        raise ValueError(f"epsilon and epsilon_high must be > 0, got {epsilon!r}, {epsilon_high!r}")
    dev, vocab, hdim = hidden.device, lm_head_weight.shape[0], hidden.shape[-1]
    packed = cu_seqlens is not None
    if not packed and completion_ids.dim() != 2:
        raise ValueError(
            f"completion_ids must be (batch, seq) (or packed with cu_seqlens), got {tuple(completion_ids.shape)}")
    if packed and not (completion_ids.dim() == 1 or (completion_ids.dim() == 2 and completion_ids.shape[0] == 1)):
        raise ValueError(f"packed completion_ids must be (total,) or (1, total), got {tuple(completion_ids.shape)}")
    if completion_mask is not None:
        check_mask_values(completion_mask, "completion_mask")
        if completion_mask.shape != completion_ids.shape:
            raise ValueError(f"completion_mask must have completion_ids' shape {tuple(completion_ids.shape)}, "
                             f"got {tuple(completion_mask.shape)}")

    # ---- layout: everything as a flat padded (n_seq * length) grid; rows = the masked-in tokens ------------
    ids = completion_ids.reshape(-1)
    total = ids.numel()
    keep = torch.ones(total, dtype=torch.bool, device=dev) if completion_mask is None else \
        completion_mask.reshape(-1).to(device=dev, dtype=torch.bool)
    if packed:
        # checked before the move: a list here raised AttributeError ('list' object has no attribute 'to')
        cu = cu_seqlens.to(dev) if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens
        pos, n_seq, length = _packed_positions(cu, total)
    else:
        n_seq, length = completion_ids.shape
        pos = None
    n_pad = n_seq * length
    rows = keep.nonzero().squeeze(1)
    y = ids.index_select(0, rows).to(torch.int64)
    if y.numel():
        lo, hi_id = torch.stack(torch.aminmax(y)).tolist()
        if lo < 0 or hi_id >= vocab:
            raise ValueError(f"completion_ids must be in [0, {vocab}) where the mask is set")
    row_pos = rows if pos is None else pos.index_select(0, rows)  # padded position of each row
    mask_pad = torch.zeros(n_pad, dtype=torch.bool, device=dev)
    mask_pad[row_pos] = True
    mask_pad = mask_pad.view(n_seq, length)
    all_rows = rows.numel() == total  # nothing masked: the rows are a view, no copy

    def select(t):
        flat = t.reshape(-1, hdim)
        return flat if all_rows else flat.index_select(0, rows)

    h_rows = select(hidden)

    def side(name, t):
        return _token_input(name, t, completion_ids.shape, pos, n_pad, packed, dev)

    old_pad, samp_pad = side("old_logprobs", old_logprobs), side("sampling_logprobs", sampling_logprobs)
    scale = 1.0 / float(temperature)
    want_entropy = bool(compute_entropy or entropy_coef)
    step = chunk_size or default_chunk_rows(max(1, y.numel()), vocab, hidden.element_size(), dev, _CUDA_CHUNK_BYTES)
    if ref_hidden is not None:
        rw = (lm_head_weight if ref_weight is None else ref_weight).detach()
        if y.numel() and hi_id >= rw.shape[0]:  # the row kernel would read past the reference logits
            raise ValueError(f"completion_ids must be in [0, {rw.shape[0]}) (ref_weight's vocabulary) where the mask "
                             "is set")
        rb = bias if ref_weight is None and ref_bias is None else ref_bias
        with torch.no_grad():
            ref_rows, *_ = _stream(select(ref_hidden.detach()).to(rw.dtype), rw,
                                   None if rb is None else rb.detach(), y, scale, step, False, None, None)
        ref_pad = ref_rows.new_zeros(n_pad).index_copy(0, row_pos, ref_rows)
    else:
        ref_pad = side("ref_logprobs", ref_logprobs)
    if isinstance(advantages, torch.Tensor) and advantages.dim() == 1 and advantages.shape[0] == n_seq:
        adv = advantages.detach().to(dev)
    elif packed:
        if isinstance(advantages, torch.Tensor) and advantages.shape != completion_ids.shape:
            raise ValueError(f"advantages must have shape ({n_seq},) (one per packed sequence) or completion_ids' "
                             f"shape {tuple(completion_ids.shape)} (one per token), got {tuple(advantages.shape)}")
        adv = side("advantages", advantages).view(n_seq, length)
    else:
        adv = advantages.detach() if isinstance(advantages, torch.Tensor) else advantages
    opts = dict(epsilon=epsilon, epsilon_high=epsilon_high, loss_type=loss_type, beta=beta,
                max_completion_length=max_completion_length, num_items=num_items, num_tokens=num_tokens,
                importance_sampling_level=importance_sampling_level, kl_estimator=kl_estimator,
                entropy_coef=entropy_coef, is_mode=is_mode, is_min=is_min, is_max=is_max)

    def padded(values_rows):
        return values_rows.new_zeros(n_pad).index_copy(0, row_pos, values_rows).view(n_seq, length)

    def view(t):
        return None if t is None else t.view(n_seq, length)

    def full_loss(lp_pad, ent_pad):
        return grpo_loss(lp_pad, adv, mask_pad, view(old_pad), view(ref_pad), entropy=ent_pad,
                         sampling_logprobs=view(samp_pad), **opts)

    # validate the options and shapes once, on zeros, before any matmul
    with torch.no_grad():
        probe = torch.zeros(n_seq, length, dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32,
                            device=dev)
        full_loss(probe, probe if want_entropy else None)

    w_pad = None
    if samp_pad is not None and old_pad is not None:  # importance weights known up front
        # in the dtype grpo_loss computes them in (float64 log-probs: float32 sampler log-probs are widened first)
        wdt = torch.promote_types(probe.dtype, adv.dtype) if isinstance(adv, torch.Tensor) else probe.dtype
        w_pad = is_weights(view(old_pad).to(wdt), view(samp_pad), mask_pad, is_mode, is_min, is_max)
        w_pad = w_pad.expand(n_seq, length)
        w_pad = w_pad.reshape(-1)
    # fp16 takes the two passes too: dZ = g p_v of a small g would flush in the fp16 chunk, and only with every
    # g known before the gradient pass can all chunks be written for g over one power of two
    one_pass = importance_sampling_level == "token" and (w_pad is not None or samp_pad is None
                                                         or is_mode.startswith("token")) \
        and hidden.dtype != torch.float16
    ent_grad = bool(entropy_coef)

    def compute(need):
        if not any(need):
            lp, ent, *_ = _stream(h_rows, lm_head_weight, bias, y, scale, step, want_entropy, None, need)
            return None, None, None, _finish(lp, ent)
        if one_pass:
            grad_fn = _token_grad_fn(row_pos, mask_pad, adv, old_pad, ref_pad, w_pad, samp_pad, opts, n_seq, length,
                                     ent_grad)
            lp, ent, gh, gw, gb = _stream(h_rows, lm_head_weight, bias, y, scale, step, want_entropy, grad_fn, need)
            return gh, gw, gb, _finish(lp, ent)
        # sequence coupling: statistics first, the gradient of the whole loss, then recompute each chunk
        lp, ent, *_ = _stream(h_rows, lm_head_weight, bias, y, scale, step, want_entropy, None, need)
        with torch.enable_grad():
            leaf_lp = padded(lp).requires_grad_(True)
            leaf_ent = padded(ent).requires_grad_(True) if ent_grad else None
            loss_, _ = full_loss(leaf_lp, leaf_ent if ent_grad else (padded(ent) if ent is not None else None))
            grads = torch.autograd.grad(loss_, [t for t in (leaf_lp, leaf_ent) if t is not None], allow_unused=True)
        g_lp = _rows_of(grads[0], row_pos, lp)
        g_ent = _rows_of(grads[1], row_pos, lp) if ent_grad else None
        unit = None
        if h_rows.dtype == torch.float16 and g_lp.numel():
            unit = _fp16_grad_unit(g_lp if g_ent is None else torch.cat([g_lp, g_ent]))
            g_lp, g_ent = g_lp / unit, None if g_ent is None else g_ent / unit
        _, _, gh, gw, gb = _stream(h_rows, lm_head_weight, bias, y, scale, step, ent_grad,
                                   lambda s, e, _lp, _ent: (g_lp[s:e], None if g_ent is None else g_ent[s:e]), need)
        if unit is not None:
            gh, gw, gb = (None if t is None else t.mul_(unit) for t in (gh, gw, gb))
        return gh, gw, gb, _finish(lp, ent)

    result: dict = {}

    def _finish(lp, ent):
        with torch.no_grad():
            loss_, metrics = full_loss(padded(lp), None if ent is None else padded(ent))
        result["metrics"] = metrics
        return loss_

    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, lm_head_weight, bias))):
        with torch.no_grad():
            _, _, _, loss = compute((False, False, False))
        return loss, result["metrics"]
    loss = _FusedGRPO.apply(hidden, lm_head_weight, bias, compute, rows)
    return loss, result["metrics"]
