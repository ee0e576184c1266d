"""LoRA on nn.Embedding and trainable token rows: the math written out, and PEFT (test-only oracle) for
numbers and files, both ways, on a tiny random Llama (tied and untied input/output embeddings)."""

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import make_tiny_llama

from alignlab.adapters import (
    LoRAConfig,
    LoRAEmbedding,
    TrainableTokensLayer,
    adapter_layers,
    delete_adapter,
    disabled,
    inject,
    load_adapter,
    merge,
    merge_and_unload,
    save_adapter,
    set_adapter,
    unmerge,
)

V = 128
IDS = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(0))
NEW = [3, 17, 127]  # "new special tokens"
IDS[0, :3] = torch.tensor(NEW)  # make sure they occur
TOL = dict(rtol=1e-5, atol=1e-6)
EXACT = dict(rtol=0, atol=0)  # files loaded either way: the very same numbers


def _llama(tie=False, seed=0, pad=None):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=tie, pad_token_id=pad)
    model = transformers.LlamaForCausalLM(config).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    return model


def _randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _trainable(model, strip=("base_model.model.", ".default")):
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            for s in strip:
                n = n.replace(s, "")
            out[n] = p
    return out


def _copy_ours_into_peft(ours, theirs, skip=()):
    """Our adapter tensors into PEFT's parameters (same dotted names once PEFT's prefix/suffix are stripped);
    ``skip``: PEFT parameter name prefixes that are views of others (a tied head's factors)."""
    mine = {n.replace(".trainable_tokens_delta", ".token_adapter.trainable_tokens_delta"): p
            for n, p in _trainable(ours).items()}
    peft_params = {n: p for n, p in _trainable(theirs).items() if not n.startswith(tuple(skip))}
    assert sorted(mine) == sorted(peft_params)
    with torch.no_grad():
        for n, p in peft_params.items():
            p.copy_(mine[n])


# -- LoRA on nn.Embedding -----------------------------------------------------------------------------
def test_lora_embedding_is_the_formula():
    torch.manual_seed(0)
    emb = nn.Embedding(11, 6)
    layer = LoRAEmbedding(emb, r=3, alpha=6.0)
    assert tuple(layer.lora_embedding_A["default"].shape) == (3, 11)
    assert tuple(layer.lora_embedding_B["default"].shape) == (6, 3)
    ids = torch.tensor([[0, 5, 10], [2, 2, 7]])
    torch.testing.assert_close(layer(ids), emb(ids))  # A = 0 at init
    with torch.no_grad():
        layer.lora_embedding_A["default"].normal_()
    a, b, e = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"], emb.weight
    expected = e[ids] + 2.0 * a.T[ids] @ b.T  # s = alpha / r = 2
    torch.testing.assert_close(layer(ids), expected)
    torch.testing.assert_close(layer.delta_weight("default"), 2.0 * (b @ a).T)
    layer.merge()
    torch.testing.assert_close(emb.weight[ids], expected)
    layer.unmerge()
    torch.testing.assert_close(layer(ids), expected)


def test_lora_embedding_rslora_and_embed_scale():
    class Scaled(nn.Embedding):  # Gemma-style: the table's output is multiplied by a scalar
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.embed_scale = 4.0

        def forward(self, x):
            return super().forward(x) * self.embed_scale

    torch.manual_seed(0)
    emb = Scaled(9, 4)
    layer = LoRAEmbedding(emb, r=4, alpha=2.0, use_rslora=True)
    with torch.no_grad():
        layer.lora_embedding_A["default"].normal_()
    ids = torch.tensor([1, 8, 3])
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    torch.testing.assert_close(layer(ids), 4.0 * (emb.weight[ids] + 1.0 * a.T[ids] @ b.T))  # s = 2 / sqrt(4)


def test_numpy_bool_use_rslora_is_a_python_bool():
    import numpy as np  # a sweep's flags are np.bool_

    layer = LoRAEmbedding(nn.Embedding(9, 4), r=4, alpha=2.0, use_rslora=np.True_)
    assert layer.use_rslora["default"] is True and layer.scaling["default"] == 2.0 / 2  # α/√r


