"""Token-sparse fine-tuning: exact gradients for kept tokens, activation memory falls with the keep ratio."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from alignlab.context.token_sparse import (
    TokenSparse,
    apply_token_sparsity,
    attention_information_scores,
    select_tokens,
    set_token_mask,
    token_sparse_apply,
)


def saved_bytes(run):
    """Bytes of distinct non-parameter tensors autograd saves while ``run()`` builds its graph."""
    seen, total = set(), [0]

    def pack(t):
        if not isinstance(t, nn.Parameter):
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key not in seen:
                seen.add(key)
                total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return total[0], out


class GatedMLP(nn.Module):
    def __init__(self, h=16, inter=48, dtype=torch.float64):
        super().__init__()
        self.up = nn.Linear(h, inter, dtype=dtype)
        self.gate = nn.Linear(h, inter, dtype=dtype)
        self.down = nn.Linear(inter, h, dtype=dtype)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def test_select_tokens_matches_bruteforce():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (4, 9), generator=g).float()  # many ties
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, 6:] = False
    mask[3, :] = False  # empty row
    for ratio in (0.1, 0.34, 0.5, 1.0):
        keep = select_tokens(scores, ratio, mask)
        for b in range(4):
            valid = [j for j in range(9) if mask[b, j]]
            k = math.ceil(len(valid) * ratio)
            expected = sorted(valid, key=lambda j: (-scores[b, j].item(), j))[:k]
            assert sorted(keep[b].nonzero().flatten().tolist()) == sorted(expected)


def test_kept_token_gradients_exact_float64():
    torch.manual_seed(0)
    mlp = GatedMLP()
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    keep = select_tokens(torch.randn(3, 7), 0.4)
    upstream = torch.randn(3, 7, 16, dtype=torch.float64)

    y = token_sparse_apply(mlp, x, keep)
    (y * upstream).sum().backward()
    ours = [p.grad.clone() for p in mlp.parameters()] + [x.grad.clone()]

    # oracle: dense graph, upstream gradient zeroed on dropped tokens
    mlp.zero_grad()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = mlp(x2)
    torch.testing.assert_close(y, y2)  # forward values unchanged
    (y2 * upstream * keep[..., None]).sum().backward()
    ref = [p.grad for p in mlp.parameters()] + [x2.grad]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.all(ours[-1][~keep] == 0)


def test_gradcheck_through_kept_tokens():
    torch.manual_seed(1)
    mlp = GatedMLP(h=4, inter=6)
    keep = torch.tensor([[True, False, True], [False, False, True]])
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: token_sparse_apply(mlp, t, keep)[keep], (x,))


@pytest.mark.parametrize("case", ["none_kept", "all_kept"])
def test_edge_keep_sets(case):
    torch.manual_seed(0)
    mlp = GatedMLP(h=4, inter=6)
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    keep = torch.zeros(2, 5, dtype=torch.bool) if case == "none_kept" else torch.ones(2, 5, dtype=torch.bool)
    y = token_sparse_apply(mlp, x, keep)
    torch.testing.assert_close(y, mlp(x))
    y.sum().backward()
    nonzero = x.grad.abs().sum() > 0
    assert bool(nonzero) == (case == "all_kept")
    assert all(bool(p.grad.abs().sum() > 0) == (case == "all_kept") for p in mlp.parameters())


def test_saved_activation_bytes_fall_with_keep_ratio():
    torch.manual_seed(0)
    mlp = GatedMLP(h=32, inter=128, dtype=torch.float32)
    x = torch.randn(2, 256, 32, requires_grad=True)
    scores = torch.randn(2, 256)
    sizes = {}
    for ratio in (1.0, 0.5, 0.25, 0.125):
        keep = select_tokens(scores, ratio)
        sizes[ratio], y = saved_bytes(lambda: token_sparse_apply(mlp, x, keep))
        y.sum().backward()
    dense, _ = saved_bytes(lambda: mlp(x))
    assert sizes[1.0] <= dense * 1.05  # only index tensors on top of the dense graph
    assert sizes[1.0] > sizes[0.5] > sizes[0.25] > sizes[0.125]
    for ratio in (0.5, 0.25, 0.125):
        # activations scale with the number of kept tokens, plus a small fixed index overhead
        assert sizes[ratio] <= (ratio + 0.05) * sizes[1.0], (ratio, sizes)


def test_attention_information_scores_oracle():
    torch.manual_seed(0)
    b, h, n = 2, 3, 5
    logits = torch.randn(b, h, n, n)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, -math.inf).softmax(-1)
    scores = attention_information_scores(probs)
    for bi in range(b):
        for j in range(n):
            readers = list(range(j, n))
            expected = sum(probs[bi, hh, i, j].item() for hh in range(h) for i in readers) / (h * len(readers))
            assert scores[bi, j].item() == pytest.approx(expected, rel=1e-5)
    am = torch.ones(b, n, dtype=torch.long)
    am[0, :2] = 0  # left padding
    s2 = attention_information_scores(probs, am)
    assert torch.isinf(s2[0, :2]).all() and torch.isfinite(s2[1]).all()
    keep = select_tokens(s2, 0.5, am)
    assert not keep[0, :2].any()


def test_tiny_llama_mlps_sparse_same_forward_less_memory():
    from conftest import make_tiny_llama

    dense = make_tiny_llama(seed=0, vocab_size=64, hidden_size=32, num_layers=2).train()
    sparse = make_tiny_llama(seed=0, vocab_size=64, hidden_size=32, num_layers=2).train()
    names = apply_token_sparsity(sparse, keep_ratio=0.25)
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert isinstance(sparse.model.layers[0].mlp, TokenSparse)
    ids = torch.randint(0, 64, (2, 96), generator=torch.Generator().manual_seed(0))
    b_dense, out_dense = saved_bytes(lambda: dense(ids, labels=ids))
    b_sparse, out_sparse = saved_bytes(lambda: sparse(ids, labels=ids))
    torch.testing.assert_close(out_sparse.logits, out_dense.logits)
    assert b_sparse < 0.85 * b_dense, (b_sparse, b_dense)
    out_sparse.loss.backward()
    assert all(p.grad is not None for p in sparse.parameters() if p.requires_grad)
    sparse.eval()  # eval mode: the wrappers are the plain modules
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, dense.eval()(ids).logits)


def test_errors():
    with pytest.raises(ValueError, match="keep_ratio"):
        select_tokens(torch.zeros(1, 3), 0.0)
    with pytest.raises(ValueError, match="scores"):
        select_tokens(torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="keep"):
        token_sparse_apply(nn.Identity(), torch.zeros(1, 3, 2), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="hidden"):
        token_sparse_apply(nn.Identity(), torch.zeros(3, 2), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep_ratio"):
        TokenSparse(nn.Identity(), 1.5)
    with pytest.raises(ValueError, match="no submodule"):
        apply_token_sparsity(nn.Sequential(nn.Linear(2, 2)), 0.5)


def test_bf16_and_empty_batch():
    torch.manual_seed(0)
    mlp = GatedMLP(h=16, inter=32, dtype=torch.bfloat16)
    x = torch.randn(2, 9, 16, dtype=torch.bfloat16, requires_grad=True)
    keep = select_tokens(torch.randn(2, 9), 0.5)
    y = token_sparse_apply(mlp, x, keep)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, mlp(x))  # default bf16 tolerances
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.all(x.grad[~keep] == 0) and x.grad[keep].abs().sum() > 0
    empty = torch.zeros(0, 4, 16, dtype=torch.bfloat16)
    out = token_sparse_apply(mlp, empty, torch.zeros(0, 4, dtype=torch.bool))
    assert out.shape == (0, 4, 16)
    assert select_tokens(torch.zeros(0, 4), 0.5).shape == (0, 4)


def test_explicit_keep_mask_is_used():
    from conftest import make_tiny_llama

    model = make_tiny_llama(seed=0, vocab_size=64, hidden_size=32, num_layers=2).train()
    apply_token_sparsity(model, keep_ratio=0.5)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    model.model.layers[0].mlp.keep = torch.zeros(2, 12, dtype=torch.bool)  # layer 0 trains on no token
    model.model.layers[1].mlp.keep = torch.ones(2, 12, dtype=torch.bool)  # layer 1 on all
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.model.layers[0].mlp.parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.model.layers[1].mlp.parameters())


def test_keep_ratio_numpy_scalar_matches_python_float():
    np = pytest.importorskip("numpy")
    scores = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    for ratio in np.linspace(0.1, 1.0, 4, dtype=np.float32):
        assert torch.equal(select_tokens(scores, ratio), select_tokens(scores, float(ratio)))
    assert TokenSparse(nn.Identity(), np.float32(0.5)).keep_ratio == 0.5
    for bad in (True, float("nan")):
        with pytest.raises(ValueError, match="keep_ratio"):
            select_tokens(scores, bad)
        with pytest.raises(ValueError, match="keep_ratio"):
            TokenSparse(nn.Identity(), bad)


def test_attention_mask_keeps_padding_out_of_the_default_selection():
    """With set_token_mask, the default scorer never keeps padding (even padding with the largest norms) and
    keeps ceil(rho * n_b) of each row's real tokens; cleared with None, padding competes again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, dtype=torch.float64))
    apply_token_sparsity(model, keep_ratio=0.5, targets=("0",))
    lengths = [5, 3]
    mask = torch.zeros(2, 6, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    h = torch.randn(2, 6, 8, dtype=torch.float64)
    h[mask == 0] *= 100.0  # padding with the largest hidden-state norms

    def kept_rows():
        x = h.clone().requires_grad_(True)
        model(x).sum().backward()
        return x.grad.abs().sum(-1) > 0  # no residual: gradient reaches exactly the kept tokens

    assert set_token_mask(model, mask) == 1
    kept = kept_rows()
    assert not kept[mask == 0].any()
    assert [int(kept[i].sum()) for i in range(2)] == [math.ceil(0.5 * n) for n in lengths]
    set_token_mask(model, None)
    assert kept_rows()[mask == 0].any()
    with pytest.raises(TypeError, match="attention_mask"):
        set_token_mask(model, [1, 0])


def test_attention_information_scores_with_padding_count_only_real_readers():
    """With an attention mask the normaliser counted only the real queries, but the sum took every query row,
    padded ones included: a left-padded row's padding queries (whose probabilities are whatever the model
    writes there, e.g. uniform over all keys) added mass to every real key, most to the late keys with few
    readers, and changed the selection. The sum is over the same readers as the normaliser."""
    torch.manual_seed(0)
    b, h, n, pad = 2, 3, 6, 3
    am = torch.ones(b, n, dtype=torch.long)
    am[0, :pad] = 0  # left padding
    allowed = torch.ones(n, n, dtype=torch.bool).tril() & am[:, None, :].bool()  # (b, q, k)
    probs = torch.randn(b, h, n, n).masked_fill(~allowed[:, None], -math.inf).softmax(-1)
    probs = torch.nan_to_num(probs, nan=0.0)
    probs[0, :, :pad] = 1.0 / n  # padded query rows: uniform over all keys, as an eager HF forward gives
    scores = attention_information_scores(probs, am)
    for bi in range(b):
        real = [i for i in range(n) if am[bi, i]]
        for j in real:
            readers = [i for i in real if i >= j]
            expected = sum(probs[bi, hh, i, j].item() for hh in range(h) for i in readers) / (h * len(readers))
            assert scores[bi, j].item() == pytest.approx(expected, rel=1e-5)
    # a generation step (q_len < k_len) with left padding reads the same way
    last = attention_information_scores(probs[:, :, -2:], am)
    for bi in range(b):
        for j in range(n):
            if am[bi, j]:
                readers = [i for i in (n - 2, n - 1) if i >= j]
                expected = sum(probs[bi, hh, i, j].item() for hh in range(h) for i in readers)
                expected = expected / (h * len(readers)) if readers else 0.0
                assert last[bi, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_keep_ratio_set_between_steps_is_checked():
    """The docs say to set keep_ratio on the wrappers between steps; a 1.5 set there was taken as 'dense'
    (the >= 1 shortcut) without a word. It is checked as the constructor checks it."""
    m = TokenSparse(torch.nn.Linear(4, 4), 0.5)
    for bad in (1.5, 0.0, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="keep_ratio"):
            m.keep_ratio = bad
    assert m.keep_ratio == 0.5
    m.keep_ratio = np.float32(0.25)
    assert m.keep_ratio == 0.25 and type(m.keep_ratio) is float


def test_apply_token_sparsity_takes_one_target_name_as_a_string():
    """targets='mlp' was read as its characters ('m', 'l', 'p'): it matched no 'mlp' (and would wrap a
    module named 'm')."""
    net = nn.Sequential()
    net.add_module("mlp", nn.Linear(4, 4))
    net.add_module("m", nn.Linear(4, 4))
    assert apply_token_sparsity(net, 0.5, targets="mlp") == ["mlp"]
    assert isinstance(net.mlp, TokenSparse) and not isinstance(net.m, TokenSparse)
    with pytest.raises(TypeError, match="targets"):
        apply_token_sparsity(net, 0.5, targets=[nn.Linear])


def test_nan_score_is_refused_unless_on_padding():
    """argsort puts NaN above +inf, so a NaN-scored token (a diverged scorer) was the first one kept."""
    scores = torch.tensor([[0.1, math.nan, 0.3, 0.2]])
    with pytest.raises(ValueError, match=r"scores must not be NaN on a valid token \(1 found\)"):
        select_tokens(scores, 0.25)
    mask = torch.tensor([[1, 0, 1, 1]])
    assert select_tokens(scores, 0.34, mask).tolist() == [[False, False, True, True]]  # padding: never kept anyway


class _NeedsSequences(nn.Module):
    """A token-wise block that, like transformers' MoE blocks, unpacks ``(batch, seq, hidden)`` from its input."""

    def __init__(self, hidden: int = 6):
        super().__init__()
        self.lin = nn.Linear(hidden, hidden)

    def forward(self, h):
        batch, seq, hidden = h.shape
        return torch.tanh(self.lin(h.reshape(batch * seq, hidden))).view(batch, seq, hidden)


def test_token_sparse_wraps_a_block_that_wants_batch_seq_hidden():
    """TokenSparse handed its module a (tokens, hidden) matrix; transformers' MoE blocks (Mixtral's, Qwen2-MoE's,
    which ``apply_token_sparsity``'s default target 'mlp' names) unpack three dims from their input and failed with
    'not enough values to unpack'. The module now gets (1, tokens, hidden), as a batch of one sequence."""
    torch.manual_seed(0)
    block = _NeedsSequences().double()
    wrapped = TokenSparse(block, keep_ratio=0.5).train()
    h = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    out = wrapped(h)
    torch.testing.assert_close(out, block(h))
    out.square().sum().backward()
    assert h.grad is not None and block.lin.weight.grad is not None


def test_token_sparse_on_a_tiny_mixtral():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2)
    dense = transformers.MixtralForCausalLM(config).train()
    sparse = transformers.MixtralForCausalLM(config).train()
    sparse.load_state_dict(dense.state_dict())
    assert apply_token_sparsity(sparse, keep_ratio=0.5) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    loss = sparse(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, dense(input_ids=ids, labels=ids).loss)
    loss.backward()
    grads = [p.grad for n, p in sparse.named_parameters() if "experts" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_attention_information_scores_ignore_nan_in_padded_query_rows():
    """A softmax over a row whose keys are all masked with -inf (a padded query, in attention written by hand
    or by kernels that mask with -inf) is NaN. Those rows have no readers, yet 0 * NaN in the masked sum made
    every key's score NaN, and select_tokens then refused the batch."""
    torch.manual_seed(0)
    b, h, n, pad = 2, 3, 6, 2
    am = torch.ones(b, n, dtype=torch.long)
    am[1, :pad] = 0
    allowed = torch.ones(n, n, dtype=torch.bool).tril() & am[:, None, :].bool()
    probs = torch.randn(b, h, n, n).masked_fill(~allowed[:, None], -math.inf).softmax(-1)
    assert probs[1, :, :pad].isnan().all()  # the padded queries' rows
    scores = attention_information_scores(probs, am)
    torch.testing.assert_close(scores, attention_information_scores(torch.nan_to_num(probs, nan=0.0), am))
    assert torch.isfinite(scores[am.bool()]).all()
    assert select_tokens(scores, 0.5, am).sum(1).tolist() == [3, 2]


def _tiny_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config)


def test_wrapping_keeps_every_name_so_saved_adapters_and_checkpoints_match_the_plain_model(tmp_path):
    """TokenSparse held the block as a child named 'module', so every name under it gained '.module'
    ('model.layers.0.mlp.module.gate_proj'): an adapter saved from a token-sparse model carried those names
    (PEFT matched none of them and dropped the MLP LoRA without a word; load_adapter into a plain model refused
    the file), and a state dict / save_pretrained checkpoint had keys a plain model does not. The wrapper now
    leaves names, state dict and train/eval mode of the block as they were."""
    from alignlab.adapters import LoRAConfig, inject, load_adapter, save_adapter

    plain = _tiny_llama()
    names = [n for n, _ in plain.named_modules()]
    keys = list(plain.state_dict())
    sparse = _tiny_llama()
    apply_token_sparsity(sparse, keep_ratio=0.5, targets=("mlp", "o_proj"))
    assert [n for n, _ in sparse.named_modules()] == names
    assert list(sparse.state_dict()) == keys and [n for n, _ in sparse.named_parameters()] == \
        [n for n, _ in plain.named_parameters()]
    sparse.load_state_dict(plain.state_dict())  # strict: same keys both ways
    block = sparse.model.layers[0].mlp
    assert isinstance(block, TokenSparse) and block.down_proj is block.module.down_proj
    assert block.intermediate_size == 48
    sparse.eval()
    assert not block.module.training and not sparse.model.layers[0].self_attn.o_proj.module.training
    sparse.train()
    assert block.module.training

    # o_proj itself is wrapped: inject refuses to adapt a TokenSparse (tests/adapters), so LoRA goes on q_proj
    inject(sparse, LoRAConfig(r=2, target_modules=["gate_proj", "q_proj"]))
    with torch.no_grad():
        for n, p in sparse.named_parameters():
            if "lora_B" in n:
                p.normal_()
    save_adapter(sparse, tmp_path / "a")
    reloaded = load_adapter(_tiny_llama(), tmp_path / "a")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    sparse.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, sparse(ids).logits)


