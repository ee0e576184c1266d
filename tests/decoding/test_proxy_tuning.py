import pytest
import torch
from conftest import make_tiny_llama

from alignlab.decoding import ProxyTuningLogitsProcessor, proxy_tuning_logits


def test_distribution_is_base_times_expert_ratio_to_the_alpha():
    g = torch.Generator().manual_seed(0)
    base, exp, anti = (torch.randn(4, 9, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    for alpha in (0.0, 0.5, 1.0, 2.0):
        p = torch.softmax(proxy_tuning_logits(base, exp, anti, alpha=alpha).double(), -1)
        unnorm = torch.softmax(base, -1) * (torch.softmax(exp, -1) / torch.softmax(anti, -1)) ** alpha
        torch.testing.assert_close(p, unnorm / unnorm.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_hand_built_values_and_vocab_padding():
    base = torch.tensor([[0.0, 0.0, 0.0]])
    exp = torch.tensor([[2.0, 0.0, 0.0]])
    anti = torch.tensor([[0.0, 0.0, 0.0]])
    out = proxy_tuning_logits(base, exp, anti)
    # log(1/3) + (log softmax(exp) - log(1/3)) = log softmax(exp)
    torch.testing.assert_close(out, torch.log_softmax(exp, -1))
    # a base model with a padded vocabulary keeps its width; the extra ids get -inf
    wide = torch.cat([base, torch.zeros(1, 2)], -1)
    out = proxy_tuning_logits(wide, exp, anti)
    assert out.shape == (1, 5) and torch.isinf(out[0, 3:]).all()
    with pytest.raises(ValueError, match="leading shapes"):
        proxy_tuning_logits(base, exp, torch.zeros(2, 3))


def test_generate_identity_when_expert_equals_antiexpert_and_oracle_otherwise():
    base = make_tiny_llama(seed=0, vocab_size=64)
    base.generation_config.eos_token_id = None
    small_a = make_tiny_llama(seed=1, vocab_size=64, num_layers=1)
    small_b = make_tiny_llama(seed=2, vocab_size=64, num_layers=1)
    ids = torch.tensor([[3, 14, 15, 9, 26]])
    plain = base.generate(ids, max_new_tokens=6, do_sample=False)
    same = base.generate(ids, max_new_tokens=6, do_sample=False,
                         logits_processor=[ProxyTuningLogitsProcessor(small_a, small_a)])
    assert torch.equal(plain, same)

    out = base.generate(ids, max_new_tokens=6, do_sample=False,
                        logits_processor=[ProxyTuningLogitsProcessor(small_b, small_a, alpha=1.0)])
    seq = ids[0]
    with torch.no_grad():
        for _ in range(6):
            p = [torch.softmax(m(input_ids=seq[None]).logits[0, -1].double(), -1) for m in (base, small_b, small_a)]
            seq = torch.cat([seq, (p[0] * p[1] / p[2]).argmax()[None]])
    assert out[0].tolist() == seq.tolist()
    assert not torch.equal(out, plain)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_alpha_is_rejected(alpha):
    x = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="alpha: expected a finite steering strength"):
        proxy_tuning_logits(x, x, x, alpha=alpha)
    small = make_tiny_llama(seed=1, vocab_size=64, num_layers=1)
    with pytest.raises(ValueError, match="alpha"):
        ProxyTuningLogitsProcessor(small, small, alpha=alpha)


def test_alpha_must_be_a_real_number():
    x = torch.zeros(2, 5)
    for bad in ("1", None, True, torch.tensor(1.0)):
        with pytest.raises(TypeError, match="alpha: expected a real number"):
            proxy_tuning_logits(x, x, x, alpha=bad)


def test_numpy_scalar_alpha_is_a_real_number():
    # a sweep such as `for alpha in np.linspace(0, 2, 5)` hands over NumPy scalars; float32 is not a
    # Python float subclass but is a real number, and must give the float's result
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    base, exp, anti = (torch.randn(2, 7, generator=g) for _ in range(3))
    for alpha in (np.float32(0.5), np.float64(0.5), np.float16(0.5)):
        torch.testing.assert_close(proxy_tuning_logits(base, exp, anti, alpha=alpha),
                                   proxy_tuning_logits(base, exp, anti, alpha=0.5))
    torch.testing.assert_close(proxy_tuning_logits(base, exp, anti, alpha=np.int64(2)),
                               proxy_tuning_logits(base, exp, anti, alpha=2.0))
    with pytest.raises(ValueError, match="alpha: expected a finite steering strength"):
        proxy_tuning_logits(base, exp, anti, alpha=np.float32("nan"))


@pytest.mark.parametrize("small_vocab", [48, 56])
def test_prompt_id_beyond_a_smaller_expert_vocabulary_is_our_value_error(small_vocab):
    """A prompt id that the (padded-to-fewer-ids) expert or anti-expert cannot embed raised a bare
    IndexError from inside its embedding (a device assert on CUDA); contrastive decoding's amateur
    already had this check."""
    base = make_tiny_llama(seed=0, vocab_size=64)
    base.generation_config.eos_token_id = None
    expert = make_tiny_llama(seed=1, vocab_size=small_vocab, num_layers=1)
    antiexpert = make_tiny_llama(seed=2, vocab_size=48 + 56 - small_vocab, num_layers=1)
    proc = ProxyTuningLogitsProcessor(expert, antiexpert)
    with pytest.raises(ValueError, match=r"id 50 is beyond the (anti)?expert's vocabulary \(48 ids\)"):
        base.generate(torch.tensor([[5, 50, 7]]), max_new_tokens=2, do_sample=False, pad_token_id=0,
                      logits_processor=[proc])
    # ids the three models share decode; ids only the base has are never proposed
    out = base.generate(torch.tensor([[5, 9, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0,
                        logits_processor=[proc])
    assert int(out[:, 3:].max()) < 48


def test_tokens_ruled_out_stay_out_and_never_become_nan():
    """A token banned in the base (-inf) that both small models also rule out gave -inf - -inf = NaN, which greedy
    argmax picks: the banned token was generated. A base -inf stays -inf; both small models at -inf steer by 0;
    alpha = 0 is the base alone even where the steering is infinite (0 · inf was NaN)."""
    inf = float("inf")
    base = torch.tensor([[0.0, 1.0, -inf, 0.5]])
    expert = torch.tensor([[0.0, 0.0, -inf, -inf]])
    anti = torch.tensor([[0.0, 0.0, -inf, 0.0]])
    for alpha in (1.0, -0.5, 0.0):
        got = proxy_tuning_logits(base, expert, anti, alpha=alpha)
        assert not torch.isnan(got).any()
        assert got[0, 2] == -inf and int(got.argmax()) != 2
    got = proxy_tuning_logits(base, expert, anti, alpha=1.0)
    want = torch.log_softmax(base, -1) + (torch.log_softmax(expert, -1) - torch.log_softmax(anti, -1))
    torch.testing.assert_close(got[0, :2], want[0, :2])
    assert got[0, 3] == -inf  # the expert rules it out: -inf, as the formula says
    torch.testing.assert_close(proxy_tuning_logits(base, expert, anti, alpha=0.0), torch.log_softmax(base, -1))


@pytest.mark.parametrize("bad", [[[0.0, 1.0]], torch.tensor([[0, 1]]), torch.tensor(1.0)])
def test_logits_that_are_not_float_tensors_are_named(bad):
    ok = torch.zeros(1, 2)
    with pytest.raises(TypeError, match="expert_logits: expected a floating-point tensor"):
        proxy_tuning_logits(ok, bad, ok)