def _lora_pair(tie=False, targets=("q_proj", "embed_tokens"), pad=None):
    peft = pytest.importorskip("peft")
    base = _llama(tie, pad=pad)
    ours = inject(copy.deepcopy(base), LoRAConfig(r=4, alpha=8, target_modules=list(targets)))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    _randomise(ours)
    _copy_ours_into_peft(ours, theirs)
    return base, ours, theirs


@pytest.mark.parametrize("tie, pad", [(False, None), (True, None), (False, 17)])
def test_lora_embedding_matches_peft_outputs_and_gradients(tie, pad):
    """``pad``: a padding id in the batch, whose column of A gets no gradient (the table's padding row rule)."""
    base, ours, theirs = _lora_pair(tie, pad=pad)
    assert isinstance(ours.model.embed_tokens, LoRAEmbedding)
    y, y_ref = ours(IDS).logits, theirs(IDS).logits
    torch.testing.assert_close(y, y_ref, **TOL)
    assert not torch.allclose(y, base(IDS).logits, atol=1e-3)
    y.square().mean().backward()
    y_ref.square().mean().backward()
    g_ref = {n.replace("token_adapter.", ""): p.grad for n, p in _trainable(theirs).items()}
    for n, p in _trainable(ours).items():
        torch.testing.assert_close(p.grad, g_ref[n], rtol=1e-4, atol=1e-6)
    if tie:  # PEFT's default for a tied head: it keeps computing with the frozen table
        assert ours.lm_head.weight is ours.model.embed_tokens.base_layer.weight
    if pad is not None:
        assert not ours.model.embed_tokens.lora_embedding_A["default"].grad[:, pad].any()


def test_lora_embedding_files_load_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    base, ours, theirs = _lora_pair()
    expected = ours(IDS).logits
    save_adapter(ours, tmp_path / "ours")
    sd = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert tuple(sd["base_model.model.model.embed_tokens.lora_embedding_A"].shape) == (4, V)
    assert tuple(sd["base_model.model.model.embed_tokens.lora_embedding_B"].shape) == (32, 4)
    raw = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert "model.embed_tokens" in raw["target_modules"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(loaded(IDS).logits, expected, **EXACT)

    theirs.save_pretrained(tmp_path / "peft")  # PEFT also writes the whole table (embed_tokens.base_layer.weight)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(tmp_path / "peft" / "adapter_model.safetensors")
    mine = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(mine(IDS).logits, expected, **EXACT)


def test_lora_embedding_merge_on_a_tied_model_unties_with_a_warning():
    _, ours, _ = _lora_pair(tie=True)
    expected = ours(IDS).logits
    with pytest.warns(UserWarning, match="tied"):
        merge_and_unload(ours)
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    assert ours.config.tie_word_embeddings is False
    torch.testing.assert_close(ours(IDS).logits, expected, rtol=1e-4, atol=1e-5)


def test_lora_embedding_refusals():
    model = _llama()
    with pytest.raises(ValueError, match="use_dora"):
        inject(copy.deepcopy(model), LoRAConfig(target_modules=["embed_tokens"], use_dora=True))
    with pytest.raises(ValueError, match="init"):
        inject(copy.deepcopy(model), LoRAConfig(target_modules=["embed_tokens"], init="olora"))
    with pytest.raises(TypeError, match="nn.Embedding"):
        LoRAEmbedding(nn.Linear(3, 4))
    for bad in ("no", 0, None):  # bool("no") is True: it would switch rsLoRA scaling on
        with pytest.raises(TypeError, match="use_rslora must be a bool"):
            LoRAEmbedding(nn.Embedding(9, 4), r=4, use_rslora=bad)
    # "all-linear" never picks the embedding
    inject(model, LoRAConfig())
    assert not any(isinstance(l, LoRAEmbedding) for _, l in adapter_layers(model))


# -- trainable token rows -----------------------------------------------------------------------------
def test_only_the_selected_rows_change_in_training():
    model = inject(_llama(), LoRAConfig(target_modules=["q_proj"], trainable_token_indices=NEW))
    layer = model.model.embed_tokens
    assert isinstance(layer, TrainableTokensLayer)
    table = layer.base_layer.weight
    before = table.detach().clone()
    torch.testing.assert_close(layer.trainable_tokens_delta["default"], before[NEW])  # rows start as copies
    assert not table.requires_grad
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    rows = layer.trainable_tokens_delta["default"]
    assert not torch.allclose(rows, before[NEW])
    torch.testing.assert_close(table, before)  # the table itself never moves
    # the layer reads the trained rows for those ids and the table for every other id
    out = layer(IDS)
    hit = torch.isin(IDS, torch.tensor(NEW))
    slot = {t: i for i, t in enumerate(NEW)}
    expected = torch.stack([rows[slot[int(t)]] if h else before[int(t)] for t, h in zip(IDS.flatten(), hit.flatten())])
    torch.testing.assert_close(out.reshape(-1, out.shape[-1]), expected.detach())
    merge(model)  # the rows are written into the table; unmerge puts the originals back
    torch.testing.assert_close(table[NEW], rows.detach())
    unmerge(model)
    torch.testing.assert_close(table, before)


def _token_pair(tie, spec=NEW, pad=None):
    peft = pytest.importorskip("peft")
    base = _llama(tie, pad=pad)
    ours = inject(copy.deepcopy(base), LoRAConfig(r=4, alpha=8, target_modules=["q_proj"], trainable_token_indices=spec))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                       trainable_token_indices=spec))
    _randomise(ours)
    _copy_ours_into_peft(ours, theirs)
    return base, ours, theirs


