"""alignlab.decoding: training-free (decoding-time) alignment.

Plain functions on logits plus HF-compatible logits processors
(``model.generate(..., logits_processor=LogitsProcessorList([...]))``):
best-of-N, reward-guided decoding (ARGS), contrastive decoding and
proxy-tuning / logit arithmetic.
"""

from alignlab.decoding.best_of_n import BestOfNOutput, best_of_n, rerank
from alignlab.decoding.companion import CompanionLM
from alignlab.decoding.contrastive import ContrastiveDecodingLogitsProcessor, contrastive_logits
from alignlab.decoding.proxy_tuning import ProxyTuningLogitsProcessor, proxy_tuning_logits
from alignlab.decoding.reward_guided import RewardGuidedLogitsProcessor, reward_guided_logits, reward_model_fn

__all__ = [
    "BestOfNOutput",
    "CompanionLM",
    "ContrastiveDecodingLogitsProcessor",
    "ProxyTuningLogitsProcessor",
    "RewardGuidedLogitsProcessor",
    "best_of_n",
    "contrastive_logits",
    "proxy_tuning_logits",
    "rerank",
    "reward_guided_logits",
    "reward_model_fn",
]
