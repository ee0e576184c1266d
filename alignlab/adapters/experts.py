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

Everything else the forward needs comes from the transformers experts module itself:
``num_experts``, ``has_gate``, ``has_bias``, ``is_transposed``, ``_apply_gate`` / ``act_fn``,
optional ``has_post_expert_norm`` / ``post_expert_norm`` and ``<name>_bias`` parameters; a
quantized replacement keeps those attributes.
"""

from __future__ import annotations

import torch
from torch import nn


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