@pytest.mark.parametrize("tie, pad", [(False, None), (True, None), (False, 17)])
def test_trainable_tokens_match_peft_outputs_gradients_and_a_training_step(tie, pad):
    """``pad``: one of the trained ids is the padding id, whose row gets no gradient from the input side."""
    _, ours, theirs = _token_pair(tie, pad=pad)
    if tie:  # the tied head shares the rows (one parameter), as PEFT ties its token adapters
        head = ours.lm_head
        assert isinstance(head, TrainableTokensLayer) and head.tied_to is ours.model.embed_tokens
        assert head.trainable_tokens_delta["default"] is ours.model.embed_tokens.trainable_tokens_delta["default"]
    else:
        assert not isinstance(ours.lm_head, TrainableTokensLayer)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (ours, theirs)]
    for _ in range(2):
        losses = [m(IDS, labels=IDS).loss for m in (ours, theirs)]
        torch.testing.assert_close(losses[0], losses[1], **TOL)
        for loss, opt in zip(losses, opts):
            loss.backward()
        g_ref = {n.replace("token_adapter.", ""): p.grad for n, p in _trainable(theirs).items()}
        for n, p in _trainable(ours).items():
            torch.testing.assert_close(p.grad, g_ref[n], rtol=1e-4, atol=1e-6)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, **TOL)


@pytest.mark.parametrize("tie", [False, True])
def test_trainable_tokens_files_load_both_ways(tmp_path, tie):
    peft = pytest.importorskip("peft")
    base, ours, theirs = _token_pair(tie)
    expected = ours(IDS).logits
    save_adapter(ours, tmp_path / "ours")
    sd = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert tuple(sd["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"].shape) == (3, 32)
    assert not any("lm_head" in k for k in sd)  # a tied head is not written twice
    raw = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert raw["trainable_token_indices"] == NEW and raw["target_modules"] == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    # Our file gives PEFT the very logits of the PEFT model holding our rows. Our own model's tied head
    # agrees only to rounding: PEFT computes the trained columns inside the full (..., V) GEMM over a copy
    # of the table with the rows written in, we in a separate (..., |I|) GEMM (no (V, H) copy or
    # gradient), and the CPU BLAS sums an N = 3 GEMM in another order than an N = 128 one (torch 2.13,
    # MKL: 45 of 2304 logits differ, by at most 4.8e-7, 7.8e-7 relative; peft 0.18 and 0.21 alike).
    torch.testing.assert_close(loaded(IDS).logits, theirs(IDS).logits, **EXACT)
    torch.testing.assert_close(loaded(IDS).logits, expected, **(TOL if tie else EXACT))

    theirs.save_pretrained(tmp_path / "peft")
    mine = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert isinstance(mine.lm_head, TrainableTokensLayer) == tie
    torch.testing.assert_close(mine(IDS).logits, expected, **EXACT)


