"""alignlab.quant: NF4 (4-bit NormalFloat) weights and the frozen NF4 linear layer used by QLoRA
(and the frozen NF4 experts of mixture-of-experts blocks)."""

from alignlab.quant.experts import NF4Experts
from alignlab.quant.linear import DequantizedWeight, NF4Linear, quantize_model
from alignlab.quant.nf4 import (
    NF4Tensor,
    nf4_dequantize,
    nf4_from_bnb_state_dict,
    nf4_quantize,
    nf4_to_bnb_state_dict,
)

__all__ = [
    "DequantizedWeight",
    "NF4Experts",
    "NF4Linear",
    "NF4Tensor",
    "nf4_dequantize",
    "nf4_from_bnb_state_dict",
    "nf4_quantize",
    "nf4_to_bnb_state_dict",
    "quantize_model",
]
