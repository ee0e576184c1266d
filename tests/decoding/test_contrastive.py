import math

import pytest
import torch
from conftest import make_tiny_llama

from alignlab.decoding import ContrastiveDecodingLogitsProcessor, contrastive_logits

PAD = 0


def _cd_oracle(expert_logits, amateur_logits, alpha, tau=1.0):
    """The paper's definition, in probability space and float64."""
    p_e = torch.softmax(expert_logits.double(), -1)
    p_a = torch.softmax(amateur_logits.double() / tau, -1)
    head = p_e >= alpha * p_e.max(-1, keepdim=True).values
    return torch.where(head, p_e.log() - p_a.log(), torch.tensor(-math.inf, dtype=torch.float64))


def test_hand_built_logits():
    e = torch.tensor([[2.0, 1.0, 0.0, -3.0], [0.0, 0.0, 0.0, 0.0]])
    a = torch.tensor([[3.0, 0.0, 0.0, -1.0], [1.0, 2.0, 3.0, 4.0]])
    out = contrastive_logits(e, a, alpha=0.1)
    # row 0: p_e ~ [.66, .24, .09, .003]; .09 < .066? no -> token 2 stays, token 3 is cut
    assert torch.isinf(out[0, 3]) and torch.isfinite(out[0, :3]).all()
    torch.testing.assert_close(out.double(), _cd_oracle(e, a, 0.1))
    # the amateur's confidence in token 0 makes token 1 the contrastive choice
    assert out[0].argmax() == 1 and e[0].argmax() == 0
    # uniform expert: everything plausible, the amateur's least likely token wins
    assert out[1].argmax() == 0
    # alpha = 1 keeps only the expert's argmax
    assert torch.isfinite(contrastive_logits(e[:1], a[:1], alpha=1.0)).sum() == 1
    torch.testing.assert_close(contrastive_logits(e, a, alpha=0.3, amateur_temperature=0.5).double(),
                               _cd_oracle(e, a, 0.3, 0.5))


def test_invariant_to_per_row_logit_shifts_and_vocab_padding():
    g = torch.Generator().manual_seed(0)
    e, a = torch.randn(3, 11, generator=g), torch.randn(3, 11, generator=g)
    base = contrastive_logits(e, a)
    torch.testing.assert_close(contrastive_logits(e + 5.0, a - 2.0), base)
    # an amateur with a padded vocabulary: the common ids agree with the oracle on the amateur cut back
    a_pad = torch.cat([a, torch.full((3, 5), -30.0)], -1)
    out = contrastive_logits(e, a_pad)
    assert out.shape == (3, 11)
    torch.testing.assert_close(out.double(), _cd_oracle(e, a, 0.1), rtol=1e-5, atol=1e-5)


def test_errors():
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="alpha"):
        contrastive_logits(x, x, alpha=0.0)
    with pytest.raises(ValueError, match="amateur_temperature"):
        contrastive_logits(x, x, amateur_temperature=0)
    with pytest.raises(ValueError, match="leading shapes"):
        contrastive_logits(x, torch.zeros(3, 4))


def _greedy_oracle(expert, amateur, prompt, steps, alpha):
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(steps):
            e = expert(input_ids=ids[None]).logits[0, -1]
            a = amateur(input_ids=ids[None]).logits[0, -1]
            ids = torch.cat([ids, _cd_oracle(e, a, alpha).argmax()[None]])
    return ids