def test_trainable_tokens_on_a_tied_model_merge_into_both_and_stay_tied():
    _, ours, _ = _token_pair(tie=True)
    expected = ours(IDS).logits
    with disabled(ours):
        plain = ours(IDS).logits
    assert not torch.allclose(plain, expected, atol=1e-4)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no untying
        merge_and_unload(ours)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    torch.testing.assert_close(ours(IDS).logits, expected, **TOL)


def test_trainable_tokens_dict_form_several_adapters_and_errors():
    model = _llama()
    inject(model, LoRAConfig(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 2]}))
    inject(model, LoRAConfig(target_modules=["q_proj"], trainable_token_indices=[5]), "other")
    layer = model.model.embed_tokens
    assert layer.adapter_names() == ["default", "other"] and layer.active_adapters == ["default"]
    set_adapter(model, ["default", "other"])
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == [
        "trainable_tokens_delta.default", "trainable_tokens_delta.other"]
    inject(model, LoRAConfig(target_modules=["q_proj"], trainable_token_indices=[2, 9]), "overlap")
    with pytest.raises(ValueError, match="overlapping"):
        set_adapter(model, ["default", "overlap"])
    delete_adapter(model, "other")
    assert layer.adapter_names() == ["default", "overlap"]

    fresh = _llama()
    with pytest.raises(ValueError, match="either trainable token rows or LoRA"):
        inject(fresh, LoRAConfig(target_modules=["q_proj", "embed_tokens"], trainable_token_indices=[1]))
    assert not any(True for _ in adapter_layers(fresh))  # refused before anything was built
    with pytest.raises(ValueError, match="out of range"):
        inject(fresh, LoRAConfig(target_modules=["q_proj"], trainable_token_indices=[V]))
    with pytest.raises(ValueError, match="no module named 'nope'"):
        inject(fresh, LoRAConfig(target_modules=["q_proj"], trainable_token_indices={"nope": [1]}))
    with pytest.raises(ValueError, match="repeat"):
        LoRAConfig(trainable_token_indices=[1, 1])
    with pytest.raises(TypeError, match="trainable_token_indices"):
        LoRAConfig(trainable_token_indices=5)
    with pytest.raises(ValueError, match="non-negative"):
        LoRAConfig(trainable_token_indices={"embed_tokens": [-1]})


def test_trainable_rows_of_an_untied_head_by_name_match_peft_both_ways(tmp_path):
    """``{module: ids}`` may name the output head (an nn.Linear): its logits for those ids come from trained rows."""
    peft = pytest.importorskip("peft")
    spec = {"embed_tokens": [3, 17], "lm_head": [5, 127]}
    base, ours, theirs = _token_pair(False, spec=spec)
    assert isinstance(ours.lm_head, TrainableTokensLayer) and ours.lm_head.tied_to is None
    expected = ours(IDS).logits
    torch.testing.assert_close(expected, theirs(IDS).logits, **TOL)
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert "base_model.model.lm_head.token_adapter.trainable_tokens_delta" in keys
    # exact against PEFT's own model: the head's trained columns are a separate GEMM here, a slice of the
    # full one in PEFT (see test_trainable_tokens_files_load_both_ways; here 29 of 2304 logits differ
    # from ours, by at most 1.8e-7), so ours and PEFT's agree to TOL, as checked above
    torch.testing.assert_close(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")(IDS).logits,
                               theirs(IDS).logits, **EXACT)
    torch.testing.assert_close(load_adapter(copy.deepcopy(base), tmp_path / "peft")(IDS).logits, expected, **EXACT)


