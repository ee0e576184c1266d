import warnings

import pytest
import torch
from conftest import make_tiny_llama

from alignlab.decoding import CompanionLM
from alignlab.hf_cache import cache_keyword

PAD = 0


def _no_eos(model):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def _prompts():
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 64, (n,), generator=g) for n in (5, 2, 4)]
    ids = torch.full((3, 5), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 5 - len(r):] = r
    return ids, (ids != PAD).long()


def _oracle_last_logits(model, input_ids):
    """Unbatched, unpadded, uncached forward per row."""
    out = []
    with torch.no_grad():
        for row in input_ids:
            start = int((row != PAD).nonzero()[0])
            out.append(model(input_ids=row[start:][None]).logits[0, -1])
    return torch.stack(out)


class _Recorder:
    def __init__(self, companion, oracle_model):
        self.companion, self.oracle_model, self.checked, self.steps = companion, oracle_model, 0, 0

    def __call__(self, input_ids, scores):
        got = self.companion(input_ids)
        torch.testing.assert_close(got, _oracle_last_logits(self.oracle_model, input_ids), rtol=1e-4, atol=1e-4)
        self.checked += 1
        return scores


@pytest.mark.parametrize("num_beams", [1, 2])
def test_cached_logits_match_uncached_oracle_during_generate(num_beams):
    main = _no_eos(make_tiny_llama(seed=0, vocab_size=64))
    other = make_tiny_llama(seed=1, vocab_size=64, num_layers=1)
    ids, mask = _prompts()
    rec = _Recorder(CompanionLM(other, pad_token_id=PAD), other)
    widths = []
    hook = other.model.embed_tokens.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    out = main.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, num_beams=num_beams,
                        logits_processor=[rec])
    assert out.shape == (3, 9)
    hook.remove()
    assert rec.checked == 4
    companion_widths = widths[0::4]  # each step: one companion pass, then three oracle passes (one per row)
    if num_beams == 1:  # one full prompt pass, then one token per step
        assert companion_widths == [5, 1, 1, 1]
    # a second generate call starts from a fresh prefix: the cache must not leak across calls
    main.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=2, do_sample=False, logits_processor=[rec])
    assert rec.checked == 6


def test_errors():
    with pytest.raises(TypeError, match="model"):
        CompanionLM(lambda x: x)
    with pytest.raises(ValueError, match="input_ids"):
        CompanionLM(make_tiny_llama(num_layers=1))(torch.ones(3, dtype=torch.long))


class _OldKeywordLM(torch.nn.Module):
    """A model that only knows the pre-rename keyword (`past_key_values`), as transformers 4.x models do."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        self.seen.append(past_key_values is not None)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache, **{cache_keyword(self.inner): past_key_values})


def test_cache_is_passed_under_the_keyword_the_model_declares(recwarn):
    """Incremental steps reuse the cache under `cache` or `past_key_values`, whichever forward declares."""
    inner = make_tiny_llama(seed=1, vocab_size=64, num_layers=1)
    ids = torch.cat([_prompts()[0], torch.randint(3, 64, (3, 2), generator=torch.Generator().manual_seed(1))], 1)
    for model in (inner, _OldKeywordLM(inner)):
        companion = CompanionLM(model, pad_token_id=PAD)
        for width in range(5, 8):  # the prompts, then one token at a time
            torch.testing.assert_close(companion(ids[:, :width]), _oracle_last_logits(inner, ids[:, :width]),
                                       rtol=1e-4, atol=1e-4)
    assert model.seen == [False, True, True]
    assert not [w for w in recwarn if "past_key_values" in str(w.message)], "a deprecated keyword was used"


@pytest.mark.parametrize("flag", ["no", 0, None])
def test_use_cache_must_be_a_bool(flag):
    """use_cache="no" was truthy and kept the cache on."""
    with pytest.raises(TypeError, match="use_cache must be a bool"):
        CompanionLM(torch.nn.Linear(2, 2), use_cache=flag)


@pytest.mark.parametrize("pad", [1.5, True, -1, "0"])
def test_pad_token_id_must_be_a_non_negative_int(pad):
    """pad_token_id=1.5 matched no token, so the left padding was attended without a word."""
    with pytest.raises(ValueError, match="pad_token_id: expected None or a non-negative int"):
        CompanionLM(torch.nn.Linear(2, 2), pad_token_id=pad)


def test_numpy_pad_token_id_masks_like_an_int():
    np = pytest.importorskip("numpy")
    model = make_tiny_llama(seed=2, vocab_size=64, num_layers=1)
    ids = torch.tensor([[PAD, PAD, 5, 6], [7, 8, 9, 10]])
    want = CompanionLM(model, pad_token_id=PAD, use_cache=False)(ids)
    torch.testing.assert_close(CompanionLM(model, pad_token_id=np.int64(PAD), use_cache=False)(ids), want)


def test_a_companion_in_train_mode_runs_without_dropout_and_keeps_its_mode():
    """A companion still in train mode (a small expert just fine-tuned, for proxy-tuning) ran its dropout at every
    step: the steering logits were noisy and two identical calls disagreed. perplexity and reward_scores run the
    model in eval mode; so does CompanionLM now, per call, and the model's own mode is left as it was."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    model = transformers.GPT2LMHeadModel(config).train()
    ids = torch.randint(1, 64, (2, 6))
    companion = CompanionLM(model, use_cache=False)
    first, second = companion(ids), companion(ids)
    assert torch.equal(first, second)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits[:, -1]
    model.train()
    torch.testing.assert_close(first, expected)
    companion(ids)
    assert model.training and all(m.training for m in model.modules())


