"""Arguments of the wrong kind raise ``alignlab.ArgumentTypeError`` (a TypeError, and a ValueError for code written
when these raised ValueError); values of the right kind that are refused (a number out of range, an empty list, a
tensor of the wrong shape) still raise a plain ValueError.

Each case is a public entry point with one argument swapped: ``wrong`` holds values of the wrong kind (a str, None,
a bool where a number goes; a float where an int goes; a list where a tensor goes), ``out_of_range`` values of the
right kind that are refused.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from conftest import make_experts
from torch import nn

import alignlab
from alignlab import _checks, adapters, quant
from alignlab.adapters import base as adapter_base
from alignlab.data import ai_feedback, packing, pairs, replay, sft, token_cleaning
from alignlab.bench import roofline, timing
from alignlab.context import rope
from alignlab.context import token_sparse as context_token_sparse
from alignlab.decoding import best_of_n
from alignlab.eval import code_eval, drfr, judge, overlap, qa
from alignlab.eval import reward as eval_reward
from alignlab.losses import distill, fused_preference, fused_rl, logprobs, preference, regularizers, reward
from alignlab.merging import lora as merging_lora
from alignlab.merging import methods, recipe
from alignlab.optim import adamw8bit
from alignlab.quant import nf4

D = torch.float64


def _logps(n=2):
    return torch.randn(n, dtype=D)


def _head(n=3, hidden=4, vocab=5):
    return torch.randn(n, hidden, dtype=D), torch.randn(vocab, hidden, dtype=D), torch.randint(0, vocab, (n,))


def _tokens_loss(tok):
    return tok.sum(), {}


def _grpo(**kw):
    h, w, ids = _head()
    return fused_rl.fused_linear_grpo(h[None], w, ids[None], torch.zeros(1, dtype=D), **kw)


def _fisher_data():
    return [(torch.randn(2, 3), torch.tensor([0, 1]))]


def _fisher(**kw):
    model = nn.Linear(3, 2)
    return regularizers.estimate_fisher(model, _fisher_data(), lambda m, b: (m(b[0]), b[1]), **kw)


def _ewc_consolidate(gamma):
    model = nn.Linear(3, 2)
    fisher = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    regularizers.EWC(model, fisher).consolidate(model, fisher, gamma=gamma)


def _example(n=3):
    return {"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))}


def _sample(**kw):
    return ai_feedback.sample_completions(None, [[1, 2]], **kw)


def _generate(batch):
    return ["answer"] * len(batch)


def _replay_mixer_epoch(epoch):
    replay.ReplayMixer([1, 2], [3, 4], batch_size=2).set_epoch(epoch)


def _recipe(method="linear", **kw):
    return recipe.recipe_from_dict({"merge_method": method, "models": ["a", "b"], **kw})


def _nll(**kw):
    return importlib.import_module("alignlab.eval.perplexity").negative_log_likelihood(nn.Identity(), [], **kw)


def _attention(num_heads=2, head_dim=2):
    block = nn.Module()
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(block, p, nn.Linear(num_heads * head_dim, num_heads * head_dim))
    block.num_heads, block.head_dim = num_heads, head_dim
    return nn.Sequential(block)


def _token_sparse_ratio(v):
    layer = context_token_sparse.TokenSparse(nn.Linear(2, 2), 0.5)
    layer.keep_ratio = v


def _nf4_nested_blocksize(v):
    t = nf4.nf4_quantize(torch.randn(4, 64), blocksize=32)
    t.nested_blocksize = v
    t.validate()


def _raise_if_called(*args, **kwargs):
    raise AssertionError("the argument checks should have refused the call")


# (id, argument named in the message, call taking the swapped value, wrong kinds, out of range)
CASES = [
    # the shared helpers
    ("check_positive_int", "n", lambda v: _checks.check_positive_int(v, "n"), ["3", None, True, 2.0, 2.5], [0, -1]),
    ("check_positive_int-none", "n", lambda v: _checks.check_positive_int(v, "n", allow_none=True), ["3", 1.5],
     [0]),
    ("check_positive_number", "x", lambda v: _checks.check_positive_number(v, "x"), ["1", None, True, [1.0]],
     [0, -1.0, float("nan"), float("inf")]),
    ("check_finite_number", "x", lambda v: _checks.check_finite_number(v, "x", minimum=0), ["1", None, False],
     [-1, float("nan")]),
    ("check_number_in_range", "p", lambda v: _checks.check_number_in_range(v, "p", 0, 1, low_open=True),
     ["0.5", None, True, np.bool_(False)], [0, 1.5, float("nan"), float("inf")]),
    ("check_count", "k", lambda v: _checks.check_count(v, "k"), ["3", None, True, 2.5, 2.0], [0, -2]),
    ("check_token_id", "pad_token_id", lambda v: _checks.check_token_id(v, "pad_token_id"), ["2", None, True, 1.5],
     [-1]),
    # losses
    ("dpo_loss.beta", "beta", lambda v: preference.dpo_loss(*[_logps()] * 4, beta=v), ["0.1", None, True],
     [0.0, -1.0, float("nan")]),
    ("dpo_loss.label_smoothing", "label_smoothing",
     lambda v: preference.dpo_loss(*[_logps()] * 4, label_smoothing=v), ["0.1", None], [1.0, -0.1, float("nan")]),
    ("dpo_loss.aot_step_offset", "aot_step_offset",
     lambda v: preference.dpo_loss(*[_logps()] * 4, loss_type="aot", aot_step_logps=tuple([_logps(4)] * 4),
                                   aot_step_offset=v), ["1", 1.0, None], [-1, 3]),
    ("distill_loss.temperature", "temperature",
     lambda v: distill.distill_loss(torch.randn(2, 5), torch.randn(2, 5), temperature=v), ["1", None, True],
     [0, -1.0, float("inf")]),
    ("distill_loss.beta", "beta", lambda v: distill.distill_loss(torch.randn(2, 5), torch.randn(2, 5), beta=v),
     ["0.5", None], [1.5, float("nan")]),
    ("fused_linear_distill_loss.chunk_size", "chunk_size",
     lambda v: distill.fused_linear_distill_loss(*_head()[:2], torch.randn(3, 5, dtype=D), chunk_size=v),
     ["4", 2.0], [0]),
    ("fused_linear_distill_loss.grad_chunk_size", "grad_chunk_size",
     lambda v: distill.fused_linear_distill_loss(*_head()[:2], torch.randn(3, 5, dtype=D), grad_chunk_size=v),
     ["4", 2.5], [-1]),
    ("fused_linear_grpo.temperature", "temperature", lambda v: _grpo(temperature=v), ["1", None, True], [0, -2.0]),
    ("fused_linear_grpo.chunk_size", "chunk_size", lambda v: _grpo(chunk_size=v), ["4", 4.0], [0]),
    ("linear_logprobs.chunk_size", "chunk_size", lambda v: logprobs.linear_logprobs(*_head(), chunk_size=v),
     ["4", 4.0, True], [0, -3]),
    ("fused_linear_preference.resident_bytes", "resident_bytes",
     lambda v: fused_preference.fused_linear_preference(torch.randn(2, 3, 4, dtype=D), _head()[1],
                                                        torch.randint(0, 5, (2, 3)), _tokens_loss, resident_bytes=v),
     ["1", 1.0], [-1]),
    ("group_advantages.group_size", "group_size", lambda v: reward.group_advantages(_logps(4), v), [2.0, 2.5, "2"],
     [0, -1]),
    ("grpo_loss.max_completion_length", "max_completion_length",
     lambda v: reward.grpo_loss(torch.randn(2, 3), torch.randn(2), max_completion_length=v), [8.0], [0]),
    ("estimate_fisher.samples", "samples", lambda v: _fisher(mode="true", samples=v), ["2", 2.0], [0]),
    ("estimate_fisher.num_batches", "num_batches", lambda v: _fisher(num_batches=v), ["1", 1.0], [0]),
    ("ewc_penalty.lam", "lam", lambda v: regularizers.ewc_penalty({}, {}, {}, lam=v), ["1", None], [-1.0]),
    ("EWC.lam", "lam", lambda v: regularizers.EWC(nn.Linear(3, 2), {}, lam=v), ["1", None], [-1.0]),
    ("EWC.consolidate.gamma", "gamma", _ewc_consolidate, ["1", None], [1.5, float("nan")]),
    ("EWC.load_state_dict.lam", "lam",
     lambda v: regularizers.EWC(nn.Linear(3, 2), {}).load_state_dict({"lam": v, "fisher": {}, "anchor": {}}),
     ["1", None], [-1.0]),
    ("l2sp_penalty.beta", "beta", lambda v: regularizers.l2sp_penalty({}, {}, beta=v), ["0", None], [-1.0]),
    ("L2SP.alpha", "alpha", lambda v: regularizers.L2SP(nn.Linear(3, 2), alpha=v), ["1", None, True],
     [-1.0, float("nan")]),
    # tensors: something that is no tensor is the wrong kind, a tensor of the wrong shape a ValueError
    ("dpo_loss.policy_chosen_logps", "policy_chosen_logps", lambda v: preference.dpo_loss(v, *[_logps()] * 3),
     [[0.1, 0.2], 0.5]),
    ("dpo_loss.aot_step_logps", "aot_step_logps",
     lambda v: preference.dpo_loss(*[_logps()] * 4, loss_type="aot", aot_step_logps=(v, *[_logps(4)] * 3)),
     [[0.0] * 4, "x"], [torch.zeros(4, 1, dtype=D)]),
    ("dpo_loss.loss_type", "loss_type", lambda v: preference.dpo_loss(*[_logps()] * 4, loss_type=v),
     [None, 3, {"sigmoid"}, ["sigmoid", 1]], ["nope", [], ["sigmoid", "nope"]]),
    ("dpo_loss.aot_step_logps-tuple", "aot_step_logps",
     lambda v: preference.dpo_loss(*[_logps()] * 4, loss_type="aot", aot_step_logps=v), [_logps(4), "x"],
     [(_logps(4),) * 3]),
    ("kto_loss.desirable", "desirable", lambda v: preference.kto_loss(_logps(), _logps(), v), [[True, False]],
     [torch.ones(3, dtype=torch.bool)]),
    ("orpo_loss.chosen_nll_loss", "chosen_nll_loss",
     lambda v: preference.orpo_loss(-_logps().abs(), -_logps().abs(), v), [1.0, "x"], [torch.ones(2, dtype=D)]),
    ("fused_linear_grpo.cu_seqlens", "cu_seqlens", lambda v: _grpo(cu_seqlens=v), [[0, 3]],
     [torch.zeros(1, 2, dtype=torch.long)]),
    ("packed_to_padded.cu_seqlens", "cu_seqlens", lambda v: fused_rl.packed_to_padded(torch.zeros(1, 3), v),
     [[0, 3], None], [torch.tensor([1, 3])]),
    ("linear_logprobs.bias", "bias", lambda v: logprobs.linear_logprobs(*_head(), bias=v), [[0.0] * 5],
     [torch.zeros(4, dtype=D)]),
    ("fused_linear_preference.hidden", "hidden",
     lambda v: fused_preference.fused_linear_preference(v, _head()[1], torch.randint(0, 5, (2, 3)), _tokens_loss),
     [[[0.0] * 4]], [torch.zeros(3, 4, dtype=D)]),
    ("sequence_divergence.token_losses", "token_losses", lambda v: distill.sequence_divergence(v),
     [[[0.0, 1.0]]], [torch.zeros(3)]),
    ("sequence_kd_labels.sequences", "sequences", lambda v: distill.sequence_kd_labels(v, [1]), [[[1, 2, 3]]],
     [torch.ones(3, dtype=torch.long)]),
    ("whiten.moments", "moments", lambda v: reward.whiten(torch.randn(2, 3), moments=v), [[3.0, 0.0, 3.0]],
     [torch.ones(2)]),
    ("top_heads.scores", "scores", lambda v: adapters.top_heads(v), [[[0.1, 0.2]]], [torch.rand(4)]),
    ("clean_labels.position_ids", "position_ids",
     lambda v: token_cleaning.clean_labels(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3), keep_ratio=0.5,
                                           position_ids=v), [[[0, 1, 2]]], [torch.zeros(1, 3)]),
    # structured arguments
    ("restrict_to_heads.heads", "heads", lambda v: adapters.restrict_to_heads(_attention(), [v]),
     [("0", 1), (0, 1.0), 3], [(0, 1, 2)]),
    ("PromptTuningConfig.init_token_ids", "init_token_ids",
     lambda v: adapters.PromptTuningConfig(init_token_ids=v), ["1 2", [1, "2"], [1.0]], [[]]),
    ("SoRAConfig.rank_pattern", "rank_pattern", lambda v: adapters.SoRAConfig(rank_pattern=v),
     [{"q": "2"}, {"q": 2.0}, ["q"]], [{"q": -1}]),
    ("parse_size", "out_shard_size", recipe.parse_size, [None, True], ["2XB", 0, float("nan")]),
    ("clean_labels.keep_ratio", "keep_ratio",
     lambda v: token_cleaning.clean_labels(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3), keep_ratio=v),
     ["0.5", True], [1.5, float("nan")]),
    ("select_tokens.keep_ratio", "keep_ratio", lambda v: context_token_sparse.select_tokens(torch.rand(1, 4), v),
     ["0.5", True], [0.0, 1.5]),
    ("TokenSparse.keep_ratio", "keep_ratio", _token_sparse_ratio, ["0.5", None], [0.0, float("nan")]),
    ("parse_rating.low", "low/high", lambda v: judge.parse_rating("[[3]]", low=v), ["1", None], [11.0]),
    ("Principle.critique", "Principle.critique", lambda v: ai_feedback.Principle(v, "revise"), [None, 3], ["", " "]),
    ("constitutional_comparisons.principles", "principles",
     lambda v: list(ai_feedback.constitutional_comparisons(["q"], _generate, lambda p: "[[A]]", v)), [["be kind", 3]],
     [[], ["be kind", ""]]),
    ("exact_match.references", "references", lambda v: qa.exact_match("a", v), [["a", 3], [None]], [[]]),
    ("bleu.references", "references", lambda v: overlap.bleu(["a"], [v]), [["a", 3], [None]], [[]]),
    ("rouge.rouge_types", "rouge_types", lambda v: overlap.rouge(["a"], ["a"], rouge_types=v), ["rouge1"], [()]),
    ("drfr.judgements", "judgements", lambda v: drfr(v), ["yes", b"yes"], [[]]),
    ("drfr.judgements[0]", r"judgements\[0\]", lambda v: drfr([v]), ["yes"], [[]]),
    ("EWC.load_state_dict.state", "state", lambda v: regularizers.EWC(nn.Linear(3, 2), {}).load_state_dict(v),
     [None, [1]], [{"lam": 1.0}]),
    ("L2SP.load_state_dict.state", "state", lambda v: regularizers.L2SP(nn.Linear(3, 2)).load_state_dict(v),
     [None, "x"], [{"alpha": 1.0}]),
    # data
    ("pack_examples.max_length", "max_length", lambda v: list(packing.pack_examples([_example()], max_length=v)),
     ["8", 8.0, None], [0]),
    ("packed_attention_mask.length", "length", lambda v: packing.packed_attention_mask([[2, 1]], length=v),
     ["3", 3.0]),
    ("packed_attention_mask.seq_lens", "seq_lens", lambda v: packing.packed_attention_mask([[2, v]]), ["1", 1.0],
     [0, -1]),
    ("collate_padded.pad_token_id", "pad_token_id", lambda v: packing.collate_padded([_example()], pad_token_id=v),
     [None, "0", 0.0], [-1]),
    ("collate_padded.pad_to_multiple_of", "pad_to_multiple_of",
     lambda v: packing.collate_padded([_example()], 0, pad_to_multiple_of=v), ["8", 8.0], [0]),
    ("collate_packed.length", "length",
     lambda v: packing.collate_packed(list(packing.pack_examples([_example()], 8)), 0, length=v), ["8", 8.0]),
    ("replay_counts.batch_size", "batch_size", lambda v: replay.replay_counts(v, 0.5), ["4", 4.0, None], [0]),
    ("replay_counts.replay_fraction", "replay_fraction", lambda v: replay.replay_counts(4, v), ["0.5", None, True],
     [1, -0.1, float("nan")]),
    ("replay_counts.start", "start", lambda v: replay.replay_counts(4, 0.5, start=v), ["1", 1.5], [-1]),
    ("ReplayMixer.set_epoch", "epoch", _replay_mixer_epoch, ["1", 1.0, None], [-1]),
    ("ReplayBatchSampler.task_size", "task_size", lambda v: replay.ReplayBatchSampler(v, 4, batch_size=2),
     ["4", 4.0], [0]),
    ("ReplayBatchSampler.general_size", "general_size", lambda v: replay.ReplayBatchSampler(4, v, batch_size=2),
     ["4", 4.0], [-1]),
    ("online_feedback_pairs.num_candidates", "num_candidates",
     lambda v: list(pairs.online_feedback_pairs(["q"], _generate, lambda p, c: [0.0] * len(c), num_candidates=v)),
     ["2", 2.0], [1]),
    ("counterfactual_pairs.batch_size", "batch_size",
     lambda v: list(pairs.counterfactual_pairs(["q"], _generate, "be kind", None, batch_size=v)), ["8", 8.0], [0]),
    ("parse_judge_score.max_score", "max_score", lambda v: pairs.parse_judge_score("3", max_score=v),
     ["5", None], [0, float("nan")]),
    ("clean_labels.threshold", "threshold",
     lambda v: token_cleaning.clean_labels(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3), threshold=v),
     ["0.5", True], [float("nan")]),
    ("tokenize_chat.max_length", "max_length", lambda v: sft.tokenize_chat([], None, max_length=v), ["8", 8.0],
     [0]),
    ("constitutional_revisions.rounds", "rounds",
     lambda v: list(ai_feedback.constitutional_revisions(["q"], _generate, [ai_feedback.Principle("c", "r")],
                                                         rounds=v)), ["1", 1.0, None], [0]),
    ("sample_completions.num_samples", "num_samples", lambda v: _sample(num_samples=v), ["2", 2.0], [0]),
    ("sample_completions.temperature", "temperature", lambda v: _sample(temperature=v), ["1", None],
     [-1.0, float("nan")]),
    ("sample_completions.top_k", "top_k", lambda v: _sample(top_k=v), ["5", 5.0], [0]),
    # adapters
    ("check_adapter_name", "adapter name", adapter_base.check_adapter_name, [3, None, b"a"], ["", "a.b"]),
    ("LoRALinear.adapter_name", "adapter name", lambda v: adapters.LoRALinear(nn.Linear(4, 4), adapter_name=v),
     [3, None], ["", "x.y"]),
    ("LoRALinear.alpha", "alpha", lambda v: adapters.LoRALinear(nn.Linear(4, 4), alpha=v), ["8", None, True],
     [0, -1.0, float("nan")]),
    ("LoRALinear.dropout", "dropout", lambda v: adapters.LoRALinear(nn.Linear(4, 4), dropout=v), ["0.1", None],
     [1.0, -0.1]),
    ("lora_scaling.alpha", "alpha", lambda v: adapters.lora_scaling(4, v), ["8", None], [float("inf")]),
    ("LoRAConfig.dropout", "dropout", lambda v: adapters.LoRAConfig(dropout=v), ["0.1", None], [1.0]),
    ("LoRAConfig.rank_pattern", "rank_pattern", lambda v: adapters.LoRAConfig(rank_pattern={"q": v}),
     ["4", None, 2.5], [0, -1]),
    ("LoRAConfig.alpha_pattern", "alpha_pattern", lambda v: adapters.LoRAConfig(alpha_pattern={"q": v}),
     ["4", None], [0, float("nan")]),
    ("LoRAConfig.trainable_token_indices", "trainable_token_indices",
     lambda v: adapters.LoRAConfig(trainable_token_indices=[1, v]), ["2", 2.0, None], [-1]),
    ("AdaLoRAConfig.target_r", "target_r", lambda v: adapters.AdaLoRAConfig(target_r=v), ["8", 8.0], [0, 13]),
    ("AdaLoRAConfig.tinit", "tinit", lambda v: adapters.AdaLoRAConfig(tinit=v), ["1", 1.0], [-1]),
    ("AdaLoRAConfig.beta1", "beta1", lambda v: adapters.AdaLoRAConfig(beta1=v), ["0.8", None], [1.0, 0.0]),
    ("AdaLoRALinear.r", "r", lambda v: adapters.AdaLoRALinear(nn.Linear(4, 4), r=v, scaling=1.0), ["4", 4.0],
     [-1]),
    ("BottleneckConfig.reduction_factor", "reduction_factor",
     lambda v: adapters.BottleneckConfig(reduction_factor=v), ["16", None], [0, float("inf")]),
    ("BottleneckConfig.hidden_size", "hidden_size", lambda v: adapters.BottleneckConfig(hidden_size=v),
     ["8", 8.0], [0]),
    ("BottleneckLayer.add_adapter.bottleneck", "bottleneck size",
     lambda v: adapters.BottleneckLayer(nn.Linear(4, 4), 4, v), ["2", 2.0, None], [0]),
    ("ExpertLoRA.ranks", "rank of", lambda v: adapters.ExpertLoRA(make_experts(hidden=8, intermediate=4),
                                                                 {"down_proj": v}), ["2", 2.0], [0]),
    ("ExpertLoRA.alpha", "alpha of", lambda v: adapters.ExpertLoRA(make_experts(hidden=8, intermediate=4),
                                                                  {"down_proj": 2}, alpha=v), ["2", None], [0]),
    ("ExpertLoRA.dropout", "dropout", lambda v: adapters.ExpertLoRA(make_experts(hidden=8, intermediate=4),
                                                                    {"down_proj": 2}, dropout=v), ["0.1", None, True],
     [1.0, -0.1, float("nan")]),
    ("top_heads.fraction", "fraction", lambda v: adapters.top_heads(torch.rand(2, 3), fraction=v), ["0.5", None],
     [0, 1.5]),
    ("select_heads.lr", "lr", lambda v: adapters.select_heads(nn.Linear(4, 4), [], lr=v), ["1e-3", None],
     [0, float("nan")]),
    ("LoKrConfig.decompose_factor", "decompose_factor", lambda v: adapters.LoKrConfig(decompose_factor=v),
     ["2", 2.0], [0, -2]),
    # merging
    ("lora_svd.rank", "rank", lambda v: merging_lora.lora_svd([torch.randn(2, 4)], [torch.randn(4, 2)], v),
     ["2", 2.0, True], [0]),
    ("karcher.max_iter", "max_iter", lambda v: methods.karcher([torch.randn(4), torch.randn(4)], max_iter=v),
     ["10", 10.0], [-1]),
    ("recipe_from_dict.random_seed", "random_seed", lambda v: _recipe(random_seed=v), ["1", 1.5, True]),
    ("recipe_from_dict.weight", "weight", lambda v: _recipe(parameters={"weight": v}), ["1", None],
     [float("nan")]),
    ("recipe_from_dict.max_iter", "max_iter", lambda v: _recipe("karcher", parameters={"max_iter": v}),
     ["3", 3.0], [-1]),
    ("recipe_from_dict.normalize", "normalize", lambda v: _recipe(parameters={"normalize": v}), ["false", 0]),
    ("recipe_from_dict.parameters", "parameters", lambda v: _recipe(parameters=v), [["weight"], "w"]),
    ("recipe_from_dict", "recipe", recipe.recipe_from_dict, [["merge_method"], None]),
    ("recipe_from_dict.models", "models", lambda v: _recipe(models=v), ["a", {"a": 1}]),
    ("recipe_from_dict.models[0]", r"models\[0\]", lambda v: _recipe(models=[v]), [3, None], [{"path": "a"}]),
    ("recipe_from_dict.base_model", "base_model", lambda v: _recipe(base_model=v), [3, ["a"]]),
    ("recipe_from_dict.tol", "tol", lambda v: _recipe("karcher", parameters={"tol": v}), ["0.1", None], [-0.1]),
    # context
    ("rope_inv_freq.dim", "dim", lambda v: rope.rope_inv_freq(v), ["8", 8.0, None], [0, 7]),
    ("rope_inv_freq.base", "base", lambda v: rope.rope_inv_freq(8, v), ["1e4", None], [1.0, float("inf")]),
    ("ntk_inv_freq.factor", "factor", lambda v: rope.ntk_inv_freq(8, 1e4, v), ["2", None], [0.5, float("nan")]),
    ("dynamic_ntk_inv_freq.seq_len", "seq_len", lambda v: rope.dynamic_ntk_inv_freq(8, 1e4, 2.0, v, 16),
     ["32", 32.0], [0]),
    # bench
    ("copy_bandwidth.nbytes", "nbytes", lambda v: roofline.copy_bandwidth("cpu", nbytes=v), ["64", 64.0],
     [0, 6]),
    ("matmul_tflops.n", "n", lambda v: roofline.matmul_tflops("cpu", n=v), ["64", 64.0], [0]),
    ("measure.warmup", "warmup", lambda v: timing.measure(_raise_if_called, warmup=v, device="cpu"), ["1", 1.0],
     [-1]),
    ("measure.rep", "rep", lambda v: timing.measure(_raise_if_called, rep=v, device="cpu"), ["1", 1.0], [0]),
    ("measure.flops", "flops", lambda v: timing.measure(_raise_if_called, flops=v, device="cpu"), ["1e9", True],
     [0, float("nan")]),
    # quant
    ("nf4_quantize.blocksize", "blocksize", lambda v: nf4.nf4_quantize(torch.randn(4, 64), blocksize=v),
     ["64", 64.0, None], [48, 16]),
    ("quantize_model.blocksize", "blocksize", lambda v: quant.quantize_model(nn.Sequential(nn.Linear(64, 64)),
                                                                          blocksize=v), ["64", 64.0, None], [48]),
    ("NF4Tensor.validate.nested_blocksize", "nested_blocksize", _nf4_nested_blocksize, ["4", 4.0, None, True],
     [0, -1]),
    # optim
    ("AdamW8bit.blocksize", "blocksize", lambda v: adamw8bit.AdamW8bit([nn.Parameter(torch.ones(4))], blocksize=v),
     ["256", 256.0], [100]),
    ("AdamW8bit.min_8bit_size", "min_8bit_size",
     lambda v: adamw8bit.AdamW8bit([nn.Parameter(torch.ones(4))], min_8bit_size=v), ["0", 0.0], [-1]),
    ("AdamW8bit.lr", "lr", lambda v: adamw8bit.AdamW8bit([nn.Parameter(torch.ones(4))], lr=v), ["1e-3", None],
     [-1.0, float("nan")]),
    ("AdamW8bit.betas", "betas", lambda v: adamw8bit.AdamW8bit([nn.Parameter(torch.ones(4))], betas=v),
     ["0.9", (0.9, "0.99"), (0.9,)], [(0.9, 1.0), (-0.1, 0.9)]),
    ("AdamW8bit.eps", "eps", lambda v: adamw8bit.AdamW8bit([nn.Parameter(torch.ones(4))], eps=v), ["1e-8", None],
     [-1.0]),
    ("AdamW8bit.weight_decay", "weight_decay", lambda v: adamw8bit.AdamW8bit([nn.Parameter(torch.ones(4))],
                                                                            weight_decay=v), ["0", None], [-0.1]),
    ("dequantize_moments.blocksize", "blocksize",
     lambda v: adamw8bit.dequantize_moments(torch.zeros(2, 4, dtype=torch.uint8), torch.ones(2, 1), blocksize=v),
     ["4", 4.0], [0]),
    # eval, decoding
    ("pass_at_k.k", "k", lambda v: code_eval.pass_at_k(4, 2, v), ["1", 1.0, True, None], [0, -1]),
    ("run_tests.timeout", "timeout", lambda v: code_eval.run_tests(["pass"], "pass", timeout=v), ["1", None],
     [0, float("inf")]),
    ("run_tests.max_memory_bytes", "max_memory_bytes",
     lambda v: code_eval.run_tests(["pass"], "pass", max_memory_bytes=v), ["1", 1e9], [0]),
    ("run_tests.max_workers", "max_workers", lambda v: code_eval.run_tests(["pass"], "pass", max_workers=v),
     ["1", 1.0], [0]),
    ("bootstrap_ci.n_resamples", "n_resamples", lambda v: judge.bootstrap_ci([1.0, 2.0], n_resamples=v),
     ["10", 10.0], [0]),
    ("bootstrap_ci.confidence", "confidence", lambda v: judge.bootstrap_ci([1.0, 2.0], confidence=v),
     ["0.9", None], [1.0, float("nan")]),
    ("negative_log_likelihood.max_length", "max_length", lambda v: _nll(max_length=v), ["8", 8.0], [1]),
    ("negative_log_likelihood.stride", "stride", lambda v: _nll(max_length=8, stride=v), ["4", 4.0], [0, 8]),
    ("best_of_n.n", "n", lambda v: best_of_n(nn.Identity(), torch.ones(1, 2, dtype=torch.long), _raise_if_called,
                                             n=v), ["2", 2.0, None], [0]),
    ("reward_scores.label_index", "label_index",
     lambda v: eval_reward.reward_scores(_raise_if_called, [[1, 2]], label_index=v), ["0", 0.0, True]),
]

WRONG = [(c[0], c[1], c[2], v) for c in CASES for v in c[3]]
OUT_OF_RANGE = [(c[0], c[1], c[2], v) for c in CASES if len(c) > 4 for v in c[4]]


def _shown(value) -> str:
    """A test id for a value: tensors by dtype and shape, not by their (random) values, so that every pytest-xdist
    worker collects the same ids."""
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}:{str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        inner = ", ".join(_shown(v) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    return repr(value)


@pytest.mark.parametrize("name, arg, call, value", WRONG, ids=[f"{w[0]}={_shown(w[3])}" for w in WRONG])
def test_the_wrong_kind_is_a_type_error_that_is_also_a_value_error(name, arg, call, value):
    with pytest.raises(TypeError, match=arg) as info:
        call(value)
    assert isinstance(info.value, alignlab.ArgumentTypeError)
    assert isinstance(info.value, ValueError)  # code written when these raised ValueError still catches it


@pytest.mark.parametrize("name, arg, call, value", OUT_OF_RANGE, ids=[f"{w[0]}={_shown(w[3])}" for w in OUT_OF_RANGE])
def test_a_value_out_of_range_is_a_plain_value_error(name, arg, call, value):
    with pytest.raises(ValueError, match=arg) as info:
        call(value)
    assert not isinstance(info.value, TypeError)


def test_argument_type_error_is_exported_and_both_kinds():
    assert "ArgumentTypeError" in alignlab.__all__ and alignlab.ArgumentTypeError is _checks.ArgumentTypeError
    assert issubclass(alignlab.ArgumentTypeError, TypeError) and issubclass(alignlab.ArgumentTypeError, ValueError)


def test_valid_values_come_back_as_before():
    assert _checks.check_positive_int(np.int64(3), "n") == 3 and _checks.check_positive_int(None, "n", True) is None
    assert type(_checks.check_positive_number(np.float32(2), "x")) is float
    assert _checks.check_positive_number(2, "x") == 2 and type(_checks.check_positive_number(2, "x")) is int