def test_a_tied_head_trained_in_full_is_refused():
    with pytest.raises(ValueError, match="modules_to_save"):
        inject(_llama(tie=True), LoRAConfig(target_modules=["q_proj"], modules_to_save=["lm_head"],
                                            trainable_token_indices=NEW))


def _peft_ties_lora_heads(peft) -> bool:
    """Whether this PEFT puts an embedding's LoRA on the tied head with ``ensure_weight_tying`` (0.21 does)."""
    import dataclasses

    if "ensure_weight_tying" not in {f.name for f in dataclasses.fields(peft.LoraConfig)}:
        return False
    probe = peft.get_peft_model(_llama(tie=True), peft.LoraConfig(r=2, target_modules=["embed_tokens"],
                                                                   ensure_weight_tying=True))
    return hasattr(probe.base_model.model.lm_head, "lora_A")


def test_ensure_weight_tying_puts_the_embedding_lora_on_the_tied_head_as_peft_does(tmp_path):
    """``logits = x Eᵀ + s·(x B) A`` on the head with the embedding's own factors: outputs, gradients and files
    against PEFT (both ways, bit-identical after loading); merging keeps the tie and the outputs."""
    from alignlab.adapters import TiedLoRAHead

    peft = pytest.importorskip("peft")
    if not _peft_ties_lora_heads(peft):
        pytest.skip(f"peft {peft.__version__} does not put the embedding's LoRA on a tied head")
    base = _llama(tie=True)
    targets = ["q_proj", "embed_tokens"]
    ours = inject(copy.deepcopy(base), LoRAConfig(r=4, alpha=8, target_modules=targets, ensure_weight_tying=True))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                       ensure_weight_tying=True))
    head = ours.lm_head
    assert isinstance(head, TiedLoRAHead) and head.source is ours.model.embed_tokens
    _randomise(ours)
    _copy_ours_into_peft(ours, theirs, skip=["lm_head.lora_"])  # PEFT's head factors are views of the embedding's
    a, b = ours.model.embed_tokens.lora_embedding_A["default"], ours.model.embed_tokens.lora_embedding_B["default"]
    x = torch.randn(3, 32)
    torch.testing.assert_close(head(x), x @ base.lm_head.weight.T + 2.0 * (x @ b) @ a)  # s = 8 / 4
    y, y_ref = ours(IDS).logits, theirs(IDS).logits
    torch.testing.assert_close(y, y_ref, **TOL)
    y.square().mean().backward()
    y_ref.square().mean().backward()
    # PEFT keeps the head's factors as separate leaves sharing the embedding's storage, so the tied gradient
    # (ours: one set of factors) is the sum of its two: dA = dA_emb + dB_headᵀ, dB = dB_emb + dA_headᵀ
    g_ref = {n: p.grad for n, p in _trainable(theirs).items()}
    g_ref["model.embed_tokens.lora_embedding_A"] = g_ref["model.embed_tokens.lora_embedding_A"] + g_ref.pop("lm_head.lora_B.weight").T
    g_ref["model.embed_tokens.lora_embedding_B"] = g_ref["model.embed_tokens.lora_embedding_B"] + g_ref.pop("lm_head.lora_A.weight").T
    assert sorted(g_ref) == sorted(_trainable(ours))
    for n, p in _trainable(ours).items():
        torch.testing.assert_close(p.grad, g_ref[n], rtol=1e-4, atol=1e-6)

    expected = ours(IDS).logits.detach()
    save_adapter(ours, tmp_path / "ours")
    raw = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert raw["ensure_weight_tying"] is True and "lm_head" not in raw["target_modules"]
    sd = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert torch.equal(sd["base_model.model.lm_head.lora_A.weight"], b.detach().T)
    torch.testing.assert_close(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")(IDS).logits,
                               expected, **EXACT)
    theirs.save_pretrained(tmp_path / "peft")
    mine = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert isinstance(mine.lm_head, TiedLoRAHead)
    torch.testing.assert_close(mine(IDS).logits, expected, **EXACT)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no untying
        merge_and_unload(ours)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    torch.testing.assert_close(ours(IDS).logits, expected, rtol=1e-4, atol=1e-5)