def test_an_adapted_layer_is_not_wrapped(tmp_path):
    """Token sparsity around a layer that already holds an adapter (LoRA on o_proj, then targets=("o_proj",)) hid
    the adapter from save_adapter: the saved file silently lacked it. Refused now, before anything is wrapped."""
    from alignlab.adapters import LoRAConfig, inject

    model = _tiny_llama()
    inject(model, LoRAConfig(r=2, target_modules=["gate_proj", "o_proj"]))
    with pytest.raises(ValueError, match="targets: 'model.layers.0.self_attn.o_proj' is an adapter layer"):
        apply_token_sparsity(model, keep_ratio=0.5, targets=("mlp", "o_proj"))
    assert not any(isinstance(m, TokenSparse) for m in model.modules())
    apply_token_sparsity(model, keep_ratio=0.5, targets=("mlp",))  # the MLP block holding gate_proj's LoRA is fine


def test_select_tokens_keeps_exactly_the_ceiling_of_the_decimal_ratio():
    """torch.ceil(n * 0.28) read 0.28 · 25 = 7.000000000000001 as 8 tokens (13 of 9900 (n, ρ) pairs were one off)."""
    for n, ratio, want in ((25, 0.28, 7), (50, 0.14, 7), (75, 0.68, 51), (10, 1.0, 10), (7, 0.5, 4), (3, 0.01, 1)):
        assert int(select_tokens(torch.randn(1, n), ratio).sum()) == want, (n, ratio)
    from fractions import Fraction
    for n in range(1, 60):
        for pct in range(1, 100):
            got = int(select_tokens(torch.zeros(1, n), pct / 100).sum())
            assert got == -(-n * Fraction(pct, 100) // 1), (n, pct)


def test_padding_ranks_after_valid_tokens_scored_minus_infinity():
    """Padding was filled with -inf and so tied with real tokens scored -inf (log-probabilities), winning by its
    earlier (left-padded) position: one of three real tokens kept at keep_ratio=1."""
    inf = float("inf")
    scores = torch.tensor([[0.0, 0.0, -inf, -inf, 1.0]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    assert select_tokens(scores, 1.0, mask).tolist() == [[False, False, True, True, True]]
    assert select_tokens(scores, 0.5, mask).tolist() == [[False, False, True, False, True]]  # 2 of 3, ties: earlier
