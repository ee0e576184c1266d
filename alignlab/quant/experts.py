"""Frozen NF4 expert weights of mixture-of-experts blocks (QLoRA for MoE models).

transformers 5.x keeps the experts of an MoE block as fused 3-D parameters of one module
(``model.layers.i.mlp.experts``): ``gate_up_proj`` ``(E, 2·I, H)`` and ``down_proj`` ``(E, H, I)``
for Mixtral and Qwen3-MoE; gpt-oss stores them transposed, ``(E, H, 2·I)`` and ``(E, I, H)``
(``is_transposed``), and adds biases ``gate_up_proj_bias`` ``(E, 2·I)``, ``down_proj_bias`` ``(E, H)``.

:class:`NF4Experts` replaces such a module. Every expert ``e`` of every fused weight is one
``(out, in)`` matrix ``W_e`` (the transposed slice for gpt-oss, as ``Conv1D`` weights are handled
in :func:`~alignlab.quant.quantize_model`), quantized on its own exactly as
``bitsandbytes.functional.quantize_4bit(W_e, quant_type="nf4")`` would (QLoRA, Dettmers et al. 2023,
arXiv 2305.14314; format in :mod:`alignlab.quant.nf4`): its packed bytes, block scales, second-level
scales and offset are those of that 2-D weight (:meth:`NF4Experts.quant_weight`,
:meth:`NF4Experts.bnb_state_dict`). The experts' pieces are stacked into buffers
``{name}_qdata (E, ⌈out·in/2⌉)`` uint8, ``{name}_qabsmax (E, nb)`` (uint8 codes with double
quantization, else fp32), ``{name}_nested_absmax (E, ⌈nb/256⌉)`` fp32 and ``{name}_nested_offset (E,)``
fp32, which is also the module's state dict. Biases stay frozen parameters in their dtype.

The forward is the block's (the loop of :mod:`alignlab.expert_routing`, shared with expert LoRA): with
the ``(token, slot)`` pairs sorted by expert,

    y_t = Σ_slots  w_{t,k} · W^down_e  g(W^gate_up_e x_t + b_e) + b'_e,     e = the slot's expert,

``g`` the block's gate (``_apply_gate``, or ``act_fn(gate) * up``). Only the experts some token is
routed to are touched, one at a time: each product runs through the NF4 matmul of
:class:`~alignlab.quant.NF4Linear` (Triton on CUDA, dequantize + matmul on CPU), and the input
gradient re-dequantizes that expert in the backward, so no dense expert weight outlives its product.
Under ``torch.compile`` which experts run, on which rows, comes from the routing (data the compiler cannot
trace), so that loop runs inside the opaque op ``alignlab::nf4_grouped_linear`` (packed buffers as plain
tensor arguments, backward = the same op on ``W_eᵀ``), as :func:`alignlab.adapters.experts.grouped_linear`
does for dense experts; the compiled forward keeps every ``(token, slot)`` row instead of syncing to drop
expert-parallel sentinels, and zeroes their routing weight.

Memory: ``0.5 + 1/64 + 4/(64·256)`` bytes per weight with double quantization (blocksize 64), plus
4 bytes of offset per expert matrix: about ``0.258×`` the bf16 stack (see docs/moe.md).

For expert LoRA (:class:`alignlab.adapters.experts.ExpertLoRA`, QLoRA on experts) the module offers
the base interface that wrapper reads: :meth:`~NF4Experts.dequantize_experts`,
:meth:`~NF4Experts.load_dense_experts_`, :meth:`~NF4Experts.quantized_state` /
:meth:`~NF4Experts.load_quantized_state_`, plus :meth:`~NF4Experts.linear_sorted` (``W_e x`` for rows
sorted by expert, re-dequantizing in the backward instead of keeping the dense stack).
"""

from __future__ import annotations

import torch
from torch import nn

from alignlab.expert_routing import ExpertGroups, add_expert_bias, check_routing, expert_mlp, forward_overridden_by
from alignlab.kernels.nf4_configs import note_device
from alignlab.quant.nf4 import (
    SUPPORTED_DTYPES,
    NF4Tensor,
    check_compute_dtype,
    check_quantizable,
    dynamic_map,
    nf4_code,
    nf4_quantize,
    nf4_to_bnb_state_dict,
)

