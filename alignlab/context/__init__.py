"""alignlab.context: long-context fine-tuning (RoPE scaling, token-sparse training)."""

from alignlab.context.rope import (
    RopeScaling,
    ScaledRotaryEmbedding,
    apply_rope_scaling,
    dynamic_ntk_inv_freq,
    linear_inv_freq,
    longrope_attention_scaling,
    longrope_inv_freq,
    ntk_inv_freq,
    rope_inv_freq,
    scaled_inv_freq,
    yarn_attention_scaling,
    yarn_inv_freq,
    yarn_ramp,
)
from alignlab.context.token_sparse import (
    TokenSparse,
    apply_token_sparsity,
    attention_information_scores,
    select_tokens,
    set_token_mask,
    token_sparse_apply,
)

__all__ = [
    "RopeScaling",
    "ScaledRotaryEmbedding",
    "TokenSparse",
    "apply_rope_scaling",
    "apply_token_sparsity",
    "attention_information_scores",
    "dynamic_ntk_inv_freq",
    "linear_inv_freq",
    "longrope_attention_scaling",
    "longrope_inv_freq",
    "ntk_inv_freq",
    "rope_inv_freq",
    "scaled_inv_freq",
    "select_tokens",
    "set_token_mask",
    "token_sparse_apply",
    "yarn_attention_scaling",
    "yarn_inv_freq",
    "yarn_ramp",
]
