"""A second language model that follows a generation and yields its next-token logits.

Contrastive decoding (an amateur) and proxy-tuning (an expert and an
anti-expert) need, at every step of ``model.generate(...)``, the next-token
logits of other models on the same token prefix. A logits processor only
sees ``input_ids`` ``(batch, seq)``; :class:`CompanionLM` turns that into
``(batch, vocab)`` logits, keeping a KV cache so each step costs one token
of compute. When the prefix is not the previous one plus a token (a new
``generate`` call, beam search reordering rows), it recomputes from scratch,
so results never depend on the cache.

Left padding is recognised from ``pad_token_id``: the leading run of pad
tokens in each row is masked and position ids count real tokens only, as
``generate`` does for the main model. An id the companion cannot embed (its
vocabulary is padded to fewer rows than the generating model's) is refused with
a ``ValueError`` before its forward, instead of an ``IndexError`` inside the
embedding (a device assert on CUDA).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from alignlab._checks import ArgumentTypeError, as_bool, check_token_id
from alignlab.adapters.base import hf_embedding
from alignlab.eval.eval_mode import eval_mode
from alignlab.hf_cache import cache_keyword, output_cache

__all__ = ["CompanionLM"]


def _warn_if_sharded(model: nn.Module, name: str) -> None:
    """``RuntimeWarning`` for a companion sharded by FSDP2 over several ranks: ``generate`` stops calling logits
    processors on a rank whose rows have all finished (``synced_gpus`` keeps only the generating model running
    there), so the companion's all-gathers on the other ranks would wait for it until the group's timeout."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    from alignlab.distributed import is_sharded

    if is_sharded(model):
        warnings.warn(
            f"the {name} is sharded (FSDP2) over {dist.get_world_size()} ranks: generate() stops calling logits "
            f"processors on a rank whose rows have all finished, and the {name}'s all-gathers on the other ranks then "
            "wait for it until the process group times out; keep it whole on every rank, or give every rank the "
            "same number of steps (eos_token_id=None)",
            RuntimeWarning,
            stacklevel=3,
        )


def vocab_size(model: nn.Module) -> int | None:
    """Rows of ``model``'s input embedding (``config.vocab_size`` as a fallback), ``None`` if unknown."""
    emb = hf_embedding(model)
    if isinstance(getattr(emb, "num_embeddings", None), int):
        return emb.num_embeddings
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


