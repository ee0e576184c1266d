"""RoPE frequency scaling for context extension.

Rotary position embeddings (RoFormer, arXiv:2104.09864) rotate the pair of
channels ``(2i, 2i+1)`` — HF lays them out as ``(i, i + d/2)`` — of queries and
keys at position ``m`` by the angle ``m θ_i`` with

    θ_i = b^{-2i/d},   i = 0 … d/2 - 1,

``b`` the base (``rope_theta``) and ``d`` the rotary dimension. Every method in
this file changes the ``inv_freq`` vector ``θ`` (and some a scalar attention
temperature) so that a model pre-trained on ``L`` positions works on
``s · L``:

* linear (PI): ``θ_i / s`` — arXiv:2306.15595;
* NTK-aware: base ``b' = b · s^{d/(d-2)}`` — bloc97 (2023), arXiv:2309.00071 §3.1;
* dynamic NTK: NTK-aware with ``s' = max(1, s·ℓ/L - (s-1))`` at the current
  length ``ℓ`` — emozilla (2023), arXiv:2309.00071 §3.3;
* YaRN: ``w_i θ_i/s + (1-w_i) θ_i`` with a ramp ``w`` over the pairs, plus an
  attention temperature — arXiv:2309.00071;
* LongRoPE: ``θ_i / λ_i`` with searched per-pair factors ``λ`` — arXiv:2402.13753.

All functions return float32 tensors of shape ``(d/2,)``; the attention
scaling (``mscale``) multiplies ``cos`` and ``sin`` — i.e. both ``q`` and
``k`` — so the logits are scaled by its square, as in the YaRN paper.

:func:`apply_rope_scaling` puts a choice into a Hugging Face ``transformers``
model: it writes the matching ``rope_parameters`` into ``model.config`` (so
that ``save_pretrained`` / ``from_pretrained`` reproduce it with stock
``transformers``) and swaps each rotary module for a
:class:`ScaledRotaryEmbedding` computed by this file.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from alignlab._checks import (ArgumentTypeError, as_bool, check_finite_number, check_number_in_range,
                              check_positive_int, check_positive_number, is_int, is_real)

__all__ = [
    "RopeScaling",
    "ScaledRotaryEmbedding",
    "apply_rope_scaling",
    "dynamic_ntk_inv_freq",
    "linear_inv_freq",
    "longrope_attention_scaling",
    "longrope_inv_freq",
    "ntk_inv_freq",
    "rope_inv_freq",
    "scaled_inv_freq",
    "yarn_attention_scaling",
    "yarn_inv_freq",
    "yarn_ramp",
]

KINDS = ("linear", "ntk", "dynamic", "yarn", "longrope")


def _check_dim_base(dim: int, base: float) -> None:
    if not is_int(dim) or dim < 2 or dim % 2:
        kind = ValueError if is_int(dim) else ArgumentTypeError
        raise kind(f"dim must be an even int >= 2, got {dim!r}")
    check_number_in_range(base, "base", 1, low_open=True)  # finite: inf would zero every frequency but the first


def _check_length(value, name: str, minimum: int = 1) -> int:
    """A length (``seq_len``, ``original_max_position_embeddings``) as a Python int >= ``minimum``; a 0-d
    integer tensor (``position_ids.max() + 1``) is read as its value."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = value.item()
    if not is_int(value) or value < minimum:
        kind = ValueError if is_int(value) else ArgumentTypeError
        raise kind(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_factor(factor: float, name: str = "factor") -> float:
    """``factor`` as a Python float: a finite real >= 1 (NumPy scalars too; a bool is not)."""
    return check_finite_number(factor, name, minimum=1.0)


def rope_inv_freq(dim: int, base: float = 10000.0, device: torch.device | str | None = None) -> torch.Tensor:
    """Unscaled RoPE inverse frequencies ``θ_i = base^{-2i/dim}``, shape ``(dim/2,)``.

    Raises ``ValueError`` if ``dim`` is not an even int >= 2 or ``base`` not a finite number > 1 (an
    :class:`~alignlab.ArgumentTypeError`, a ``TypeError`` too, for a ``dim`` that is no int or a ``base`` that is no
    number).
    """
    _check_dim_base(dim, base)
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim
    return 1.0 / (base**exponent)


def linear_inv_freq(dim: int, base: float, factor: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Position interpolation: ``θ_i / s``, i.e. position ``m`` is read as ``m / s``.

    "Extending Context Window of Large Language Models via Positional
    Interpolation", Chen et al., arXiv:2306.15595. Shape ``(dim/2,)``.
    """
    factor = _check_factor(factor)
    return rope_inv_freq(dim, base, device) / factor


def ntk_inv_freq(dim: int, base: float, factor: float, device: torch.device | str | None = None) -> torch.Tensor:
    """NTK-aware scaling: same formula with the base raised to ``b' = b · s^{d/(d-2)}``.

    The exponent makes the lowest frequency ``θ_{d/2-1}`` exactly ``s`` times
    smaller (interpolated) while the highest, ``θ_0 = 1``, is untouched
    (extrapolated). Introduced by bloc97 (Reddit, 2023); written up in YaRN,
    arXiv:2309.00071 §3.1. Shape ``(dim/2,)``. Raises ``ValueError`` for
    ``dim == 2`` (the exponent is undefined).
    """
    factor = _check_factor(factor)
    _check_dim_base(dim, base)
    if dim == 2:
        raise ValueError("ntk scaling needs dim > 2 (exponent d/(d-2))")
    return rope_inv_freq(dim, base * factor ** (dim / (dim - 2)), device)


def dynamic_ntk_inv_freq(
    dim: int,
    base: float,
    factor: float,
    seq_len: int,
    original_max_position_embeddings: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dynamic NTK: NTK-aware scaling whose factor grows with the current length ``ℓ``.

    ``s' = s · ℓ / L - (s - 1)`` for ``ℓ > L`` (``s' = 1`` otherwise), then
    ``b' = b · s'^{d/(d-2)}`` — the form used by ``transformers`` and by
    emozilla's original post; see also YaRN, arXiv:2309.00071 §3.3.
    Recompute it for every forward pass (``ℓ`` = largest position + 1).
    Shape ``(dim/2,)``. Raises ``ValueError`` unless both lengths are ints >= 1
    (a 0-d integer tensor is taken).
    """
    factor = _check_factor(factor)
    seq_len = _check_length(seq_len, "seq_len")
    original_max_position_embeddings = _check_length(original_max_position_embeddings,
                                                     "original_max_position_embeddings")
    length = max(seq_len, original_max_position_embeddings)
    effective = factor * length / original_max_position_embeddings - (factor - 1.0)
    return ntk_inv_freq(dim, base, effective, device)


def yarn_ramp(dim: int, base: float, original_max_position_embeddings: int, beta_fast: float = 32.0,
              beta_slow: float = 1.0, truncate: bool = True) -> torch.Tensor:
    """YaRN's per-pair interpolation weight ``w_i`` in ``[0, 1]`` (1 = fully interpolated), shape ``(dim/2,)``.

    Pair ``i`` turns ``r_i = L θ_i / 2π`` times over the original context
    ``L``. Pairs with ``r_i > β_fast`` (high frequency) keep ``θ_i``
    (weight 0); pairs with ``r_i < β_slow`` are fully interpolated (weight 1);
    in between the weight is linear in ``i`` between the pair indices

        i(r) = d · ln(L / (2π r)) / (2 ln b),

    rounded outward (floor / ceil) when ``truncate``; the bounds are clamped to
    ``[0, d-1]`` like the reference code. arXiv:2309.00071 §3.2.
    """
    _check_dim_base(dim, base)
    original_max_position_embeddings = _check_length(original_max_position_embeddings,
                                                     "original_max_position_embeddings")
    truncate = as_bool(truncate, "truncate")  # (truthiness read "no" as True and None as False)
    beta_fast = check_finite_number(beta_fast, "beta_fast")  # (a str failed in the comparison, inf in math.log)
    beta_slow = check_finite_number(beta_slow, "beta_slow")
    if not beta_fast > beta_slow > 0:
        raise ValueError(f"need beta_fast > beta_slow > 0, got beta_fast={beta_fast}, beta_slow={beta_slow}")

    def pair_index(rotations: float) -> float:
        return dim * math.log(original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = pair_index(beta_fast), pair_index(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if high == low:
        high += 1e-3  # a step instead of a 0/0 ramp
    i = torch.arange(dim // 2, dtype=torch.float32)
    return ((i - low) / (high - low)).clamp(0.0, 1.0)


def yarn_attention_scaling(factor: float, mscale: float = 1.0, mscale_all_dim: float | None = None) -> float:
    """YaRN's ``sqrt(1/t) = 0.1 · ln(s) + 1`` (1 for ``s <= 1``), applied to cos and sin.

    With DeepSeek's ``mscale`` / ``mscale_all_dim`` pair the value is the ratio
    ``(0.1·mscale·ln s + 1) / (0.1·mscale_all_dim·ln s + 1)``. arXiv:2309.00071 §3.4.
    Raises ``ValueError`` naming an argument that is not a finite number, a ``factor`` that is not > 0 or a
    negative ``mscale`` / ``mscale_all_dim`` (``mscale_all_dim`` may be None), as :class:`RopeScaling` does.
    """
    check_number_in_range(factor, "factor", low=0, low_open=True)
    check_finite_number(mscale, "mscale", minimum=0)
    if mscale_all_dim is not None:
        check_finite_number(mscale_all_dim, "mscale_all_dim", minimum=0)

    def m(scale: float, k: float) -> float:
        return 1.0 if scale <= 1.0 else 0.1 * k * math.log(scale) + 1.0

    if mscale_all_dim:
        return m(factor, mscale) / m(factor, mscale_all_dim)
    return m(factor, mscale)


def yarn_inv_freq(
    dim: int,
    base: float,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """YaRN "NTK-by-parts" frequencies ``w_i θ_i / s + (1 - w_i) θ_i`` with ``w = yarn_ramp(...)``.

    "YaRN: Efficient Context Window Extension of Large Language Models",
    Peng et al., arXiv:2309.00071. Pair with :func:`yarn_attention_scaling`.
    Shape ``(dim/2,)``.
    """
    factor = _check_factor(factor)
    theta = rope_inv_freq(dim, base, device)
    w = yarn_ramp(dim, base, original_max_position_embeddings, beta_fast, beta_slow, truncate).to(theta.device)
    return w * (theta / factor) + (1.0 - w) * theta


def longrope_inv_freq(
    dim: int, base: float, factors: Sequence[float] | torch.Tensor, device: torch.device | str | None = None
) -> torch.Tensor:
    """LongRoPE per-dimension rescaling ``θ_i / λ_i``, shape ``(dim/2,)``.

    "LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens", Ding et
    al., arXiv:2402.13753: the ``λ_i`` (one per pair, usually non-decreasing
    in ``i``) come from an evolutionary search. Phi-3 ships two sets: a
    ``short`` one for lengths within the original window and a ``long`` one
    beyond it. Raises ``ValueError`` if ``len(factors) != dim/2`` or a factor is
    not positive.
    """
    _check_dim_base(dim, base)
    lam = torch.as_tensor(factors, dtype=torch.float32, device=device).flatten()
    if lam.numel() != dim // 2:
        raise ValueError(f"factors must have dim/2 = {dim // 2} entries, got {lam.numel()}")
    if not bool((lam > 0).all()) or not bool(torch.isfinite(lam).all()):
        raise ValueError("factors must be finite and > 0")
    return rope_inv_freq(dim, base, device) / lam


def longrope_attention_scaling(factor: float, original_max_position_embeddings: int) -> float:
    """LongRoPE / Phi-3 attention scaling ``sqrt(1 + ln s / ln L)`` (1 for ``s <= 1``).

    Raises ``ValueError`` unless ``factor`` is a finite number > 0 and ``original_max_position_embeddings`` an
    int >= 2 (``ln L`` divides).
    """
    check_number_in_range(factor, "factor", low=0, low_open=True)
    _check_length(original_max_position_embeddings, "original_max_position_embeddings", minimum=2)
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(factor) / math.log(original_max_position_embeddings))


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE context-extension choice.

    Args:
        kind: ``"linear"``, ``"ntk"``, ``"dynamic"``, ``"yarn"`` or ``"longrope"``.
        factor: extension ratio ``s`` (target length / original length), >= 1.
        original_max_position_embeddings: pre-training length ``L``; ``None``
            takes the model's ``max_position_embeddings``.
        beta_fast, beta_slow, truncate, mscale, mscale_all_dim: YaRN knobs.
        attention_factor: overrides the default YaRN / LongRoPE attention scaling.
        long_factor, short_factor: LongRoPE per-pair factors (``dim/2`` each);
            ``short_factor`` defaults to all ones (plain RoPE inside ``L``).

    Raises ``ValueError`` naming the field for an unknown ``kind``, a ``factor``
    below 1, an ``original_max_position_embeddings`` that is not a positive int (>= 2 for LongRoPE),
    betas that are not finite with ``beta_fast > beta_slow > 0``, a NaN / infinite
    / negative ``mscale`` or ``mscale_all_dim``, an ``attention_factor`` that is not
    finite and > 0, or ``kind="longrope"`` without ``long_factor``; ``TypeError`` for
    a non-bool ``truncate`` or factor sets that are not sequences of numbers. The
    length of the factor sets is checked against the head dim when used.
    """

    kind: str
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    mscale: float = 1.0
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    long_factor: tuple[float, ...] | None = None
    short_factor: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # Every field is checked here and stored as a Python value (saved configs): a NaN attention factor
        # or mscale would turn every cos / sin into NaN, and original_max_position_embeddings=0 used to fall
        # back to the model's length without a word.
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        put = functools.partial(object.__setattr__, self)
        put("factor", _check_factor(self.factor))
        if self.original_max_position_embeddings is not None:
            put("original_max_position_embeddings", check_positive_int(
                self.original_max_position_embeddings, "original_max_position_embeddings"))
        for name in ("beta_fast", "beta_slow"):
            put(name, check_finite_number(getattr(self, name), name))
        if not self.beta_fast > self.beta_slow > 0:
            raise ValueError(f"need beta_fast > beta_slow > 0, got beta_fast={self.beta_fast}, "
                             f"beta_slow={self.beta_slow}")
        put("truncate", as_bool(self.truncate, "truncate"))
        put("mscale", check_finite_number(self.mscale, "mscale", minimum=0.0))
        if self.mscale_all_dim is not None:
            put("mscale_all_dim", check_finite_number(self.mscale_all_dim, "mscale_all_dim", minimum=0.0))
        if self.attention_factor is not None:
            put("attention_factor", float(check_positive_number(self.attention_factor, "attention_factor")))
        if self.kind == "longrope" and self.long_factor is None:
            raise ValueError("kind='longrope' needs long_factor (one factor per rotary pair)")
        if self.kind == "longrope" and self.original_max_position_embeddings == 1:  # its scaling divides by ln L
            raise ValueError("kind='longrope': original_max_position_embeddings must be an int >= 2, got 1")
        for name in ("long_factor", "short_factor"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                value = value.flatten().tolist()
            # a bare number is no sequence: iterating it raised "'float' object is not iterable", naming nothing
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) or not all(is_real(v) for v in value):
                raise TypeError(f"{name} must be a sequence of real numbers (one per rotary pair), got {value!r}")
            put(name, tuple(float(v) for v in value))


def _check_longrope_factors(scaling: RopeScaling, dim: int) -> None:
    """Both LongRoPE factor sets, whatever the length: ``dim/2`` finite entries > 0 each (checked on the
    host, no device sync), so that a wrong set fails when it is given, not at the first long forward."""
    for name in ("long_factor", "short_factor"):
        value = getattr(scaling, name)
        if value is None:
            continue
        if len(value) != dim // 2:
            raise ValueError(
                f"{name} must have dim/2 = {dim // 2} entries (one per rotary pair of the head dim {dim}), "
                f"got {len(value)}"
            )
        if not all(math.isfinite(v) and v > 0 for v in value):
            raise ValueError(f"{name} must hold finite factors > 0, got {list(value)}")


def scaled_inv_freq(
    scaling: RopeScaling,
    dim: int,
    base: float,
    original_max_position_embeddings: int | None = None,
    seq_len: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, float]:
    """``(inv_freq (dim/2,), attention_scaling)`` for ``scaling`` at current length ``seq_len``.

    ``seq_len`` matters for ``dynamic`` (NTK factor) and ``longrope`` (short vs
    long factors); ``None`` means "within the original window" for both. Both
    LongRoPE factor sets are checked (``dim/2`` finite entries > 0) whatever
    ``seq_len`` is; a wrong one raises ``ValueError``.
    """
    if not isinstance(scaling, RopeScaling):
        raise TypeError(f"scaling must be a RopeScaling, got {type(scaling).__name__}")
    if seq_len is not None:  # every kind: longrope compared it unchecked (-5 took the short factors, "20" a TypeError)
        seq_len = _check_length(seq_len, "seq_len")
    original = scaling.original_max_position_embeddings or original_max_position_embeddings
    if scaling.kind in ("dynamic", "yarn", "longrope") and not original:
        raise ValueError(f"kind={scaling.kind!r} needs original_max_position_embeddings")
    s = scaling.factor
    if scaling.kind == "linear":
        return linear_inv_freq(dim, base, s, device), 1.0
    if scaling.kind == "ntk":
        return ntk_inv_freq(dim, base, s, device), 1.0
    if scaling.kind == "dynamic":
        return dynamic_ntk_inv_freq(dim, base, s, original if seq_len is None else seq_len, original, device), 1.0
    if scaling.kind == "yarn":
        inv = yarn_inv_freq(dim, base, s, original, scaling.beta_fast, scaling.beta_slow, scaling.truncate, device)
        attn = scaling.attention_factor
        if attn is None:
            attn = yarn_attention_scaling(s, scaling.mscale, scaling.mscale_all_dim)
        return inv, float(attn)
    # longrope
    _check_longrope_factors(scaling, dim)
    use_long = seq_len is not None and seq_len > original
    factors = scaling.long_factor if use_long else (scaling.short_factor or (1.0,) * (dim // 2))
    attn = scaling.attention_factor
    if attn is None:
        attn = longrope_attention_scaling(s, original)
    return longrope_inv_freq(dim, base, factors, device), float(attn)


class ScaledRotaryEmbedding(nn.Module):
    """Drop-in rotary module: ``forward(x, position_ids) -> (cos, sin)``, HF layout.

    ``cos``/``sin`` have shape ``(batch, seq, dim)`` (the ``d/2`` angles
    repeated twice, as ``transformers``' ``rotate_half`` expects), multiplied by
    the attention scaling, cast to ``x.dtype``. For ``dynamic`` and
    ``longrope`` the frequencies follow the largest position in
    ``position_ids`` of each call (stateless: unlike ``transformers``, the
    result never depends on earlier, longer calls). That position stays on the
    device: LongRoPE picks between its two precomputed sets with ``torch.where``
    and dynamic NTK evaluates its base from it on the device (float64, float32 on
    MPS), so a forward never waits for the device and compiles without a graph
    break. The numbers are those of :func:`scaled_inv_freq` at that length.
    """

    def __init__(self, scaling: RopeScaling, dim: int, base: float, original_max_position_embeddings: int | None):
        super().__init__()
        self.scaling = scaling
        self.dim = dim
        self.base = float(base)
        self.original_max_position_embeddings = original_max_position_embeddings
        inv_freq, attn = scaled_inv_freq(scaling, dim, base, original_max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scaling = attn
        # the window L that decides (the same rule as scaled_inv_freq), checked there
        self._original = scaling.original_max_position_embeddings or original_max_position_embeddings
        if scaling.kind == "longrope":  # the set used beyond the window; inv_freq holds the one within it
            long_freq, _ = scaled_inv_freq(scaling, dim, base, original_max_position_embeddings, self._original + 1)
            self.register_buffer("long_inv_freq", long_freq, persistent=False)

    def _dynamic_inv_freq(self, seq_len: torch.Tensor) -> torch.Tensor:
        """:func:`dynamic_ntk_inv_freq` at the 0-d length tensor ``seq_len``, evaluated where it lives.

        The same operations in the same order as the host version (float64 scalars there), so the
        float32 result is the same; MPS has no float64 and evaluates the base in float32."""
        s, L, d = self.scaling.factor, self._original, self.dim
        wide = torch.float32 if seq_len.device.type == "mps" else torch.float64
        length = seq_len.clamp(min=L).to(wide)
        effective = length * s / L - (s - 1.0)
        new_base = effective.pow(d / (d - 2)) * self.base
        # the 2i/d of θ_i = b^{-2i/d} as rope_inv_freq computes it (not a buffer: a model.to(bf16) would round it)
        exponent = torch.arange(0, d, 2, dtype=torch.int64, device=seq_len.device).to(torch.float32) / d
        return 1.0 / (new_base.to(torch.float32) ** exponent)

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, attn = self.inv_freq, self.attention_scaling
        if self.scaling.kind == "longrope":  # the long set once the length max+1 passes L
            inv_freq = torch.where(position_ids.max() >= self._original, self.long_inv_freq, inv_freq)
        elif self.scaling.kind == "dynamic":
            inv_freq = self._dynamic_inv_freq(position_ids.max() + 1)
        angles = position_ids[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float32)
        emb = torch.cat((angles, angles), dim=-1)
        return (emb.cos() * attn).to(x.dtype), (emb.sin() * attn).to(x.dtype)


def _hf_rope_parameters(scaling: RopeScaling, theta: float, original: int, dim: int) -> dict[str, Any]:
    """The ``transformers`` ``rope_parameters`` dict that reproduces ``scaling``."""
    if scaling.kind == "ntk":
        # Static NTK-aware scaling is exactly plain RoPE with a larger base.
        return {"rope_type": "default", "rope_theta": theta * scaling.factor ** (dim / (dim - 2))}
    params: dict[str, Any] = {"rope_type": scaling.kind, "rope_theta": theta, "factor": float(scaling.factor)}
    if scaling.kind == "yarn":
        params.update(original_max_position_embeddings=original, beta_fast=scaling.beta_fast,
                      beta_slow=scaling.beta_slow, truncate=scaling.truncate)
        if scaling.attention_factor is not None:
            params["attention_factor"] = scaling.attention_factor
        # transformers takes the mscale ratio only when both are non-zero, and plain mscale not at all
        if scaling.mscale and scaling.mscale_all_dim:
            params.update(mscale=scaling.mscale, mscale_all_dim=scaling.mscale_all_dim)
        elif scaling.attention_factor is None and (scaling.mscale != 1.0 or scaling.mscale_all_dim):
            params["attention_factor"] = yarn_attention_scaling(scaling.factor, scaling.mscale,
                                                                scaling.mscale_all_dim)
    elif scaling.kind == "longrope":
        params.update(original_max_position_embeddings=original, long_factor=list(scaling.long_factor),
                      short_factor=list(scaling.short_factor or (1.0,) * (dim // 2)))
        if scaling.attention_factor is not None:
            params["attention_factor"] = scaling.attention_factor
    return params


def _hf_config_updates(config: Any, params: dict[str, Any], head_dim: int, original: int) -> dict[str, Any]:
    """The config attributes (transformers >= 5) that make stock ``transformers`` rebuild ``params`` on reload, checked
    by the config class's own ``validate_rope`` on a copy (``save_pretrained`` runs it).

    Beside ``rope_parameters``: ``head_dim`` where the config declares it ``None`` (Mixtral; transformers' yarn,
    dynamic and longrope read ``getattr(config, "head_dim", ...)`` and fail on ``None``), and a top-level
    ``original_max_position_embeddings`` (Phi-3), which replaces the one in ``rope_parameters`` on reload.
    Raises ``ValueError`` where the config class refuses the rope type (Phi-3 takes only default and longrope).
    """
    updates: dict[str, Any] = {"rope_parameters": params}
    if getattr(config, "head_dim", 0) is None:
        updates["head_dim"] = head_dim
    if "original_max_position_embeddings" in params and hasattr(config, "original_max_position_embeddings"):
        updates["original_max_position_embeddings"] = original
    if hasattr(config, "validate_rope"):
        trial = copy.deepcopy(config)
        for key, value in updates.items():
            setattr(trial, key, value)
        try:
            trial.validate_rope()
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{type(config).__name__} refuses rope_type={params['rope_type']!r} "
                             f"(transformers' own check: {e}); this model cannot save that RoPE scaling") from e
    return updates


def apply_rope_scaling(model: nn.Module, scaling: RopeScaling) -> nn.Module:
    """Switch a ``transformers`` model to ``scaling`` in place and return it.

    Writes ``model.config.rope_parameters`` (``rope_scaling`` + ``rope_theta``
    on transformers < 5) so a saved checkpoint reloads with the same RoPE, and
    replaces every rotary module (a submodule with an ``inv_freq`` buffer)
    with a :class:`ScaledRotaryEmbedding`. The model's own
    ``max_position_embeddings`` is left as is; a ``head_dim`` the config declares
    ``None`` (Mixtral) and a top-level ``original_max_position_embeddings`` (Phi-3)
    are written too, since transformers reads them on reload.

    Raises ``TypeError`` if ``model`` has no ``config`` or ``scaling`` is not a
    :class:`RopeScaling`; ``ValueError`` if the config already uses a scaled
    RoPE or the model's rotary modules are already scaled (by an earlier call),
    if ``kind='dynamic'`` is given an ``original_max_position_embeddings``
    different from the config's ``max_position_embeddings`` (``transformers``
    reads the original length from there), if LongRoPE factors do not have
    ``head_dim * partial_rotary_factor / 2`` entries, if the config has one RoPE
    per layer type (Gemma 3), if the config class's own ``validate_rope`` refuses
    the written parameters (Phi-3 takes only longrope and NTK, which is written as
    plain RoPE), or if no rotary module is found. Nothing is changed when it raises.
    """
    if not isinstance(scaling, RopeScaling):
        raise TypeError(f"scaling must be a RopeScaling, got {type(scaling).__name__}")
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError("model must be a transformers model with a .config")
    new_style = isinstance(getattr(config, "rope_parameters", None), dict)
    # one dict per layer type; older transformers releases keep a top-level rope_type beside them
    if new_style and any(isinstance(v, dict) for v in config.rope_parameters.values()):
        raise ValueError(  # Gemma 3 style: one RoPE per attention type (buffers '<layer_type>_inv_freq')
            f"model has one RoPE per layer type ({sorted(config.rope_parameters)}); apply_rope_scaling "
            "handles models with a single RoPE")
    if new_style:
        current = dict(config.rope_parameters)
        theta = float(current.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        partial = float(current.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0) or 1.0))
        old_type = current.get("rope_type", current.get("type", "default"))
    else:
        theta = float(getattr(config, "rope_theta", 10000.0))
        partial = float(getattr(config, "partial_rotary_factor", 1.0) or 1.0)
        old = getattr(config, "rope_scaling", None) or {}
        old_type = old.get("rope_type", old.get("type", "default"))
    if old_type != "default":
        raise ValueError(f"model already uses rope_type={old_type!r}; start from a plain-RoPE model")
    done = [m.scaling.kind for m in model.modules() if isinstance(m, ScaledRotaryEmbedding)]
    if done:  # static NTK is written as a plain RoPE with a larger theta: the config alone let a second call stack
        raise ValueError(f"model already has apply_rope_scaling's kind={done[0]!r}; start from a plain-RoPE model")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * partial)
    original = scaling.original_max_position_embeddings or int(config.max_position_embeddings)
    if scaling.kind == "dynamic" and original != config.max_position_embeddings:
        raise ValueError(
            "kind='dynamic': original_max_position_embeddings must equal config.max_position_embeddings "
            f"({config.max_position_embeddings}), got {original}"
        )
    rotary = [
        name for name, m in model.named_modules() if name and "inv_freq" in dict(m.named_buffers(recurse=False))
    ]
    if not rotary:
        raise ValueError("no rotary module (submodule with an inv_freq buffer) found in model")
    scaled_inv_freq(scaling, dim, theta, original)  # every check of the scaling against this model, before any change

    params = _hf_rope_parameters(scaling, theta, original, dim)
    if new_style:
        if partial != 1.0 or "partial_rotary_factor" in current:  # Phi-3's validate_rope reads it
            params["partial_rotary_factor"] = partial
        for key, value in _hf_config_updates(config, params, head_dim, original).items():
            setattr(config, key, value)
    else:
        config.rope_theta = params.pop("rope_theta")
        config.rope_scaling = None if params["rope_type"] == "default" else params

    for name in rotary:
        old_module = model.get_submodule(name)
        new_module = ScaledRotaryEmbedding(scaling, dim, theta, original).to(old_module.inv_freq.device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new_module)
    return model