def test_a_companion_sharded_across_ranks_is_warned_about(monkeypatch):
    """generate(...) on several ranks stops calling logits processors on a rank whose rows have all finished
    (synced_gpus keeps only the generating model running there). A companion sharded by FSDP2 then all-gathers
    on the other ranks alone: they waited until the process group's timeout (seen at world size 2 with gloo:
    'Timed out waiting 20000ms'). Said when the companion is made; a replicated one, or one process, is fine."""
    import torch.distributed as dist

    from alignlab.distributed import shard_model

    if not dist.is_available() or dist.is_initialized():  # pragma: no cover
        pytest.skip("needs torch.distributed and no process group in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sharded = shard_model(make_tiny_llama(seed=1, vocab_size=64, num_layers=1))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            CompanionLM(sharded)  # one process: nothing to wait for
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        with pytest.warns(RuntimeWarning, match="amateur.*sharded.*2 ranks.*eos_token_id=None"):
            CompanionLM(sharded, name="amateur")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            CompanionLM(make_tiny_llama(seed=1, vocab_size=64, num_layers=1))  # replicated: no collectives
    finally:
        dist.destroy_process_group()


class _NoCacheLM(torch.nn.Module):
    """A causal LM that takes and returns no KV cache (extra keywords ignored); each position's logits depend
    on the whole prefix (running sum of the ids)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.out = torch.nn.Linear(8, 10)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.out(self.emb(input_ids.cumsum(1) % 50)))


def test_a_model_that_returns_no_cache_is_recomputed_not_fed_one_token():
    """With use_cache=True the companion fed only the newest token at the next step whatever the model had
    returned; a model without a KV cache then saw one token, not the prefix, and gave wrong logits silently."""
    torch.manual_seed(0)
    model = _NoCacheLM()
    companion = CompanionLM(model)
    ids = torch.tensor([[3, 4, 5], [7, 1, 2]])
    for step in range(3):
        got = companion(ids)
        torch.testing.assert_close(got, model(ids).logits[:, -1])
        ids = torch.cat([ids, got.argmax(-1, keepdim=True)], 1)


def test_a_mamba_companion_matches_the_uncached_oracle():
    """Mamba and FalconMamba multiply their hidden states by the attention mask: the prefix's mask beside the one
    new token of a cached step was broadcast over the whole sequence, and every step after the prompt gave wrong
    logits (off by ~0.7) without a word. The companion now sees it and runs such a model on the whole prefix."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8)
    model = transformers.MambaForCausalLM(config).eval()
    ids = torch.cat([_prompts()[0], torch.randint(3, 64, (3, 3), generator=torch.Generator().manual_seed(1))], 1)
    companion = CompanionLM(model, pad_token_id=PAD)
    for width in range(5, 9):  # the prompts, then one token at a time
        torch.testing.assert_close(companion(ids[:, :width]), _oracle_last_logits(model, ids[:, :width]),
                                   rtol=1e-4, atol=1e-4)