__all__ = ["NF4Experts", "EXPERT_WEIGHTS", "is_fused_experts"]

#: the fused expert weights transformers 5.x MoE blocks hold (``up_proj`` where the experts have no gate)
EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")
_PARTS = ("qdata", "qabsmax", "nested_absmax", "nested_offset")


def _stored(module: nn.Module) -> list[str]:
    e = getattr(module, "num_experts", None)
    return [n for n in EXPERT_WEIGHTS if isinstance(getattr(module, n, None), torch.Tensor)
            and getattr(module, n).dim() == 3 and getattr(module, n).shape[0] == e]


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers 5.x experts module: an int ``num_experts`` and fused 3-D
    ``gate_up_proj`` / ``up_proj`` / ``down_proj`` weights with one slice per expert."""
    return isinstance(getattr(module, "num_experts", None), int) and not isinstance(module, NF4Experts) and bool(_stored(module))


class _SortedNF4Linear(torch.autograd.Function):
    """``W_e x`` for rows sorted by expert; saves only the packed weights, re-dequantizes in the backward."""

    @staticmethod
    def forward(x: torch.Tensor, experts: "NF4Experts", name: str, spans: list) -> torch.Tensor:
        return experts._sorted_matmul(x, name, spans, transpose=False)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # a separate setup_context: torch.func.grad / vjp take it
        _, ctx.experts, ctx.name, ctx.spans = inputs

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        dx = ctx.experts._sorted_matmul(dy, ctx.name, ctx.spans, transpose=True) if ctx.needs_input_grad[0] else None
        return dx, None, None, None


def _expert_nf4(parts: tuple, meta: tuple, expert: int) -> NF4Tensor:
    """Expert ``expert``'s :class:`NF4Tensor` from the stacked ``parts`` (qdata, qabsmax, nested_absmax,
    nested_offset) and ``meta`` (shape, dtype, blocksize, double_quant, nested_blocksize) of one weight."""
    data, absmax, nested, offset = parts
    shape, dtype, blocksize, dq, nbs = meta
    return NF4Tensor(data=data[expert], absmax=absmax[expert], shape=shape, dtype=dtype, blocksize=blocksize,
                     nested_absmax=nested[expert] if dq else None, nested_offset=offset[expert] if dq else None,
                     nested_blocksize=nbs)


def _nf4_sorted_matmul(x: torch.Tensor, weight_of, shape: torch.Size, spans: list, transpose: bool) -> torch.Tensor:
    """``W_e x`` (or ``W_eᵀ x`` with ``transpose``) over each span's rows ``(expert, start, stop)``, expert
    ``e``'s ``(out, in) = shape`` matrix being ``weight_of(e)`` (an :class:`NF4Tensor`), dequantized one at a
    time; rows past the last span (routed nowhere) are zero."""
    from alignlab.kernels.nf4_matmul import nf4_matmul, nf4_matmul_t

    width = shape[1] if transpose else shape[0]
    covered = spans[-1][2] if spans else 0
    out = x.new_empty(x.shape[0], width) if covered == x.shape[0] else x.new_zeros(x.shape[0], width)
    for expert, start, stop in spans:
        t = weight_of(expert)
        rows = x[start:stop]
        out[start:stop] = nf4_matmul_t(rows, t) if transpose else nf4_matmul(rows, t)
    return out


# Under torch.compile the per-expert loop (its spans come from the routing, a host sync) runs inside an opaque
# op, as alignlab::grouped_linear does for the dense expert LoRA path; the packed buffers are plain arguments.
@torch.library.custom_op("alignlab::nf4_grouped_linear", mutates_args=())
def _nf4_grouped_linear_op(x: torch.Tensor, qdata: torch.Tensor, qabsmax: torch.Tensor,
                           nested_absmax: torch.Tensor | None, nested_offset: torch.Tensor | None,
                           offsets: torch.Tensor, shape: list[int], dtype: torch.dtype, blocksize: int,
                           nested_blocksize: int, transpose: bool) -> torch.Tensor:
    meta = (torch.Size(shape), dtype, blocksize, nested_absmax is not None, nested_blocksize)
    parts = (qdata, qabsmax, nested_absmax, nested_offset)
    return _nf4_sorted_matmul(x, lambda e: _expert_nf4(parts, meta, e), meta[0], NF4Experts.spans(offsets), transpose)


@_nf4_grouped_linear_op.register_fake
def _(x, qdata, qabsmax, nested_absmax, nested_offset, offsets, shape, dtype, blocksize, nested_blocksize, transpose):
    return x.new_empty(x.shape[0], shape[1] if transpose else shape[0])


def _nf4_grouped_linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:6])
    ctx.settings = inputs[6:]


def _nf4_grouped_linear_grad(ctx, grad):
    *settings, transpose = ctx.settings
    # the weights are frozen: only the input gradient, the same product with W_e transposed
    gx = torch.ops.alignlab.nf4_grouped_linear(grad, *ctx.saved_tensors, *settings, not transpose)
    return (gx,) + (None,) * 10


_nf4_grouped_linear_op.register_autograd(_nf4_grouped_linear_grad, setup_context=_nf4_grouped_linear_setup)


class NF4Experts(nn.Module):
    """The frozen NF4 experts of one MoE block; a drop-in for the transformers experts module.

    ``forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``, in the
    dtype of ``hidden_states`` (products in ``compute_dtype``). Build one with :meth:`from_experts`;
    :func:`~alignlab.quant.quantize_model` converts every experts module of a model.

    Attributes kept from the original module: ``num_experts``, ``has_gate``, ``has_bias``,
    ``is_transposed`` (how the *original* stored its weights; :meth:`dequantize_experts` always
    returns ``(E, out, in)``), ``act_fn`` / ``_apply_gate`` and the block's other settings.
    ``expert_parameters`` lists the quantized weights.
    """

    def __init__(self, original: nn.Module, weights: dict[str, list[NF4Tensor]],
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        check_compute_dtype(compute_dtype)
        if not weights:
            raise ValueError("weights must hold at least one fused expert weight")
        self.num_experts = int(original.num_experts)
        for name, ts in weights.items():
            if name not in EXPERT_WEIGHTS:
                raise ValueError(f"weights: {name!r} is not one of {EXPERT_WEIGHTS}")
            if len(ts) != self.num_experts or any(len(t.shape) != 2 or t.shape != ts[0].shape for t in ts):
                raise ValueError(f"weights[{name!r}] must hold {self.num_experts} NF4 matrices of one (out, in) shape")
        self.compute_dtype = compute_dtype
        self.expert_parameters = tuple(n for n in EXPERT_WEIGHTS if n in weights)
        # the block's own settings and helpers (gate clamps, activation, post-expert norm, config, ...)
        skip = set(EXPERT_WEIGHTS) | {f"{n}_bias" for n in EXPERT_WEIGHTS} | {"training"}
        for key, value in vars(original).items():
            if not key.startswith("_") and key not in skip:
                self.__dict__[key] = value
        for key, module in original.named_children():
            self.add_module(key, module)
        self.is_transposed = bool(getattr(original, "is_transposed", False))
        self.has_gate = bool(getattr(original, "has_gate", "gate_up_proj" in weights))
        self._is_expert_parallel = bool(getattr(original, "_is_expert_parallel", False))
        self._gate_fn = getattr(type(original), "_apply_gate", None)
        self._meta: dict[str, tuple] = {}
        for name, ts in weights.items():
            self._set_stack(name, ts)
        biases = [n for n in self.expert_parameters if isinstance(getattr(original, f"{n}_bias", None), torch.Tensor)]
        self.has_bias = bool(getattr(original, "has_bias", bool(biases)))
        for n in biases:
            b = getattr(original, f"{n}_bias")
            setattr(self, f"{n}_bias", nn.Parameter(b.detach(), requires_grad=False))

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_experts(cls, experts: nn.Module, blocksize: int = 64, double_quant: bool = True,
                     compute_dtype: torch.dtype = torch.bfloat16) -> "NF4Experts":
        """Quantize every expert slice of ``experts``' fused weights, each as its own ``(out, in)`` matrix.

        Raises:
            TypeError: ``experts`` is not a fused experts module (see :func:`is_fused_experts`), lacks the
                decorated interface (``is_transposed``), its class overrides the decorated expert loop
                (:func:`~alignlab.expert_routing.forward_overridden_by`), or a weight has an unsupported dtype.
            ValueError: bad ``blocksize``; a weight with NaN or inf.
        """
        cls.check_convertible(experts)
        transposed = bool(getattr(experts, "is_transposed", False))
        weights = {}
        for name in _stored(experts):
            stack = getattr(experts, name).detach()
            weights[name] = [nf4_quantize((w.T if transposed else w).contiguous(), blocksize=blocksize,
                                          double_quant=double_quant) for w in stack]
        return cls(experts, weights, compute_dtype)

    @staticmethod
    def check_convertible(experts: nn.Module) -> None:
        """What :meth:`from_experts` refuses, checked without quantizing (``quantize_model`` checks every module
        before replacing any): the ``TypeError`` cases of :meth:`from_experts`, and ``ValueError`` for a weight
        with NaN or inf."""
        if not isinstance(experts, nn.Module) or not is_fused_experts(experts):
            raise TypeError("experts must be a transformers experts module with fused 3-D weights (num_experts, "
                            f"gate_up_proj/up_proj/down_proj), got {type(experts).__name__}")
        if not hasattr(experts, "is_transposed"):  # e.g. Llama 4's experts: forward(rows already sorted by expert)
            raise TypeError(f"experts: {type(experts).__name__} holds fused 3-D weights but not the interface of "
                            "transformers' @use_experts_implementation (is_transposed, forward(hidden_states, "
                            "top_k_index, top_k_weights)) that NF4Experts takes over; keep it dense "
                            "(quantize_model(..., skip=[its name]))")
        custom = forward_overridden_by(experts)
        if custom is not None:
            raise TypeError(f"experts: {custom.__name__}.forward adds its own code around the decorated expert loop, "
                            "which NF4Experts would drop (a different block); keep it dense (quantize_model(..., "
                            "skip=[its name]))")
        for name in _stored(experts):
            stack = getattr(experts, name).detach()
            if stack.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"experts.{name} must be fp32/fp16/bf16, got {stack.dtype}")
            check_quantizable(stack, f"experts.{name}")

    def _set_stack(self, name: str, ts: list[NF4Tensor] | None, stacks: dict | None = None) -> None:
        """(Re)place the stacked pieces of ``name``: from per-expert tensors ``ts``, or ready ``stacks``."""
        if ts is not None:
            t0 = ts[0]
            self._meta[name] = (torch.Size(t0.shape), t0.dtype, t0.blocksize, t0.double_quant, t0.nested_blocksize)
            if any(t.shift is not None for t in ts):
                raise ValueError("ICQ-calibrated NF4 tensors are not supported for experts")
            stacks = {"qdata": torch.stack([t.data for t in ts]), "qabsmax": torch.stack([t.absmax for t in ts]),
                      "nested_absmax": None, "nested_offset": None}
            if t0.double_quant:
                stacks["nested_absmax"] = torch.stack([t.nested_absmax for t in ts])
                stacks["nested_offset"] = torch.stack([t.nested_offset.reshape(()) for t in ts])
        for part in _PARTS:
            self.register_buffer(f"{name}_{part}", stacks[part])

    def _part(self, name: str, part: str) -> torch.Tensor | None:
        """One stacked piece (``qdata``, ``qabsmax``, ``nested_absmax``, ``nested_offset``) of weight ``name``."""
        return self._buffers[f"{name}_{part}"]

    def _parts(self, name: str) -> tuple:
        return tuple(self._part(name, part) for part in _PARTS)

    def _check_name(self, name: str) -> None:
        if name not in self._meta:
            raise ValueError(f"name must be one of this module's expert weights {self.expert_parameters}, got {name!r}")

    # -- the packed weights -----------------------------------------------------------------------
    def shape_of(self, name: str) -> torch.Size:
        """``(out, in)`` of one expert's matrix of weight ``name``."""
        self._check_name(name)
        return self._meta[name][0]

    def quant_weight(self, name: str, expert: int) -> NF4Tensor:
        """Expert ``expert``'s ``(out, in)`` matrix of weight ``name`` as an :class:`NF4Tensor` (views of the
        stacked buffers: bitsandbytes' bytes and scales for that 2-D weight)."""
        self._check_name(name)
        return _expert_nf4(self._parts(name), self._meta[name], expert)

    def bnb_state_dict(self, name: str, expert: int, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The keys ``bitsandbytes.nn.Linear4bit`` would save for expert ``expert``'s matrix of ``name``."""
        return nf4_to_bnb_state_dict(self.quant_weight(name, expert), prefix=prefix)

    def dequantize_experts(self, name: str, expert_ids: torch.Tensor | list[int] | None = None,
                           dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weights ``(k, out, in)`` of experts ``expert_ids`` (default: all ``E``) of ``name``,
        in ``dtype`` (default ``compute_dtype``): ``w = q[c] · s_b`` per block, as :func:`nf4_dequantize`
        (the Triton dequantization kernel per expert on CUDA, one vectorized pass in PyTorch otherwise).

        Raises:
            ValueError: unknown ``name``.  TypeError: ``dtype`` not fp32/fp16/bf16 (an integer one truncated).
        """
        self._check_name(name)
        from alignlab.kernels.dispatch import use_triton

        shape, _, blocksize, dq, nbs = self._meta[name]
        data, absmax = self._part(name, "qdata"), self._part(name, "qabsmax")
        dtype = dtype or self.compute_dtype
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
        if use_triton(data):  # one dequantization kernel per expert, each writing its slice
            from alignlab.kernels.nf4_dequant import nf4_dequant

            ids = range(self.num_experts) if expert_ids is None else torch.as_tensor(expert_ids).reshape(-1).tolist()
            out = torch.empty(len(ids), *shape, dtype=dtype, device=data.device)
            for i, e in enumerate(ids):
                out[i] = nf4_dequant(self.quant_weight(name, int(e)), dtype)
            return out
        nested, offset = (self._part(name, "nested_absmax"), self._part(name, "nested_offset")) if dq else (None, None)
        if expert_ids is not None:
            ids = torch.as_tensor(expert_ids, dtype=torch.long, device=data.device).reshape(-1)
            data, absmax = data[ids], absmax[ids]
            if dq:
                nested, offset = nested[ids], offset[ids]
        k, n = data.shape[0], shape[0] * shape[1]
        codes = torch.stack([data >> 4, data & 15], dim=-1).reshape(k, -1)[:, :n].long()
        values = nf4_code(data.device)[codes]
        nb = absmax.shape[1]
        scales = absmax
        if dq:
            scales = dynamic_map(data.device)[absmax.long()] * nested.repeat_interleave(nbs, dim=1)[:, :nb] + offset[:, None]
        pad = nb * blocksize - n
        if pad:
            values = torch.nn.functional.pad(values, (0, pad))
        w = (values.view(k, nb, blocksize) * scales[:, :, None]).reshape(k, -1)[:, :n]
        return w.reshape(k, *shape).to(dtype)

    @torch.no_grad()
    def load_dense_experts_(self, name: str, weight: torch.Tensor) -> "NF4Experts":
        """Re-quantize dense ``(E, out, in)`` weights into ``name``, in place (used by adapter merges).

        Raises:
            ValueError: unknown ``name`` or wrong shape.  TypeError: unsupported dtype.
        """
        self._check_name(name)
        shape, dtype, blocksize, dq, _ = self._meta[name]
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (self.num_experts, *shape):
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"weight must have shape ({self.num_experts}, {shape[0]}, {shape[1]}), got {got}")
        dev = self._part(name, "qdata").device
        ts = [nf4_quantize(w.to(dev), blocksize=blocksize, double_quant=dq) for w in weight.detach()]
        for t in ts:
            t.dtype = dtype
        self._set_stack(name, ts)
        return self

    def quantized_state(self, name: str) -> dict[str, torch.Tensor | None]:
        """The packed buffers of ``name`` (references; give them back with :meth:`load_quantized_state_`)."""
        self._check_name(name)
        return {part: self._part(name, part) for part in _PARTS}

    def load_quantized_state_(self, name: str, state: dict) -> None:
        """Put packed buffers from :meth:`quantized_state` back in place (no re-quantization).

        Raises:
            ValueError: unknown ``name`` or buffers of other shapes.
        """
        self._check_name(name)
        for part in _PARTS:
            have, new = self._part(name, part), state.get(part)
            if (have is None) != (new is None) or (have is not None and have.shape != new.shape):
                raise ValueError(f"state[{part!r}] does not fit weight {name!r} of this module")
        self._set_stack(name, None, {part: state[part] for part in _PARTS})

    # -- forward ----------------------------------------------------------------------------------
    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self._gate_fn is not None:
            return self._gate_fn(self, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def _sorted_matmul(self, x: torch.Tensor, name: str, spans: list, transpose: bool) -> torch.Tensor:
        return _nf4_sorted_matmul(x, lambda e: self.quant_weight(name, e), self._meta[name][0], spans, transpose)

    @staticmethod
    def spans(offsets: torch.Tensor) -> list[tuple[int, int, int]]:
        """``[(expert, start, stop)]`` of the non-empty groups, from cumulative row counts ``offsets (E,)``.

        Raises:
            ValueError: ``offsets`` not 1-D or decreasing somewhere (a group would be dropped in silence).
        """
        ends = offsets.tolist()
        if offsets.dim() != 1 or any(b < a for a, b in zip([0] + ends, ends)):
            raise ValueError(f"offsets must be non-decreasing cumulative row counts (E,), got {ends}")
        out, start = [], 0
        for e, stop in enumerate(ends):
            if stop > start:
                out.append((e, start, int(stop)))
            start = int(stop)
        return out

    def linear_sorted(self, name: str, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``W_e x_t`` for rows ``x (S, in)`` sorted by expert, ``offsets (E,)`` the cumulative row counts
        (``grouped_mm``'s ``offs``) → ``(S, out)`` in ``x``'s dtype; no bias. Only the experts with rows are
        dequantized, one at a time; the input gradient re-dequantizes them (nothing dense is saved). Under
        ``torch.compile`` this is the op ``alignlab::nf4_grouped_linear``; rows past ``offsets[-1]`` give zeros.

        Raises:
            ValueError: unknown ``name``, ``x`` of the wrong width, ``offsets`` not ``(E,)`` non-decreasing counts
                within ``x``'s rows.
        """
        self._check_name(name)
        if x.dim() != 2 or x.shape[1] != self._meta[name][0][1]:
            raise ValueError(f"x must be (rows, {self._meta[name][0][1]}) for {name!r}, got {tuple(x.shape)}")
        if offsets.shape != (self.num_experts,):
            raise ValueError(f"offsets must be ({self.num_experts},), got shape {tuple(offsets.shape)}")
        if torch.compiler.is_compiling():
            return self._linear_op(name, x, offsets)
        spans = self.spans(offsets)
        if spans and spans[-1][2] > x.shape[0]:
            raise ValueError(f"offsets count {spans[-1][2]} rows, more than x has ({x.shape[0]})")
        return self._linear_spans(name, x, spans)

    def _linear_op(self, name: str, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """:meth:`linear_sorted` as the opaque op ``alignlab::nf4_grouped_linear`` (for torch.compile)."""
        shape, dtype, blocksize, _, nbs = self._meta[name]
        return torch.ops.alignlab.nf4_grouped_linear(x, *self._parts(name), offsets, list(shape), dtype, blocksize,
                                                     nbs, False)

    def _linear_spans(self, name: str, x: torch.Tensor, spans: list) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _SortedNF4Linear.apply(x, self, name, spans)
        return self._sorted_matmul(x, name, spans, transpose=False)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """``(T, H)`` tokens, their experts ``(T, k)`` and routing weights ``(T, k)`` → ``(T, H)``. Ids ``>= E``
        are expert-parallel sentinels: those slots add nothing.

        Raises:
            TypeError, ValueError: tensors that do not fit together, or (CPU index) a negative expert id
                (:func:`~alignlab.expert_routing.check_routing`).
        """
        hidden = self._meta["gate_up_proj" if self.has_gate else "up_proj"][0][1]
        check_routing(hidden_states, top_k_index, top_k_weights, hidden)
        k = top_k_index.shape[-1]
        if torch.compiler.is_compiling():
            # no host sync: every (token, slot) row stays; sentinel rows (ids >= E) sort last, get zero
            # products from the op and zero routing weight, and index the biases only through clamped ids
            groups = ExpertGroups.from_routing(top_k_index, self.num_experts)
            ids, perm = groups.ids, groups.perm
            weights = top_k_weights.reshape(-1)[perm] * (ids < self.num_experts)
            ids = ids.clamp(max=self.num_experts - 1)

            def linear(name, x):
                return self._linear_op(name, x, groups.offsets)
        else:
            ids, perm = torch.sort(top_k_index.reshape(-1), stable=True)
            valid = ids < self.num_experts  # expert-parallel sentinels route nowhere
            counts = torch.bincount(ids[valid], minlength=self.num_experts)
            spans = self.spans(torch.cumsum(counts, 0))  # the one host sync of the call
            n = spans[-1][2] if spans else 0
            ids, perm = ids[:n], perm[:n]
            weights = top_k_weights.reshape(-1)[perm]

            def linear(name, x):
                return self._linear_spans(name, x, spans)
        x = hidden_states[perm // k].to(self.compute_dtype)
        y = expert_mlp(self, x, lambda name, rows: add_expert_bias(self, name, linear(name, rows), ids), self.has_gate)
        y = y * weights.unsqueeze(-1).to(y.dtype)
        out = torch.zeros_like(hidden_states)
        return out.index_add(0, perm // k, y.to(hidden_states.dtype))

    # -- device moves keep the quantization buffers' dtypes ---------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # uint8 scale codes (double quantization) and fp32 scales have the same shape: copy_ would cast one into the
        # other (with strict=False only the nested keys were reported, and the block's output came out wrong)
        bad = []
        for name, meta in self._meta.items():
            key = f"{prefix}{name}_qabsmax"
            theirs = state_dict.get(key)
            if isinstance(theirs, torch.Tensor) and theirs.dtype != (torch.uint8 if meta[3] else torch.float32):
                bad.append(f"{key}: the checkpoint holds {theirs.dtype} block scales (double_quant="
                           f"{theirs.dtype == torch.uint8}), this module was quantized with double_quant={meta[3]}; "
                           "quantize the model with the checkpoint's double_quant before loading it")
        if bad:
            error_msgs.extend(bad)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):
        names = [f"{n}_{p}" for n in self._meta for p in _PARTS if f"{n}_{p}" in self._buffers]
        saved = {name: self._buffers[name] for name in names}
        ref = next((b for b in saved.values() if b is not None), None)
        probe = None if ref is None else fn(torch.empty(0, device=ref.device))  # an impossible move raises here
        for name in names:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        except BaseException:  # a failed move leaves the module as it was, packed weights included
            self._buffers.update(saved)
            raise
        if probe is None:
            return self
        for name, buf in saved.items():
            if buf is not None and buf.is_meta:  # to_empty: storage without values, for a state dict to fill
                buf = torch.empty_like(buf, device=probe.device)
            self._buffers[name] = None if buf is None else buf.to(probe.device)
        note_device(probe.device)  # this GPU's launch tables, known before any torch.compile trace
        return self

    def extra_repr(self) -> str:
        parts = [f"{n}: {self.num_experts}×{tuple(self._meta[n][0])}" for n in self.expert_parameters]
        return (f"{', '.join(parts)}, blocksize={self._meta[self.expert_parameters[0]][2]}, "
                f"double_quant={self._meta[self.expert_parameters[0]][3]}, compute_dtype={self.compute_dtype}")

    def nbytes(self) -> int:
        """Bytes of the quantized weights (packed codes and every scale) and the biases."""
        tensors = [b for n, b in self._buffers.items() if b is not None] + list(self.parameters())
        return sum(t.numel() * t.element_size() for t in tensors)
