"""Losses on tensors: log-probs and fused cross-entropy, preference and RL losses, distillation, regularisers.

Every loss is a plain function (or a small module holding state, like ``EWC``);
fused forms take the last hidden state and the ``lm_head`` weight and never
materialise the full ``(tokens, vocab)`` logits.
"""

from alignlab.losses.cross_entropy import CrossEntropyOutput, count_tokens, linear_cross_entropy
from alignlab.losses.distill import (
    distill_loss,
    forward_kl,
    fused_linear_distill_loss,
    generalized_jsd,
    reverse_kl,
    sequence_divergence,
    sequence_kd_labels,
    sequence_kd_loss,
    total_variation,
)
from alignlab.losses.fused_preference import (
    completion_logps,
    fused_linear_cpo,
    fused_linear_dpo,
    fused_linear_kto,
    fused_linear_orpo,
    fused_linear_preference,
    fused_linear_simpo,
)
from alignlab.losses.fused_rl import fused_linear_grpo, packed_to_padded
from alignlab.losses.logprobs import linear_logprobs, sequence_logprobs, token_logprobs
from alignlab.losses.preference import DPO_LOSS_TYPES, cpo_loss, dpo_loss, kto_loss, orpo_loss, simpo_loss, una_loss
from alignlab.losses.regularizers import EWC, L2SP, estimate_fisher, ewc_penalty, l2sp_penalty, lora_delta_sq
from alignlab.losses.reward import (
    bradley_terry_loss,
    gae,
    group_advantages,
    grpo_loss,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    whiten,
)

__all__ = [
    "bradley_terry_loss", "completion_logps", "count_tokens", "cpo_loss", "CrossEntropyOutput", "distill_loss",
    "dpo_loss", "DPO_LOSS_TYPES", "estimate_fisher", "EWC", "ewc_penalty", "forward_kl", "fused_linear_cpo",
    "fused_linear_distill_loss", "fused_linear_dpo", "fused_linear_grpo", "fused_linear_kto", "fused_linear_orpo",
    "fused_linear_preference", "fused_linear_simpo", "gae", "generalized_jsd", "group_advantages", "grpo_loss",
    "kl_penalty", "kto_loss", "L2SP", "l2sp_penalty", "linear_cross_entropy", "linear_logprobs", "lora_delta_sq",
    "masked_mean",
    "orpo_loss", "packed_to_padded", "ppo_policy_loss", "ppo_value_loss", "reverse_kl", "rloo_advantages",
    "sequence_divergence", "sequence_kd_labels", "sequence_kd_loss", "sequence_logprobs", "simpo_loss",
    "token_logprobs", "total_variation", "una_loss", "whiten",
]