class CompanionLM:
    """Next-token logits of ``model`` on the sequences being generated.

    Args:
        model: HF-style causal LM accepting ``input_ids``, ``attention_mask``,
            ``position_ids``, a KV cache (``cache`` or, before transformers
            renamed it, ``past_key_values``) and ``use_cache``, and
            returning ``.logits`` ``(batch, seq, vocab)``. A model that returns no cache, or
            that cannot take the prefix's mask beside one new token (Mamba, FalconMamba: their logits
            come back for the whole mask), is run on the whole prefix at every step.
        pad_token_id: id of left padding (the generating model's
            ``generation_config.pad_token_id``), a non-negative int; ``None`` = no padding.
        use_cache: keep a KV cache between consecutive steps (a bool; ``TypeError`` otherwise).
        name: what the companion is (``"amateur"``, ``"expert"``, ...), for error messages.

    Call with ``input_ids`` ``(batch, seq)``; returns float32 logits
    ``(batch, vocab)`` on ``input_ids.device``. Raises ``ValueError`` when ``input_ids`` hold an
    id beyond the model's vocabulary (read back from the device: one sync per call). A model
    sharded by FSDP2 over several ranks gets a ``RuntimeWarning`` when the companion is made:
    ``generate`` skips logits processors on a rank that has finished, so the other ranks'
    all-gathers would wait for it. The model runs in eval mode (no dropout), as in
    :func:`alignlab.eval.perplexity`; its own mode is restored after each call.
    """

    def __init__(
        self, model: nn.Module, *, pad_token_id: int | None = None, use_cache: bool = True, name: str = "model"
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name}: expected a torch.nn.Module causal LM, got {type(model).__name__}")
        # 1.5 matched no token, so left padding was silently attended; True matched id 1
        check_token_id(pad_token_id, "pad_token_id", allow_none=True)
        self.model = model
        self.pad_token_id = None if pad_token_id is None else int(pad_token_id)
        self.use_cache = as_bool(use_cache, "use_cache")
        self.name = name
        self.vocab_size = vocab_size(model)
        _warn_if_sharded(model, name)
        self.reset()

    def reset(self) -> None:
        """Forget the cached prefix (frees the KV cache)."""
        self._prefix: torch.Tensor | None = None
        self._cache = None

    def _mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.pad_token_id is None:
            return torch.ones_like(input_ids)
        return ((input_ids != self.pad_token_id).cumsum(1) > 0).long()

    def _continues_prefix(self, input_ids: torch.Tensor) -> bool:
        prefix = self._prefix
        return (
            prefix is not None
            and prefix.shape[0] == input_ids.shape[0]
            and prefix.shape[1] + 1 == input_ids.shape[1]
            and torch.equal(prefix, input_ids[:, :-1])
        )

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape (batch, seq), got {tuple(input_ids.shape)}")
        if self.vocab_size is not None and input_ids.numel():
            top = int(input_ids.max())
            if top >= self.vocab_size:
                raise ValueError(
                    f"input_ids: id {top} is beyond the {self.name}'s vocabulary ({self.vocab_size} ids); the "
                    f"{self.name} must share the generating model's tokenizer (prompt and pad ids included)"
                )
        with eval_mode(self.model):
            return self._next_logits(input_ids)

    def _next_logits(self, input_ids: torch.LongTensor) -> torch.Tensor:
        device = next(self.model.parameters(), input_ids).device
        ids = input_ids.to(device)
        mask = self._mask(ids)
        if self.use_cache and self._continues_prefix(input_ids):
            out = self.model(
                input_ids=ids[:, -1:],
                attention_mask=mask,
                position_ids=(mask.sum(1, keepdim=True) - 1).clamp(min=0),
                use_cache=True,
                **{cache_keyword(self.model): self._cache},
            )
            if out.logits.shape[1] == 1:
                return self._keep_cache(out, input_ids)
            # The prefix's mask beside one new token was broadcast over the sequence (Mamba and FalconMamba
            # multiply their hidden states by the mask): logits and cache are wrong, so this model runs on the
            # whole prefix from now on.
            self.use_cache = False
            self.reset()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(1) - 1).clamp(min=0),
            use_cache=self.use_cache,
        )
        return self._keep_cache(out, input_ids)

    def _keep_cache(self, out, input_ids: torch.LongTensor) -> torch.Tensor:
        """Remember ``out``'s cache for the next step; the last position's float32 logits."""
        if self.use_cache:
            self._cache = output_cache(out)
            # a model that returned no cache needs the whole prefix again at the next step
            self._prefix = input_ids.clone() if self._cache is not None else None
        return out.logits[:, -1].float().to(input_ids.device)


def check_logits(**named: torch.Tensor) -> None:
    """:class:`~alignlab.ArgumentTypeError` naming the argument unless each value is a floating-point tensor with a
    vocabulary dimension (a list failed on ``.shape``, an integer tensor in ``log_softmax``)."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 1:
            got = f"a {t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ArgumentTypeError(f"{name}: expected a floating-point tensor (..., vocab), got {got}")


def common_vocab(*logits: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Cut ``(batch, vocab_i)`` logits to their common vocabulary prefix.

    Models of one family often differ only in embedding padding (e.g. 32000 vs
    32016 rows); the real tokens share ids, the padded tail has no meaning.

    Raises:
        ValueError: batch sizes differ.
    """
    if len({t.shape[0] for t in logits}) != 1:
        raise ValueError(f"logits: batch sizes differ: {[tuple(t.shape) for t in logits]}")
    vocab = min(t.shape[-1] for t in logits)
    return [t[..., :vocab] for t in logits], vocab


def pad_vocab(scores: torch.Tensor, vocab: int) -> torch.Tensor:
    """Extend ``(batch, v)`` scores to ``(batch, vocab)`` with ``-inf`` (tokens outside the common vocabulary)."""
    if scores.shape[-1] == vocab:
        return scores
    tail = scores.new_full((*scores.shape[:-1], vocab - scores.shape[-1]), float("-inf"))
    return torch.cat([scores, tail], -1)