def test_ensure_weight_tying_file_of_a_peft_that_left_the_head_alone(tmp_path):
    """A file whose ``ensure_weight_tying`` came without head keys (PEFT 0.18) reads with the head untouched;
    built here by dropping the head keys from our own file."""
    from safetensors.torch import save_file

    base = _llama(tie=True)
    ours = inject(copy.deepcopy(base), LoRAConfig(r=4, alpha=8, target_modules=["embed_tokens"], ensure_weight_tying=True))
    _randomise(ours)
    save_adapter(ours, tmp_path)
    sd = {k: v for k, v in load_file(tmp_path / "adapter_model.safetensors").items() if "lm_head" not in k}
    save_file(sd, tmp_path / "adapter_model.safetensors")
    mine = load_adapter(copy.deepcopy(base), tmp_path)
    assert not isinstance(mine.lm_head, LoRAEmbedding) and type(mine.lm_head) is nn.Linear
    untied = inject(copy.deepcopy(base), LoRAConfig(r=4, alpha=8, target_modules=["embed_tokens"]))
    with torch.no_grad():
        untied.model.embed_tokens.lora_embedding_A["default"].copy_(ours.model.embed_tokens.lora_embedding_A["default"])
        untied.model.embed_tokens.lora_embedding_B["default"].copy_(ours.model.embed_tokens.lora_embedding_B["default"])
    torch.testing.assert_close(mine(IDS).logits, untied(IDS).logits, **EXACT)



def test_weighted_combination_of_embedding_adapters_is_refused():
    from alignlab.adapters import add_weighted_adapter

    for config in (LoRAConfig(target_modules=["q_proj", "embed_tokens"]),
                   LoRAConfig(target_modules=["q_proj"], trainable_token_indices=[1])):
        model = inject(_llama(), config)
        with pytest.raises(ValueError, match="embedding"):
            add_weighted_adapter(model, ["default"], [1.0], "mix")


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["embed_tokens", "lm_head"]])
def test_peft_file_with_lora_on_lm_head_loads(tmp_path, targets):
    """PEFT's save_embedding_layers="auto" also writes the frozen ``lm_head.base_layer.weight`` when lm_head
    (one of its EMBEDDING_LAYER_NAMES) is targeted; load_adapter refused the file as a key matching no module."""
    peft = pytest.importorskip("peft")
    base = _llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Setting `save_embedding_layers` to `True` ..."
        theirs.save_pretrained(tmp_path / "peft")
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "peft" / "adapter_model.safetensors")
    mine = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(mine(IDS).logits, theirs(IDS).logits, **EXACT)


@pytest.mark.parametrize("tie", [False, True])
def test_peft_file_with_saved_embedding_layers_loads(tmp_path, tie):
    """PEFT's save_embedding_layers=True (its "auto" after a vocabulary resize) writes the whole input and output
    embeddings of the base (``model.embed_tokens.weight``, ``lm_head.weight``) next to the adapter and loads
    them back into the base; load_adapter refused them as keys matching no adapted module."""
    peft = pytest.importorskip("peft")
    base = _llama(tie=tie)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():  # rows trained or added after a resize
        theirs.base_model.model.model.embed_tokens.weight.add_(0.1)
        theirs.base_model.model.lm_head.weight.mul_(1.5)
    theirs.save_pretrained(tmp_path / "peft", save_embedding_layers=True)
    assert "base_model.model.lm_head.weight" in load_file(tmp_path / "peft" / "adapter_model.safetensors")
    mine = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(mine(IDS).logits, theirs(IDS).logits, **EXACT)


