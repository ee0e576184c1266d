"""alignlab.eval: measure what a fine-tune did.

Perplexity, SQuAD exact match / F1, BLEU / chrF / ROUGE (sacrebleu and
rouge-score, the ``eval`` extra), pass@k with a subprocess code runner, DRFR,
LLM-as-judge helpers and batched reward-model scoring.
"""

from alignlab.eval.code_eval import ExecutionResult, pass_at_k, run_tests
from alignlab.eval.drfr import drfr, parse_yes_no
from alignlab.eval.judge import (
    PAIRWISE_TEMPLATE,
    SINGLE_ANSWER_TEMPLATE,
    PairwiseJudgement,
    bootstrap_ci,
    judge_pairwise,
    judge_single,
    pairwise_prompt,
    parse_pairwise_verdict,
    parse_rating,
    single_answer_prompt,
    win_rate,
    win_rate_ci,
)
from alignlab.eval.overlap import bleu, chrf, rouge
from alignlab.eval.perplexity import negative_log_likelihood, perplexity
from alignlab.eval.qa import exact_match, normalize_answer, squad_scores, token_f1
from alignlab.eval.reward import reward_scores

__all__ = [
    "PAIRWISE_TEMPLATE",
    "SINGLE_ANSWER_TEMPLATE",
    "ExecutionResult",
    "PairwiseJudgement",
    "bleu",
    "bootstrap_ci",
    "chrf",
    "drfr",
    "exact_match",
    "judge_pairwise",
    "judge_single",
    "negative_log_likelihood",
    "normalize_answer",
    "pairwise_prompt",
    "parse_pairwise_verdict",
    "parse_rating",
    "parse_yes_no",
    "pass_at_k",
    "perplexity",
    "reward_scores",
    "rouge",
    "run_tests",
    "single_answer_prompt",
    "squad_scores",
    "token_f1",
    "win_rate",
    "win_rate_ci",
]