def test_generate_matches_greedy_oracle_with_left_padded_batch():
    expert = make_tiny_llama(seed=0, vocab_size=64)
    expert.generation_config.eos_token_id = None
    with torch.no_grad():  # a peaked expert, so the plausibility constraint cuts tokens during generation
        expert.lm_head.weight.mul_(6.0)
    amateur = make_tiny_llama(seed=3, vocab_size=64, num_layers=1)
    prompts = [torch.tensor([5, 9, 17, 33]), torch.tensor([40, 8])]
    ids = torch.tensor([[5, 9, 17, 33], [PAD, PAD, 40, 8]])
    proc = ContrastiveDecodingLogitsProcessor(amateur, alpha=0.1, pad_token_id=PAD)
    out = expert.generate(ids, attention_mask=(ids != PAD).long(), max_new_tokens=6, do_sample=False,
                          pad_token_id=PAD, logits_processor=[proc])
    for row, prompt in zip(out, prompts):
        expected = _greedy_oracle(expert, amateur, prompt, 6, 0.1)
        assert row[-len(expected):].tolist() == expected.tolist()
    plain = expert.generate(ids, attention_mask=(ids != PAD).long(), max_new_tokens=6, do_sample=False,
                            pad_token_id=PAD)
    assert not torch.equal(plain, out)  # the processor really changed the decoding
    res = expert.generate(ids, attention_mask=(ids != PAD).long(), max_new_tokens=3, do_sample=False,
                          pad_token_id=PAD, logits_processor=[proc], output_scores=True, return_dict_in_generate=True)
    assert res.sequences.shape == (2, 7) and len(res.scores) == 3
    assert all(s.shape == (2, 64) for s in res.scores)
    assert all(torch.isinf(s).any(-1).all() for s in res.scores)  # implausible tokens were cut


def test_prompt_id_beyond_a_smaller_amateur_vocabulary_is_our_value_error():
    expert = make_tiny_llama(seed=0, vocab_size=64)
    expert.generation_config.eos_token_id = None
    amateur = make_tiny_llama(seed=3, vocab_size=48, num_layers=1)  # padded to fewer ids than the expert
    proc = ContrastiveDecodingLogitsProcessor(amateur, alpha=0.1)
    assert proc.amateur_vocab == 48
    with pytest.raises(ValueError, match="id 50 is beyond the amateur's vocabulary \\(48 ids\\)"):
        expert.generate(torch.tensor([[5, 50, 7]]), max_new_tokens=2, do_sample=False, pad_token_id=PAD,
                        logits_processor=[proc])
    # ids within the shared vocabulary decode; the expert's extra ids are never proposed
    out = expert.generate(torch.tensor([[5, 9, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=PAD,
                          logits_processor=[proc])
    assert int(out.max()) < 48


def test_alpha_and_temperature_types_are_checked():
    np = pytest.importorskip("numpy")
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    y = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    # a bool is not a threshold (True would silently mean alpha = 1); strings and None are not numbers
    for bad in (True, "0.1", None, torch.tensor(0.1)):
        with pytest.raises(TypeError, match="alpha: expected a real number"):
            contrastive_logits(x, y, alpha=bad)
    for bad in (True, "1", None):
        with pytest.raises(TypeError, match="amateur_temperature: expected a real number"):
            contrastive_logits(x, y, amateur_temperature=bad)
    # NumPy scalars are real numbers
    torch.testing.assert_close(contrastive_logits(x, y, alpha=np.float32(0.25), amateur_temperature=np.float32(0.5)),
                               contrastive_logits(x, y, alpha=0.25, amateur_temperature=0.5))


def test_sampling_warpers_act_on_the_contrastive_scores_not_before_them():
    """The docs said generate's temperature / top-k ran before custom processors, so that with sampling the
    expert logits arrived already warped. transformers runs its sampling warpers after the custom processors:
    the processor sees the raw expert logits, and temperature then divides the contrastive scores."""
    expert = make_tiny_llama(seed=0, vocab_size=64)
    amateur = make_tiny_llama(seed=3, vocab_size=64, num_layers=1)
    ids = torch.tensor([[5, 9, 7]])
    proc = ContrastiveDecodingLogitsProcessor(amateur, alpha=0.1)
    out = expert.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.7, top_k=0,
                          max_new_tokens=1, pad_token_id=PAD, eos_token_id=None, logits_processor=[proc],
                          output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        want = contrastive_logits(expert(ids).logits[:, -1], amateur(ids).logits[:, -1], alpha=0.1) / 0.7
    torch.testing.assert_close(out.scores[0], want)


@pytest.mark.parametrize("bad", [[[0.0, 1.0]], torch.tensor([[0, 1]])])
def test_logits_that_are_not_float_tensors_are_named(bad):
    """Plain lists failed with AttributeError ('list' object has no attribute 'shape')."""
    with pytest.raises(TypeError, match="amateur_logits: expected a floating-point tensor"):
        contrastive_logits(torch.zeros(1, 2), bad)
