"""LoRA and DoRA on the fused 3-D expert weights of mixture-of-experts blocks.

transformers 5.x keeps the experts of an MoE block as stacked parameters of one module
(``model.layers.i.mlp.experts``): ``gate_up_proj`` ``(E, 2·I, H)`` and ``down_proj`` ``(E, H, I)``
for Mixtral and Qwen3-MoE; gpt-oss stores them transposed (``(E, H, 2·I)``, ``(E, I, H)``,
``experts.is_transposed``) and adds biases. :class:`ExpertLoRA` wraps such a module and gives every
expert ``e`` of each targeted parameter its own low-rank pair (Hu et al., arXiv 2106.09685)::

    y_t = W_e x_t + b_e + s·B_e A_e x_t,   A_e: (r, in), B_e: (out, r),   e = the expert token t is routed to

computed in the block's own expert loop, replaced by one that sorts the (token, expert) pairs by
expert and runs every projection as a grouped matmul over all experts at once (``torch``'s
``grouped_mm``, or a padded batched matmul where that does not apply): the base ``W_e x`` and the
two thin adapter products ``A_e x`` and ``B_e (A_e x)``. ``W_e + s·B_e A_e`` is never formed on the
forward path. DoRA (Liu et al., arXiv 2402.09353) is defined per expert: a magnitude ``m_e``
``(out,)`` per expert and ``y_t = m_e ⊙ (W_e + s·B_e A_e) x_t / ‖W_e + s·B_e A_e‖_row + b_e``, the
norm detached as in ``dora.py`` and computed without forming the sum.

Scaling (``α/r`` or rsLoRA's ``α/√r``), ``kaiming``/``gaussian`` init (B = 0), dropout on the adapter
input, named adapters, ``disabled()``, ``merge``/``unmerge`` and fp32 master factors with 16-bit
compute follow :class:`~alignlab.adapters.lora.LoRALinear`.

Factor storage is PEFT's (``ParamWrapper`` of PEFT >= 0.19.1), so PEFT files map one to one:
``lora_A[adapter][param]`` is ``(E·r, in)`` (expert-major rows) and ``lora_B[adapter][param]`` is
``(out, r·E)`` (expert index fastest); :meth:`ExpertLoRA.factors` returns them as per-expert views
``(E, r, in)`` and ``(E, out, r)``. DoRA magnitudes are ``lora_magnitude_vector[adapter][param]``,
``(E, out)``.

Interface for a quantized base (NF4 experts)
--------------------------------------------
The wrapper reads the frozen base weights only through two small functions of this module, which
look for methods on the wrapped experts module first:

* :func:`expert_weight` ``(experts, name) -> (E, out, in)``: the dense base weight of parameter
  ``name`` in the canonical ``(expert, out, in)`` orientation whatever the storage. A quantized
  experts module provides ``dequantize_experts(name) -> Tensor (E, out, in)`` (in its compute dtype);
  for a plain transformers module it is a view of the parameter (transposed where
  ``is_transposed``). The forward path calls it once per projection per call and feeds the
  result to a grouped matmul, so a quantized module dequantizes the stack once per call, as
  ``NF4Linear`` does for a linear.
* :func:`set_expert_weight_` ``(experts, name, weight (E, out, in))``: the write-back used by
  ``merge``/``unmerge`` only; a quantized module provides ``load_dense_experts_(name, weight)``
  (re-quantizes). Merging into a quantized base is not undone by arithmetic: the wrapper keeps
  what ``quantized_state(name)`` returns before the first merge and gives it back through
  ``load_quantized_state_(name, state)`` on unmerge, where the module has both.

Where the module has ``linear_sorted(name, x, offsets) -> (S, out)`` (``W_e x_t`` for rows sorted by
expert, ``offsets`` the cumulative row counts; e.g. :class:`~alignlab.quant.NF4Experts`, which
re-dequantizes in the backward), the base product goes through it instead of :func:`expert_weight` +
grouped matmul, so no dense stack is kept for the backward; ``shape_of(name) -> (out, in)`` spares
a dequantization where only the shape is wanted.

Everything else the forward needs comes from the transformers experts module itself:
``num_experts``, ``is_transposed``, ``has_gate`` (where present), ``has_bias``, ``_apply_gate`` / ``act_fn``,
optional ``has_post_expert_norm`` / ``post_expert_norm`` and ``<name>_bias`` parameters; a
quantized replacement keeps those attributes.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from alignlab._checks import as_bool, as_python_number, check_positive_int, check_positive_number
from alignlab.adapters.base import AdapterLayer, refuse_float16_merge
from alignlab.adapters.dora import (check_dora_unmergeable, dora_gain, dora_merged_weight, dora_unmerged_weight,
                                   kept_merge_norm)
from alignlab.adapters.lora import check_adapter_dtype, check_dropout, lora_scaling
from alignlab.expert_routing import ExpertGroups, add_expert_bias, check_routing, expert_mlp, forward_overridden_by

#: the fused expert weights an adapter can target, in the order transformers registers them (PEFT nests its
#: wrappers in that order, which decides its file's key names)
EXPERT_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")
EXPERT_INITS = ("kaiming", "gaussian")


# -- the base, as the forward sees it --------------------------------------------------------------
def expert_weight(experts: nn.Module, name: str) -> torch.Tensor:
    """The frozen base weight of expert parameter ``name`` as ``(E, out, in)``.

    A quantized experts module answers through its ``dequantize_experts(name)``; a transformers
    module gives a view of its parameter (``(E, in, out)`` storage is transposed when
    ``experts.is_transposed``).
    """
    if hasattr(experts, "dequantize_experts"):
        return experts.dequantize_experts(name)
    weight = getattr(experts, name)
    return weight.transpose(1, 2) if getattr(experts, "is_transposed", False) else weight


def set_expert_weight_(experts: nn.Module, name: str, weight: torch.Tensor) -> None:
    """Write a dense ``(E, out, in)`` weight back into expert parameter ``name`` (re-quantizing a
    quantized module through its ``load_dense_experts_(name, weight)``)."""
    if hasattr(experts, "load_dense_experts_"):
        experts.load_dense_experts_(name, weight)
        return
    with torch.no_grad():
        expert_weight(experts, name).copy_(weight)


def fused_expert_parameters(module: nn.Module) -> list[str]:
    """Names of the fused 3-D expert weights of a transformers 5.x experts module (in the order of
    :data:`EXPERT_PARAMETERS`); empty for any other module.

    An experts module is one that ``@use_experts_implementation`` decorated (it has ``num_experts``
    and ``is_transposed``) or a quantized stand-in with the same attributes.
    """
    if not all(hasattr(module, a) for a in ("num_experts", "is_transposed")):
        return []
    return [n for n in EXPERT_PARAMETERS if _is_3d(getattr(module, n, None)) or _is_3d_quantized(module, n)]


def _is_3d(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 3


def _is_3d_quantized(module: nn.Module, name: str) -> bool:
    return hasattr(module, "dequantize_experts") and name in getattr(module, "expert_parameters", ())


def find_expert_targets(model: nn.Module, target_parameters: Sequence[str] | None, all_experts: bool = False
                        ) -> dict[str, list[str]]:
    """``{experts module name: [parameter names]}`` selected in ``model``.

    ``target_parameters`` entries match a parameter's dotted name exactly or as a suffix
    (``"mlp.experts.gate_up_proj"`` matches ``model.layers.0.mlp.experts.gate_up_proj``), as PEFT's
    ``target_parameters`` do; ``all_experts`` selects every fused expert weight.

    Raises:
        ValueError: an entry names a parameter that is not a fused expert weight, or matches nothing
            (the message lists the fused expert weights the model has).
    """
    from alignlab.adapters.config import name_matches  # config imports this module

    wanted = list(target_parameters or [])
    found: dict[str, list[str]] = {}
    used: set[str] = set()
    for mname, module in _experts_modules(model):
        for pname in fused_expert_parameters(module):
            hits = [t for t in wanted if name_matches([t], f"{mname}.{pname}")]
            used.update(hits)
            if hits or all_experts:
                found.setdefault(mname, []).append(pname)
    missing = [t for t in wanted if t not in used]
    if missing:
        other = [t for t in missing if _names_any_parameter(model, t)]
        have = sorted({p for _, mod in _experts_modules(model) for p in fused_expert_parameters(mod)})
        if other:
            raise ValueError(f"target_parameters: {other[0]!r} is not a fused expert weight; LoRA on parameters covers "
                             f"the 3-D expert weights ({', '.join(EXPERT_PARAMETERS)}) of transformers 5.x MoE blocks "
                             "(train other parameters in full with modules_to_save)")
        raise ValueError(f"target_parameters: {missing[0]!r} matched no parameter; the fused expert weights of this "
                         f"model are named {have or 'nothing (no transformers 5.x experts module found)'}")
    return found


def _experts_modules(model: nn.Module):
    """``(name, experts module)`` pairs; an :class:`ExpertLoRA` stands for the module it wraps."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, ExpertLoRA):
            inside.append(name)
            yield name, module.base_layer
        elif isinstance(module, AdapterLayer):
            inside.append(name)
        elif fused_expert_parameters(module):
            yield name, module


