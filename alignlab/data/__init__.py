"""alignlab.data: SFT formatting and packing, preference pairs, AI-feedback loops, token cleaning, replay mixing.

Plain functions over Python iterables and lists of token ids; ``transformers``
is only needed for the chat template (the user's tokenizer).
"""

from alignlab.data.ai_feedback import (
    ConstitutionalRecord,
    OAIFBatch,
    Principle,
    constitutional_comparisons,
    constitutional_revisions,
    hf_generator,
    lm_preference,
    oaif_batch,
    revision_pairs,
    revision_sft_examples,
    sample_completions,
)
from alignlab.data.packing import (
    PackedExample,
    collate_packed,
    collate_padded,
    collate_padding_free,
    cu_seq_lens_from_position_ids,
    pack_examples,
    packed_attention_mask,
)
from alignlab.data.pairs import (
    PreferencePair,
    collate_preference,
    counterfactual_pairs,
    llm_judge,
    online_feedback_pairs,
    pairs_from_scores,
    parse_judge_score,
    self_rewarding_pairs,
    spin_pairs,
    tokenize_preference,
)
from alignlab.data.replay import ReplayBatchSampler, ReplayMixer, replay_counts
from alignlab.data.sft import (
    IGNORE_INDEX,
    SequenceTooLongError,
    TokenizedExample,
    render_chat,
    tokenize_chat,
    tokenize_chats,
)
from alignlab.data.token_cleaning import (
    TokenCleaner,
    clean_labels,
    influence_threshold,
    token_influence,
    token_losses,
)

__all__ = [
    "ConstitutionalRecord",
    "OAIFBatch",
    "Principle",
    "constitutional_comparisons",
    "constitutional_revisions",
    "hf_generator",
    "lm_preference",
    "oaif_batch",
    "revision_pairs",
    "revision_sft_examples",
    "sample_completions",
    "ReplayBatchSampler",
    "ReplayMixer",
    "replay_counts",
    "IGNORE_INDEX",
    "PackedExample",
    "PreferencePair",
    "SequenceTooLongError",
    "TokenCleaner",
    "TokenizedExample",
    "clean_labels",
    "collate_packed",
    "collate_padded",
    "collate_padding_free",
    "collate_preference",
    "counterfactual_pairs",
    "cu_seq_lens_from_position_ids",
    "influence_threshold",
    "llm_judge",
    "online_feedback_pairs",
    "pack_examples",
    "packed_attention_mask",
    "pairs_from_scores",
    "parse_judge_score",
    "render_chat",
    "self_rewarding_pairs",
    "spin_pairs",
    "token_influence",
    "token_losses",
    "tokenize_chat",
    "tokenize_chats",
    "tokenize_preference",
]