# rows on the head: its trained columns are a separate GEMM here, a slice of the full one in PEFT (see
# test_trainable_tokens_files_load_both_ways): equal to rounding
@pytest.mark.parametrize("tie, extra, tol", [
    (False, dict(trainable_token_indices=NEW), EXACT),
    (True, dict(trainable_token_indices=NEW), TOL),
    (False, dict(trainable_token_indices={"embed_tokens": NEW[:2], "lm_head": NEW[2:]}), TOL),
    (False, dict(modules_to_save=["lm_head"]), EXACT),
    (True, dict(modules_to_save=["lm_head"]), EXACT),
    (False, dict(modules_to_save=["embed_tokens"]), EXACT),
])
def test_peft_file_with_saved_embedding_layers_under_rows_or_saved_copies_loads(tmp_path, tie, extra, tol):
    """New tokens: resize, train their rows (or the whole head), and PEFT's save (``save_embedding_layers="auto"``
    after a resize, or True) writes the base tables from inside its wrappers: ``<emb>.token_adapter.base_layer.weight``
    (and a tied head's copy of the rows, ``lm_head.token_adapter.trainable_tokens_delta``), or a saved module's
    ``original_module.weight`` and ``modules_to_save.weight``. load_adapter refused such files (keys matching no
    adapted module); PEFT loads the tables back into the base, and so do we."""
    peft = pytest.importorskip("peft")
    base = _llama(tie=tie)
    resized = copy.deepcopy(base)
    with torch.no_grad():  # the rows a resize added, different in every process that resizes
        resized.model.embed_tokens.weight.add_(0.1)
        resized.lm_head.weight.mul_(1.5)
    theirs = peft.get_peft_model(resized, peft.LoraConfig(r=4, target_modules=["q_proj"], **extra))
    _randomise(theirs)
    theirs.save_pretrained(tmp_path / "peft", save_embedding_layers=True)
    assert any(".token_adapter.base_layer." in k or ".original_module." in k
               for k in load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    mine = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(mine(IDS).logits, theirs(IDS).logits, **tol)
    with disabled(mine), theirs.disable_adapter():
        torch.testing.assert_close(mine(IDS).logits, theirs(IDS).logits, **EXACT)


def test_a_file_writing_a_trained_copy_through_a_tied_head_into_the_frozen_original_is_refused(tmp_path):
    """PEFT 0.22 with ensure_weight_tying and modules_to_save=["embed_tokens"] ties the head to the trained embedding
    copy and saves that copy under `lm_head.weight`; load_adapter read it as a base table and copied it into the
    head's weight, the embedding's frozen original itself: disabled(model) (a DPO reference) ran a changed base,
    17.6 off in the logits (a helper's find). Refused, the model as it was; a head key holding the original's
    values (PEFT's save_embedding_layers) still loads."""
    from safetensors.torch import save_file

    base = _llama(tie=True)
    ours = inject(copy.deepcopy(base), LoRAConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    _randomise(ours)
    with torch.no_grad():
        ours.model.embed_tokens.modules_to_save["default"].weight.add_(0.5)
    save_adapter(ours, tmp_path / "a")
    state = load_file(tmp_path / "a" / "adapter_model.safetensors")
    copy_key = "base_model.model.model.embed_tokens.weight"
    assert copy_key in state
    tied = dict(state, **{"base_model.model.lm_head.weight": state[copy_key].clone()})
    save_file(tied, tmp_path / "a" / "adapter_model.safetensors")
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="lm_head.weight: the file writes other values into a tensor tied to"):
        load_adapter(model, tmp_path / "a")
    assert not any(isinstance(m, nn.Module) and type(m).__name__ == "SavedModule" for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the original's own values under the head's key: nothing new is written, the file loads
    same = dict(state, **{"base_model.model.lm_head.weight": base.lm_head.weight.detach().clone()})
    save_file(same, tmp_path / "a" / "adapter_model.safetensors")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "a")
    with disabled(loaded):
        torch.testing.assert_close(loaded(IDS).logits, base(IDS).logits, **EXACT)