def _names_any_parameter(model: nn.Module, target: str) -> bool:
    from alignlab.adapters.config import name_matches

    return any(name_matches([target], n) for n, _ in model.named_parameters())


def _has_gate(experts: nn.Module) -> bool:
    """Whether the first projection is a fused ``gate_up_proj`` (transformers < 5.1 has no ``has_gate``)."""
    return getattr(experts, "has_gate", "gate_up_proj" in fused_expert_parameters(experts))


# -- grouped matmul --------------------------------------------------------------------------------
def grouped_linear(x: torch.Tensor, weight: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
    """Row ``t`` of ``x (S, in)`` times ``weight[groups.ids[t]]ᵀ``, ``weight (E, out, in)`` → ``(S, out)``.

    One ``grouped_mm`` over all experts where torch has it for these tensors (CPU: fp32/bf16; CUDA:
    bf16 on sm80+; 16-byte aligned strides), else one batched matmul over the rows padded to the
    largest group (any dtype). Never a loop over experts.
    """
    wt = weight.transpose(1, 2)  # (E, in, out)
    if torch.compiler.is_compiling():
        # the group sizes decide the padded shape (data-dependent), which inductor cannot lower; the op is
        # opaque to the compiler and runs the eager path below inside the graph
        return torch.ops.alignlab.grouped_linear(x, wt, groups.ids, groups.offsets)
    return _grouped_linear_eager(x, wt, groups.ids, groups.offsets)


def _grouped_linear_eager(x: torch.Tensor, wt: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if _grouped_mm_applies(x, wt):
        return F.grouped_mm(x, wt, offs=offsets)
    return _padded_bmm(x, wt, ExpertGroups(ids, ids, offsets))  # perm: unused by the padded path


@torch.library.custom_op("alignlab::grouped_linear", mutates_args=())
def _grouped_linear_op(x: torch.Tensor, wt: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return _grouped_linear_eager(x, wt, ids, offsets)


@_grouped_linear_op.register_fake
def _(x, wt, ids, offsets):
    return x.new_empty(x.shape[0], wt.shape[2])


@torch.library.custom_op("alignlab::grouped_linear_backward", mutates_args=())
def _grouped_linear_backward_op(x: torch.Tensor, wt: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,
                                grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gx = _grouped_linear_eager(grad, wt.transpose(1, 2).to(grad.dtype), ids, offsets)
    # dW_e = X_eᵀ G_e over expert e's rows: both scattered into (E, C, ·) as in the forward's padded path
    padded_x, _ = _padded_rows(x, ids, offsets, wt.shape[0])
    padded_g, _ = _padded_rows(grad.to(x.dtype), ids, offsets, wt.shape[0])
    return gx.to(x.dtype).contiguous(), torch.bmm(padded_x.transpose(1, 2), padded_g).to(wt.dtype).contiguous()


@_grouped_linear_backward_op.register_fake
def _(x, wt, ids, offsets, grad):
    return x.new_empty(x.shape), wt.new_empty(wt.shape)


def _grouped_linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_linear_grad(ctx, grad):
    gx, gw = torch.ops.alignlab.grouped_linear_backward(*ctx.saved_tensors, grad)
    return gx, gw, None, None


_grouped_linear_op.register_autograd(_grouped_linear_grad, setup_context=_grouped_linear_setup)


_GROUPED_MM = getattr(F, "grouped_mm", None)


def _grouped_mm_applies(x: torch.Tensor, wt: torch.Tensor) -> bool:
    if _GROUPED_MM is None or x.dtype != wt.dtype or x.device != wt.device or torch.compiler.is_compiling():
        return False
    if x.is_cuda:
        ok = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    else:
        ok = x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
    size = x.element_size()
    aligned = all(t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s, n in zip(t.stride(), t.shape) if s != 1 and n > 1)
                  for t in (x, wt))
    return ok and aligned and x.stride(-1) == 1 and 1 in wt.stride()[1:]


def _padded_bmm(x: torch.Tensor, wt: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
    """The reference: rows scattered into ``(E, C, in)`` (C = the largest group), one ``bmm``, gathered back."""
    padded, pos = _padded_rows(x, groups.ids, groups.offsets, wt.shape[0])
    return torch.bmm(padded, wt.to(x.dtype))[groups.ids, pos]


def _padded_rows(x: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted rows ``x (S, d)`` scattered into ``(E, C, d)`` (zeros past each group's end), and each row's slot."""
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).long()
    pos = torch.arange(x.shape[0], device=x.device) - (offsets.long() - counts)[ids]
    capacity = int(counts.max()) if counts.numel() else 0
    return x.new_zeros(num_experts, capacity, x.shape[1]).index_put((ids, pos), x), pos


def _pad_rank(r: int, dtype: torch.dtype) -> int:
    """The rank rounded up so that an ``(…, r)`` row is a multiple of 16 bytes (``grouped_mm``'s alignment)."""
    per = max(1, 16 // dtype.itemsize)
    return -(-r // per) * per


def _add_low_rank(sign: float):
    """The plain-LoRA fold for :meth:`ExpertLoRA._fold`: ``W_e ± s·B_e A_e`` in fp32 (fp64 for fp64), rounded once."""
    def fold(e, w_e, a_e, b_e, s):
        dt = torch.promote_types(w_e.dtype, torch.float32)
        return torch.addmm(w_e.to(dt), b_e.to(dt), a_e.to(dt), alpha=sign * s).to(w_e.dtype)

    return fold


# -- the layer -------------------------------------------------------------------------------------
class ExpertLoRA(AdapterLayer):
    """A transformers 5.x experts module with LoRA / DoRA on its fused expert weights.

    ``ExpertLoRA(experts, {"gate_up_proj": 8, "down_proj": 8}, alpha=16)`` gives every expert of each
    named parameter its own pair ``A_e (r, in)``, ``B_e (out, r)``; the forward (see the module
    docstring) is a drop-in for the experts module's: ``(hidden (T, H), top_k_index (T, k),
    top_k_weights (T, k)) -> (T, H)``.

    Args:
        base: the experts module (``gate_up_proj``/``up_proj``, ``down_proj`` 3-D parameters); frozen.
        ranks: ``{parameter name: r}`` of the first adapter.
        alpha: scaling numerator, one for all parameters or ``{parameter name: α}``.
        dropout, init, use_rslora, use_dora, adapter_name, adapter_dtype, exact_fp32: as for
            :class:`~alignlab.adapters.lora.LoRALinear`; ``init`` is ``"kaiming"`` or ``"gaussian"``
            (PiSSA/OLoRA, which rewrite the base, are not defined here).
    Raises:
        TypeError: ``base`` is not an experts module, or one whose class overrides the decorated expert loop
            with a forward of its own (:func:`~alignlab.expert_routing.forward_overridden_by`); a flag
            (``use_rslora``, ``use_dora``, ``exact_fp32``) is neither a bool nor a NumPy bool.
        ValueError: unknown parameter names, bad rank/alpha/dropout/init, an expert-parallel module.
    """

    mergeable = True
    adapter_stores = {"lora_A": nn.ModuleDict, "lora_B": nn.ModuleDict, "lora_magnitude_vector": nn.ModuleDict,
                      "lora_dropout": nn.ModuleDict, "r": dict, "alpha": dict, "scaling": dict, "use_rslora": dict,
                      "init": dict}

    def __init__(self, base: nn.Module, ranks: dict[str, int], alpha: float | dict[str, float] = 8.0,
                 dropout: float = 0.0, init: str = "kaiming", use_rslora: bool = False, use_dora: bool = False,
                 adapter_name: str = "default", adapter_dtype: torch.dtype | None = None,
                 exact_fp32: bool = False) -> None:
        if not fused_expert_parameters(base):
            raise TypeError("base must be a transformers 5.x experts module (3-D gate_up_proj/up_proj and down_proj, "
                            f"num_experts, is_transposed), got {type(base).__name__}")
        if getattr(base, "_is_expert_parallel", False):
            raise ValueError("expert-parallel experts modules are not supported (each rank would hold a slice of E)")
        custom = forward_overridden_by(base)
        if custom is not None:
            raise TypeError(f"base: {custom.__name__}.forward adds its own code around the decorated expert loop, which "
                            "this wrapper replaces (the adapted block would compute something else); LoRA on its "
                            "expert weights is not supported, target the model's linears only")
        super().__init__(base)
        self.exact_fp32 = as_bool(exact_fp32, "exact_fp32")
        self._merge_norms: dict[tuple[str, str], torch.Tensor] = {}
        self._hidden_size = self.shape("gate_up_proj" if _has_gate(base) else "up_proj")[2]  # for check_routing
        self.add_adapter(adapter_name, ranks, alpha, dropout, init, use_rslora, use_dora, adapter_dtype)
        self.active_adapters = [adapter_name]

    @property
    def num_experts(self) -> int:
        return self.base_layer.num_experts

    def shape(self, param: str) -> tuple[int, int, int]:
        """``(E, out, in)`` of expert parameter ``param``."""
        base = self.base_layer
        if hasattr(base, "shape_of"):
            return (self.num_experts, *base.shape_of(param))
        return tuple(expert_weight(base, param).shape)

    # -- adapters -------------------------------------------------------------------------------
    def add_adapter(self, name: str, ranks: dict[str, int], alpha: float | dict[str, float] = 8.0,
                    dropout: float = 0.0, init: str = "kaiming", use_rslora: bool = False, use_dora: bool = False,
                    adapter_dtype: torch.dtype | None = None) -> None:
        """Add a named adapter on the parameters in ``ranks`` (inactive until listed in ``active_adapters``)."""
        self._check_new_adapter(name)
        have = fused_expert_parameters(self.base_layer)
        if not isinstance(ranks, dict) or not ranks or any(p not in have for p in ranks):
            raise ValueError(f"ranks must map some of this module's expert parameters {have} to ranks, got {ranks!r}")
        if isinstance(alpha, dict) and any(p not in ranks for p in alpha):  # a misspelt key would be ignored
            raise ValueError(f"alpha must name only parameters in ranks {list(ranks)}, got keys {list(alpha)}")
        alphas = alpha if isinstance(alpha, dict) else {p: alpha for p in ranks}
        for p, r in ranks.items():
            check_positive_int(r, f"rank of {p!r}")
            check_positive_number(alphas.get(p), f"alpha of {p!r}")  # NaN and inf fail too
        ranks = {p: int(r) for p, r in ranks.items()}
        alphas = {p: as_python_number(alphas[p]) for p in ranks}
        check_dropout(dropout)
        check_adapter_dtype(adapter_dtype)
        if init not in EXPERT_INITS:
            raise ValueError(f"init must be one of {EXPERT_INITS} on expert parameters, got {init!r}")
        use_rslora = as_bool(use_rslora, "use_rslora")  # "no" would switch rsLoRA scaling on
        use_dora = as_bool(use_dora, "use_dora")
        default_dtype, device = self._adapter_dtype_device()
        dtype = adapter_dtype or default_dtype
        E = self.num_experts
        A, B, M = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        for p in [q for q in EXPERT_PARAMETERS if q in ranks]:
            r, (_, out, inp) = ranks[p], self.shape(p)
            A[p] = nn.Parameter(torch.empty(E * r, inp, device=device, dtype=dtype))
            B[p] = nn.Parameter(torch.zeros(out, r * E, device=device, dtype=dtype))
            with torch.no_grad():
                if init == "kaiming":  # per expert the same bound as LoRALinear's: fan_in = in
                    nn.init.kaiming_uniform_(A[p], a=math.sqrt(5))
                else:
                    nn.init.normal_(A[p], std=1.0 / r)
        self.lora_A[name], self.lora_B[name] = A, B
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name] = {p: ranks[p] for p in A}
        self.alpha[name] = {p: float(alphas[p]) for p in A}
        self.scaling[name] = {p: lora_scaling(ranks[p], alphas[p], use_rslora) for p in A}
        self.use_rslora[name], self.init[name] = use_rslora, init
        if use_dora:
            with torch.no_grad():
                for p in A:
                    M[p] = nn.Parameter(self._row_norm(name, p, torch.float32).to(dtype))
            self.lora_magnitude_vector[name] = M

    def is_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    def parameters_of(self, name: str) -> list[str]:
        """The expert parameters adapter ``name`` adapts, in :data:`EXPERT_PARAMETERS` order."""
        self._check_name(name)
        return list(self.lora_A[name].keys())

    def factors(self, name: str, param: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert views of adapter ``name``'s factors on ``param``: ``A (E, r, in)``, ``B (E, out, r)``.

        Raises:
            ValueError: unknown adapter ``name``, or ``param`` not adapted by it.
        """
        if param not in self.parameters_of(name):
            raise ValueError(f"param must be one of the parameters adapter {name!r} adapts {self.parameters_of(name)}, "
                             f"got {param!r}")
        return self._views(name, param)

    def _views(self, name: str, param: str) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`factors` without the argument check (the forward and merge paths)."""
        a, b = self.lora_A[name][param], self.lora_B[name][param]
        E = self.num_experts
        return a.view(E, -1, a.shape[1]), b.view(b.shape[0], -1, E).permute(2, 0, 1)

    def delta_weight(self, name: str, param: str | None = None) -> torch.Tensor:
        """``s·B_e A_e`` for every expert in fp32 (fp64 for fp64 factors), ``(E, out, in)`` (plain LoRA; ``param`` may
        be left out when the adapter has one)."""
        params = self.parameters_of(name)
        if param is None:
            if len(params) != 1:
                raise ValueError(f"adapter {name!r} adapts {params}; name the parameter")
            param = params[0]
        a, b = self.factors(name, param)
        dt = torch.promote_types(b.dtype, torch.float32)
        return self.scaling[name][param] * torch.bmm(b.to(dt), a.to(dt))

    # -- forward --------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                *args, **kwargs) -> torch.Tensor:
        names = [] if self.disabled else [n for n in self.active_adapters if n in self.lora_A and n not in self.merged_adapters]
        if not names:
            return self.base_layer(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        base = self.base_layer
        # expert-parallel modules are refused at construction, so every id must name one of the experts
        check_routing(hidden_states, top_k_index, top_k_weights, self._hidden_size, base.num_experts)
        groups = ExpertGroups.from_routing(top_k_index, base.num_experts)
        x = hidden_states[groups.perm // top_k_index.shape[-1]]
        y = expert_mlp(base, x, lambda param, rows: self._project(param, rows, groups, names), _has_gate(base))
        y = y * top_k_weights.reshape(-1)[groups.perm].unsqueeze(-1)
        out = torch.empty_like(y).index_copy(0, groups.perm, y)  # back to (token, slot) order
        return out.view(*top_k_index.shape, y.shape[-1]).sum(dim=1).to(hidden_states.dtype)

    def _project(self, param: str, x: torch.Tensor, groups: ExpertGroups, names: list[str]) -> torch.Tensor:
        """``W_e x + Σ_adapters Δ_e(x) + b_e`` for the sorted rows ``x (S, in)`` → ``(S, out)``."""
        x, out = self._base_linear(param, x, groups)
        adapters = [n for n in names if param in self.lora_A[n]]
        if adapters:
            base_out = out
            for n in adapters:
                out = out + self._delta(n, param, x, base_out, groups)
            out = out.to(base_out.dtype)
        return add_expert_bias(self.base_layer, param, out, groups.ids)

    def _base_linear(self, param: str, x: torch.Tensor, groups: ExpertGroups) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, W_e x)`` with ``x`` cast to the base's compute dtype: through the module's ``linear_sorted``
        where it has one, else :func:`expert_weight` and :func:`grouped_linear`."""
        base = self.base_layer
        if hasattr(base, "linear_sorted"):
            x = x.to(base.compute_dtype)
            return x, base.linear_sorted(param, x, groups.offsets)
        w = expert_weight(base, param)
        x = x.to(w.dtype)
        return x, grouped_linear(x, w, groups)

    def _delta(self, name: str, param: str, x: torch.Tensor, base_out: torch.Tensor,
               groups: ExpertGroups) -> torch.Tensor:
        """What adapter ``name`` adds on ``param``: ``s·B_e A_e x`` (LoRA) or ``(g_e − 1)·W_e x + g_e·s·B_e A_e x``
        with ``g_e = m_e / ‖W_e + s·B_e A_e‖_row`` (DoRA); in the compute dtype, fp32 with ``exact_fp32``."""
        dtype = torch.promote_types(x.dtype, torch.float32) if self.exact_fp32 else x.dtype
        a, b = self._cast_factors(name, param, dtype)
        xd = self.lora_dropout[name](x.to(dtype))
        lora = grouped_linear(grouped_linear(xd, a, groups) * self.scaling[name][param], b, groups)
        if not self.is_dora(name):
            return lora
        with torch.no_grad():
            norm = self._row_norm(name, param, torch.float32)
        g = dora_gain(self.lora_magnitude_vector[name][param], norm)[groups.ids].to(dtype)  # (S, out); fp32 or fp64 norm
        if self.training and not isinstance(self.lora_dropout[name], nn.Identity):
            # dropout changed the input: the base term is taken on the dropped input, as LoRALinear (and PEFT) do
            base_out = self._base_linear(param, xd, groups)[1]
        return (g - 1) * base_out.to(dtype) + g * lora

    def _cast_factors(self, name: str, param: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``A (E, r', in)`` and ``B (E, out, r')`` in ``dtype`` for :func:`grouped_linear`, the rank zero-padded to
        a 16-byte row (``grouped_mm``'s alignment; the padding adds nothing). Differentiable."""
        a, b = self._views(name, param)
        E, r, inp = a.shape
        rp = _pad_rank(r, dtype)
        if rp == r:
            return a.to(dtype), b.to(dtype, memory_format=torch.contiguous_format)
        a_pad = a.new_zeros(E, rp, inp, dtype=dtype)
        b_pad = b.new_zeros(E, b.shape[1], rp, dtype=dtype)
        a_pad[:, :r] = a
        b_pad[:, :, :r] = b
        return a_pad, b_pad

    def _row_norm(self, name: str, param: str, dtype: torch.dtype) -> torch.Tensor:
        """``‖W_e + s·B_e A_e‖`` per expert and output row, ``(E, out)``, without forming the sum:
        ``‖W_e,i‖² + 2s·⟨B_e,i, (W_e A_eᵀ)_i⟩ + s²·B_e,i (A_e A_eᵀ) B_e,iᵀ`` (see ``dora.py``)."""
        w = expert_weight(self.base_layer, param)
        dtype = torch.promote_types(dtype, w.dtype)  # fp64 for an fp64 base: vector_norm refuses to narrow
        a, b = self._views(name, param)
        s = self.scaling[name][param]
        a32, b32 = a.detach().to(dtype), b.detach().to(dtype)
        w_sq = torch.linalg.vector_norm(w.detach(), dim=2, dtype=dtype).square()
        wa = torch.bmm(w.detach(), a.detach().to(w.dtype).transpose(1, 2)).to(dtype)  # (E, out, r)
        cross = (b32 * wa).sum(dim=2)
        quad = (torch.bmm(b32, torch.bmm(a32, a32.transpose(1, 2))) * b32).sum(dim=2)
        return (w_sq + 2.0 * s * cross + s * s * quad).clamp_min(0.0).sqrt()

    # -- merge ----------------------------------------------------------------------------------
    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the expert weights; a DoRA adapter is folded first.

        Forward adds DoRA as ``(g_e − 1)·W_e x + g_e·s·B_e A_e x`` on the *unmerged* ``W_e`` beside the other
        adapters' terms, so its fold ``g_e ⊙ (W_e + s·B_e A_e)`` is exact only onto a base with nothing
        merged yet: it goes first (then the LoRA terms add on top), and a DoRA adapter that would meet another
        DoRA adapter or an already merged one on the same expert parameter is refused.
        """
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        names.sort(key=lambda n: not self.is_dora(n))  # stable: DoRA first, the rest in the order given
        super().merge(names)

    def _check_mergeable(self, names: list[str]) -> None:
        for p in {p for n in names for p in self.lora_A[n].keys()}:
            dora = [n for n in names if self.is_dora(n) and p in self.lora_A[n]]
            merged = [n for n in self.merged_adapters if p in self.lora_A[n]]
            if dora and (len(dora) > 1 or merged):
                raise ValueError(
                    f"cannot merge DoRA adapter {dora[0]!r} on {p!r} together with "
                    f"{(dora[1:] + merged)[0]!r}: a DoRA fold is exact only onto the unmerged expert weights and "
                    "at most one DoRA adapter per parameter; merge it alone first (unmerge() the others), or "
                    "keep them unmerged")
        if hasattr(self.base_layer, "load_dense_experts_"):  # the warning AdapterLayer.merge gives a quantized linear
            warnings.warn("merging into quantized experts re-quantizes W_e + ΔW_e, so the merged block differs from "
                          "base + adapter by that rounding; unmerge() puts the packed weights from before the merge "
                          "back exactly", UserWarning, stacklevel=4)

    def _base_snapshot(self) -> dict | None:
        """A quantized base's packed weights from before the first merge (``quantized_state``), else None."""
        base = self.base_layer
        if not hasattr(base, "quantized_state"):
            return None
        return {p: base.quantized_state(p) for p in fused_expert_parameters(base)}

    def _restore_base(self, snapshot: dict) -> None:
        for p, packed in snapshot.items():
            self.base_layer.load_quantized_state_(p, packed)

    def _merge_one(self, name: str) -> None:
        folds = {}
        for p in self.parameters_of(name):
            if not self.is_dora(name):
                folds[p] = _add_low_rank(+1.0), None
                continue
            m, norms = self.lora_magnitude_vector[name][p], {}

            def fold(e, w_e, a_e, b_e, s, m=m, norms=norms):
                new, norms[e] = dora_merged_weight(w_e, a_e, b_e, s, m[e])
                return new

            folds[p] = fold, norms
        for p, (fold, _) in folds.items():  # refuse before any expert changes: the fold writes in place
            self._refuse_float16_fold(name, p, fold)
        for p, (fold, norms) in folds.items():
            self._fold(name, p, fold)
            if norms is not None:
                self._merge_norms[(name, p)] = torch.stack([norms[e] for e in range(len(norms))])

    def _refuse_float16_fold(self, name: str, param: str, update) -> None:
        """Fold expert by expert without writing, and refuse (``ValueError``) if a float16 weight would get an inf."""
        if hasattr(self.base_layer, "load_dense_experts_"):
            return  # a quantized base is folded in fp32 and re-quantized
        w = expert_weight(self.base_layer, param)
        if w.dtype != torch.float16:
            return  # bfloat16 has float32's range
        a, b = self._views(name, param)
        s = self.scaling[name][param]
        extra = (self.lora_magnitude_vector[name][param],) if self.is_dora(name) else ()
        for e in range(w.shape[0]):
            refuse_float16_merge(update(e, w[e], a[e], b[e], s), (w[e], a[e], b[e], *extra), name,
                                 f" into {param!r} (expert {e})")

    def _unmerge_one(self, name: str) -> None:
        for p in self.parameters_of(name) if self.is_dora(name) else ():  # refuse before any expert changes
            norms = kept_merge_norm(self._merge_norms, (name, p), f" {name!r} {p!r}")
            check_dora_unmergeable(self.lora_magnitude_vector[name][p], norms, f" {name!r} {p!r}")
        for p in self.parameters_of(name):
            if not self.is_dora(name):
                self._fold(name, p, _add_low_rank(-1.0))
                continue
            m, norms = self.lora_magnitude_vector[name][p], self._merge_norms.pop((name, p))
            self._fold(name, p, lambda e, w_e, a_e, b_e, s: dora_unmerged_weight(w_e, a_e, b_e, s, m[e], norms[e]))

    def _fold(self, name: str, param: str, update) -> None:
        """``W_e ← update(e, W_e, A_e, B_e, s)`` expert by expert (one fp32 ``(out, in)`` temporary at a time),
        written back through :func:`set_expert_weight_` where the weight is not a view of the parameter."""
        quantized = hasattr(self.base_layer, "load_dense_experts_")
        # a quantized base in fp32 (not its compute dtype): the re-quantization is then the one rounding
        w = self.base_layer.dequantize_experts(param, dtype=torch.float32) if quantized else expert_weight(self.base_layer, param)
        a, b = self._views(name, param)
        s = self.scaling[name][param]
        for e in range(w.shape[0]):
            w[e].copy_(update(e, w[e], a[e], b[e], s))
        if quantized:
            set_expert_weight_(self.base_layer, param, w)

    def _forget_merge(self, name: str) -> None:
        for p in self.lora_A[name].keys():
            self._merge_norms.pop((name, p), None)

    # -- PEFT file layout -----------------------------------------------------------------------
    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors under PEFT's keys relative to this module: PEFT wraps each targeted
        parameter in one ``ParamWrapper``, nested in registration order (the first parameter innermost), so
        the key of the i-th of n carries ``n − 1 − i`` ``base_layer.`` prefixes. DoRA's
        ``lora_magnitude_vector`` (``(E, out)``) has no PEFT counterpart (alignlab's own format)."""
        params = self.parameters_of(name)
        out = {}
        for i, p in enumerate(params):
            prefix = "base_layer." * (len(params) - 1 - i)
            out[f"{prefix}lora_A.weight"] = self.lora_A[name][p]
            out[f"{prefix}lora_B.weight"] = self.lora_B[name][p]
            if self.is_dora(name):
                out[f"{prefix}lora_magnitude_vector"] = self.lora_magnitude_vector[name][p]
        return out

    def extra_repr(self) -> str:
        parts = []
        for n in self.adapter_names():
            ranks = ", ".join(f"{p}: r={self.r[n][p]}, s={self.scaling[n][p]:g}" for p in self.r[n])
            parts.append(f"{n}: {ranks}{', dora' if self.is_dora(n) else ''}")
        return f"experts={self.num_experts}, adapters=[{'; '.join(parts)}], active={self.active_adapters}"


# -- files written by older PEFT -------------------------------------------------------------------
PEFT_EXPERT_LAYOUT_FIX = (0, 19, 1)


def check_peft_expert_layout(model: nn.Module, config, raw: dict) -> None:
    """Refuse a PEFT file whose expert factors are laid out the other way round.

    PEFT before 0.19.1 read every 3-D parameter as ``(E, in, out)``; for the ``(E, out, in)`` storage
    of Mixtral or Qwen3-MoE (``is_transposed`` False) its ``lora_A`` then sits on the output side
    and ``lora_B`` on the input side. Such files load with shapes that may even fit, so they are
    refused by their ``peft_version`` rather than read wrong. ``is_transposed`` modules (gpt-oss) read
    the same in every version.

    Raises:
        ValueError: ``raw`` (an ``adapter_config.json``) comes from PEFT < 0.19.1 and targets an
            ``(E, out, in)`` expert weight of ``model``.
    """
    version = raw.get("peft_version")
    if raw.get("peft_type") != "LORA" or not raw.get("target_parameters") or not isinstance(version, str):
        return
    parts = [int(p) for p in version.split("+")[0].split(".")[:3] if p.isdigit()]
    if tuple(parts) >= PEFT_EXPERT_LAYOUT_FIX:
        return
    expert_parameters = getattr(config, "expert_parameters", None)
    for name in (expert_parameters(model) if callable(expert_parameters) else {}):
        module = model.get_submodule(name)
        if not getattr(getattr(module, "base_layer", module), "is_transposed", False):
            raise ValueError(f"adapter_config.json: written by PEFT {version}, which stored the factors of (E, out, in) "
                             f"expert weights such as {name!r} transposed (fixed in PEFT 0.19.1); load it with that "
                             "PEFT and save it again with PEFT >= 0.19.1")
