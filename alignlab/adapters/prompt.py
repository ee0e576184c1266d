"""Soft prompts: prompt tuning and prefix tuning.

* Prompt tuning -- Lester, Al-Rfou and Constant, "The Power of Scale for
  Parameter-Efficient Prompt Tuning", arXiv 2104.08691. ``n`` trainable embeddings
  ``P (n, d)`` are prepended to the input embeddings::

      h⁰ = [P; E(x)]   (batch, n + seq, d)

  so the logits gain ``n`` leading positions (their labels are set to ``-100``).
  Trainable parameters: ``n·d``. Initialisation: rows of the vocabulary embedding,
  either random tokens or the (repeated) tokens of a text (``init_token_ids``; ``from_text`` tokenizes as
  PEFT's TEXT init does, special tokens included).
* Prefix tuning -- Li and Liang, "Prefix-Tuning: Optimizing Continuous Prompts for
  Generation", arXiv 2101.00190. Every attention layer ``l`` attends to ``n``
  extra key/value pairs ``(K_l, V_l)``, fed in as a pre-filled HF KV cache::

      Attn_l(x) = softmax(Q [K_l; K(x)]ᵀ/√d_h) [V_l; V(x)]

  Positions of the real tokens start at ``n`` (as with any cached prefix). With
  ``prefix_projection`` the prefixes are the output of the paper's
  reparameterisation MLP ``P = MLP(E')``, ``E' (n, d_kv)``, ``MLP: d_kv → h → 2·L·d_kv``
  (tanh), which trains more stably; the saved file holds only the resulting
  prefixes (as PEFT does). Trainable parameters: ``n·2·L·d_kv`` (plain) or
  ``n·d_kv + (d_kv+1)·h + (h+1)·2·L·d_kv`` (projection), ``d_kv = kv_heads·head_dim``.

Both live on a wrapper of the input embedding (:class:`SoftPromptEmbedding`, an
:class:`AdapterLayer`, so ``disabled()``/``set_adapter``/trainable marking work) and a
forward pre-hook on the backbone (the innermost module above the embedding taking ``inputs_embeds`` and
``attention_mask``: an HF task model's ``base_model``, or the decoder stack OPT calls directly; so a direct
``model.model(...)`` call for hidden states gets the prompts too) that rewrites the call's
``input_ids``/``inputs_embeds``/``attention_mask``/``token_type_ids`` and the KV cache
(``cache`` or the older ``past_key_values``, whichever the call uses; see
:mod:`alignlab.hf_cache`); a second pre-hook on the task model gives per-token ``labels``
``-100`` at the virtual tokens. Several active
adapters are concatenated. Soft prompts cannot be merged. On an HF classifier or QA model the head
(``classifier`` / ``score``, ``qa_outputs``) is trained in full next to the prompt, as PEFT's task wrappers do
(``task_type`` and ``modules_to_save`` of the configs), and a decoder classifier pools its logits at the last
real token of the prompted sequence (:func:`_task_model_hook`). Training/scoring calls
(``model(input_ids=..., attention_mask=..., labels=...)``) and HF ``generate()``
work: a call with a non-empty KV cache (incremental decoding) already holds the
virtual tokens, so only its attention mask and positions are shifted past them.
A call with ``use_cache=False`` recomputes the whole sequence and ignores any cache
passed along (``generate(use_cache=False)`` passes the previous step's back).
Pass everything but ``input_ids`` by keyword.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from alignlab._checks import ArgumentTypeError, check_positive_int, is_int
from alignlab.adapters.base import AdapterLayer, hf_embedding
from alignlab.adapters.config import (as_bool, check_finite_number, check_modules_to_save, mark_read_from_file,
                                      read_from_file, task_heads)
from alignlab.adapters.io import peft_field
from alignlab.hf_cache import CACHE_KEYWORDS, cache_keyword, find_cache

HOOK_ATTR = "_alignlab_soft_prompt_hook"
# set on the input ids a sequence classifier's hook lengthened by placeholder columns (see _task_model_hook): how many
# leading columns the backbone's hook drops again before embedding
PLACEHOLDERS_ATTR = "_alignlab_virtual_placeholders"


class PrefixEncoder(nn.Module):
    """The prefixes of one adapter: ``(n, 2·L·d_kv)``, directly or through the reparameterisation MLP
    (``projection_hidden`` wide; None: no MLP).

    Raises ``ValueError``/``TypeError`` naming the argument, as :class:`PrefixTuningConfig` does: ``n``,
    ``num_layers``, ``token_dim`` or a given ``projection_hidden`` not a positive int, an ``init_std`` that is
    negative, NaN or infinite.
    """

    def __init__(self, n: int, num_layers: int, token_dim: int, projection_hidden: int | None, init_std: float = 1.0) -> None:
        super().__init__()
        n = check_positive_int(n, "n")
        num_layers, token_dim = check_positive_int(num_layers, "num_layers"), check_positive_int(token_dim, "token_dim")
        if projection_hidden is not None:
            projection_hidden = check_positive_int(projection_hidden, "projection_hidden")
        init_std = check_finite_number(init_std, "init_std", minimum=0.0)
        self.n, self.num_layers, self.token_dim = n, num_layers, token_dim
        width = num_layers * 2 * token_dim
        if projection_hidden:
            self.embedding = nn.Parameter(torch.randn(n, token_dim) * init_std)
            self.transform = nn.Sequential(nn.Linear(token_dim, projection_hidden), nn.Tanh(),
                                           nn.Linear(projection_hidden, width))
        else:
            self.embedding = nn.Parameter(torch.randn(n, width) * init_std)
            self.transform = None

    def forward(self) -> torch.Tensor:
        """``(n, 2·L·d_kv)``."""
        return self.embedding if self.transform is None else self.transform(self.embedding)


class SoftPromptEmbedding(AdapterLayer):
    """The model's input embedding plus named soft prompts (prompt tuning) or prefixes (prefix tuning).

    Its own forward is the plain embedding; the model-level pre-hook reads :meth:`prompt`
    and :meth:`prefix`. Raises ``TypeError`` if ``base`` is not an embedding with ``weight``.
    """

    def __init__(self, base: nn.Module) -> None:
        if not hasattr(base, "weight") or base.weight.dim() != 2:
            raise TypeError(f"soft prompts need an input embedding with a 2-D weight, got {type(base).__name__}")
        super().__init__(base)
        self.prompt_embeddings = nn.ParameterDict()
        self.prefix_encoder = nn.ModuleDict()

    @property
    def in_features(self) -> int:
        return self.base_layer.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.base_layer.weight.shape[1]

    def adapter_names(self) -> list[str]:
        return list(self.prompt_embeddings.keys()) + list(self.prefix_encoder.keys())

    def add_prompt(self, name: str, init: torch.Tensor) -> None:
        self._check_new_adapter(name)
        self.prompt_embeddings[name] = nn.Parameter(init.detach().clone().float())

    def add_prefix(self, name: str, encoder: PrefixEncoder) -> None:
        self._check_new_adapter(name)
        self.prefix_encoder[name] = encoder.to(self.base_layer.weight.device)

    def delete_adapter(self, name: str) -> None:
        self._check_name(name)
        store = self.prompt_embeddings if name in self.prompt_embeddings else self.prefix_encoder
        del store[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.base_layer(*args, **kwargs)

    def _live(self) -> list[str]:
        return [] if self.disabled else [n for n in self.active_adapters if n in self.adapter_names()]

    def prompt(self) -> torch.Tensor | None:
        """Concatenated soft prompts of the active prompt-tuning adapters, ``(n, d)``, or ``None``."""
        parts = [self.prompt_embeddings[n] for n in self._live() if n in self.prompt_embeddings]
        return torch.cat(parts, dim=0) if parts else None

    def prefix(self) -> list[PrefixEncoder]:
        return [self.prefix_encoder[n] for n in self._live() if n in self.prefix_encoder]


def _input_embedding_name(model: nn.Module, explicit: str | None) -> str:
    """The input embedding a soft prompt or prefix hangs on: ``explicit``, else the model's.

    Raises:
        ValueError: an encoder-decoder model (T5, BART's ``…ForConditionalGeneration``): the hook prepended the
            prompt to the encoder's input alone and the file named ``CAUSAL_LM``; PEFT's ``SEQ_2_SEQ_LM`` layout
            (virtual tokens for the encoder and the decoder) is not implemented.
    """
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(f"soft prompts and prefixes: {type(model).__name__} is an encoder-decoder model "
                         "(config.is_encoder_decoder); alignlab's prompt and prefix tuning take decoder-only and "
                         "encoder-only models (PEFT's SEQ_2_SEQ_LM layout is not implemented)")
    if explicit is not None:
        try:
            model.get_submodule(explicit)
        except AttributeError:
            raise ValueError(f"embedding_module: no module named {explicit!r} in this model") from None
        return explicit
    emb = hf_embedding(model)
    for name, module in model.named_modules():
        if emb is not None and (module is emb or (isinstance(module, SoftPromptEmbedding) and module.base_layer is emb)):
            return name
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, SoftPromptEmbedding)):
            return name
    raise ValueError("no input embedding found; pass embedding_module='<dotted name>'")


def _holder(model: nn.Module) -> SoftPromptEmbedding | None:
    for module in model.modules():
        if isinstance(module, SoftPromptEmbedding):
            return module
    return None


def _soft_prompt_hook(model: nn.Module, args: tuple, kwargs: dict):
    holder = _holder(model)
    if holder is None:
        return None
    prompt, prefixes = holder.prompt(), holder.prefix()
    if prompt is None and not prefixes:
        return None
    kwargs = dict(kwargs)
    if args:
        if len(args) > 1:
            raise ValueError("soft prompts: pass everything but input_ids as keyword arguments")
        kwargs["input_ids"] = args[0]
    _check_2d_mask(kwargs.get("attention_mask"))
    cache_key, cache = find_cache(kwargs)
    if kwargs.get("use_cache") is False and cache is not None:
        # generate(use_cache=False) still hands back the cache the previous step returned (ours, for prefix
        # tuning) with the whole sequence as input: a recompute, so the stale cache must not be extended
        kwargs[cache_key], cache = None, None
    if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
        # incremental decoding: the virtual tokens are already in the cache; the caller's mask and
        # positions count only real tokens, so shift them past the virtual ones
        n = (0 if prompt is None else prompt.shape[0]) + sum(p.n for p in prefixes)
        return (), _shift_for_virtual(kwargs, n, n)
    ids = kwargs.get("input_ids")
    if ids is not None and getattr(ids, PLACEHOLDERS_ATTR, 0):
        ids = ids[:, getattr(ids, PLACEHOLDERS_ATTR):]
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        if ids is None:
            raise ValueError("soft prompts need input_ids or inputs_embeds")
        embeds = holder.base_layer(ids)
    batch, device = embeds.shape[0], embeds.device
    n_prompt = 0 if prompt is None else prompt.shape[0]
    n_prefix = sum(p.n for p in prefixes)
    if prompt is not None:
        seq = embeds.shape[1]
        embeds = torch.cat([prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
        labels = kwargs.get("labels")
        # per-token labels gain -100 at the virtual tokens; a sequence classifier's (batch,) labels, or
        # float multi-label targets, describe the sequence and stay as they are (as in PEFT)
        if labels is not None and labels.dim() >= 2 and labels.shape[1] == seq and not labels.is_floating_point():
            kwargs["labels"] = torch.cat([labels.new_full((batch, n_prompt), -100), labels], dim=1)
        if kwargs.get("token_type_ids") is not None:  # BERT-style segment ids: the virtual tokens are segment 0
            types = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, n_prompt), types], dim=1)
        for key in ("position_ids", "cache_position"):  # the virtual tokens take positions 0..n-1
            if kwargs.get(key) is not None:
                pos = kwargs[key]
                head = torch.arange(n_prompt, device=device, dtype=pos.dtype)
                kwargs[key] = torch.cat([head.expand(*pos.shape[:-1], -1), pos + n_prompt], dim=-1)
    if prefixes:
        _refuse_checkpointed_prefix(model)
        # the prefixes become the cache, under the name the caller used (else the one the model declares);
        # an empty cache the caller passed (generate's first step) is replaced, never passed twice
        for key in CACHE_KEYWORDS:
            kwargs.pop(key, None)
        kwargs[cache_key or cache_keyword(model)] = _prefix_cache(model, prefixes, batch, embeds.dtype)
        for key in ("position_ids", "cache_position"):
            if kwargs.get(key) is not None:
                kwargs[key] = kwargs[key] + n_prefix
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n_prompt + n_prefix), mask], dim=1)
    kwargs["input_ids"] = None
    kwargs["inputs_embeds"] = embeds
    return (), kwargs


def _check_2d_mask(mask: torch.Tensor | None) -> None:
    # the virtual tokens are added as columns of ones to a (batch, seq) padding mask; a prepared 4-D mask (which
    # generate builds for a static cache) would need rows and columns for them, and its length is the static cache's
    if mask is not None and mask.dim() != 2:
        raise ValueError(f"soft prompts need a 2-D attention_mask (batch, seq), got shape {tuple(mask.shape)}: "
                         "generate(cache_implementation='static') and hand-built 4-D masks are not supported with "
                         "prompt or prefix tuning; use generate's default (dynamic) cache and a padding mask")


def _refuse_checkpointed_prefix(model: nn.Module) -> None:
    # a checkpointed HF layer drops the KV cache it is given while training (a replay would write it twice), so
    # the prefixes would vanish while the mask still counts them: a shape error deep in attention, or worse.
    # transformers 5.0 drops it in training mode under no_grad too (newer releases only when grad is on): refused
    # in training mode whatever the grad mode, so the rule is the same on every supported release
    if any(getattr(m, "gradient_checkpointing", False) is True and m.training for m in model.modules()):
        raise ValueError("prefix tuning does not work with gradient checkpointing while training: transformers "
                         "drops the KV cache that holds the prefixes in checkpointed layers; call "
                         "model.activation_checkpointing_disable() (gradient_checkpointing_disable() in older "
                         "transformers); prompt tuning works with checkpointing")


def _shift_for_virtual(kwargs: dict, n_mask: int, n_pos: int) -> dict:
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n_mask), mask], dim=1)
    for key in ("position_ids", "cache_position"):
        if kwargs.get(key) is not None:
            kwargs[key] = kwargs[key] + n_pos
    return kwargs


def _kv_layout(model: nn.Module) -> tuple[int, int, int]:
    """``(num_layers, kv_heads, head_dim)`` from an HF config."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError("prefix tuning needs an HF model with a .config (num_hidden_layers, num_attention_heads)")
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv, head_dim


def _prefix_cache(model: nn.Module, prefixes: list[PrefixEncoder], batch: int, dtype: torch.dtype):
    from transformers import DynamicCache

    layers, kv, head_dim = _kv_layout(model)
    per_layer = []
    for enc in prefixes:
        flat = enc().to(dtype)  # (n, 2·L·d_kv) laid out as [layer][k|v][head][head_dim]
        per_layer.append(flat.view(enc.n, layers * 2, kv, head_dim).permute(1, 2, 0, 3))  # (2L, kv, n, hd)
    stacked = torch.cat(per_layer, dim=2)
    cache = DynamicCache()
    for layer in range(layers):
        k = stacked[2 * layer].unsqueeze(0).expand(batch, -1, -1, -1)
        v = stacked[2 * layer + 1].unsqueeze(0).expand(batch, -1, -1, -1)
        cache.update(k, v, layer)
    return cache


def _task_model_hook(model: nn.Module, args: tuple, kwargs: dict):
    """On a task model around the hooked backbone: give its per-token ``labels`` ``-100`` at the virtual tokens
    (the backbone's hook adds the tokens themselves, so ``model.model(...)`` calls get them too). A
    ``…ForSequenceClassification`` also gets ``n`` placeholder columns in front of its ``input_ids``, which the
    backbone's hook drops again: transformers' decoder classifiers (Llama, Qwen2, GPT-2, ...) pool the logits at the
    last non-pad position of ``input_ids``, which without them pointed ``n`` positions short in the prompted sequence
    (a real token further back, or a virtual one)."""
    holder = _holder(model)
    prompt = None if holder is None else holder.prompt()
    if prompt is None:
        return None
    cache_key, cache = find_cache(kwargs)
    if cache is not None and kwargs.get("use_cache") is not False and hasattr(cache, "get_seq_length") \
            and cache.get_seq_length() > 0:
        return None  # incremental decoding: no virtual tokens in this call
    n = prompt.shape[0]
    ids = args[0] if args else kwargs.get("input_ids")
    tokens = ids if ids is not None else kwargs.get("inputs_embeds")
    kwargs = dict(kwargs)
    labels = kwargs.get("labels")
    if labels is not None and tokens is not None and labels.dim() >= 2 and labels.shape[1] == tokens.shape[1] \
            and not labels.is_floating_point():  # sequence-level labels (a classifier's) stay as they are
        kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], n), -100), labels], dim=1)
    if ids is not None and type(model).__name__.endswith("ForSequenceClassification"):
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        padded = torch.cat([ids.new_full((ids.shape[0], n), 1 if pad == 0 else 0), ids], dim=1)  # never the pad id
        setattr(padded, PLACEHOLDERS_ATTR, n)
        if args:
            args = (padded, *args[1:])
        else:
            kwargs["input_ids"] = padded
    return args, kwargs


def _backbone(model: nn.Module) -> nn.Module:
    """The module whose forward embeds the input ids: the innermost module above the input embedding whose forward
    takes ``inputs_embeds`` and ``attention_mask`` (``model.model`` of a ``LlamaForCausalLM``, which the fused losses
    call directly for hidden states; ``model.model.decoder`` of an ``OPTForCausalLM`` or a ``BartForCausalLM``,
    whose task heads call that decoder directly, so a hook on ``base_model`` never ran there and the prompt was
    silently left out), else ``model`` itself."""
    holder = next((n for n, m in model.named_modules() if isinstance(m, SoftPromptEmbedding)), None)
    if holder is None:
        return model
    parts = holder.split(".")
    for depth in range(len(parts) - 1, 0, -1):  # innermost ancestor first; the root is the fallback
        module = model.get_submodule(".".join(parts[:depth]))
        if _embeds_and_masks(module):
            return module
    return model


def _embeds_and_masks(module: nn.Module) -> bool:
    """Whether ``module.forward`` declares ``inputs_embeds`` and ``attention_mask`` (a backbone or decoder stack; an
    embeddings block such as BERT's takes no mask)."""
    import inspect

    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return "inputs_embeds" in params and "attention_mask" in params


def _attach_hook(model: nn.Module) -> None:
    backbone = _backbone(model)
    if getattr(backbone, HOOK_ATTR, None) is None:
        object.__setattr__(backbone, HOOK_ATTR, backbone.register_forward_pre_hook(_soft_prompt_hook, with_kwargs=True))
    if backbone is not model and getattr(model, HOOK_ATTR, None) is None:
        object.__setattr__(model, HOOK_ATTR, model.register_forward_pre_hook(_task_model_hook, with_kwargs=True))


def _wrap_embedding(model: nn.Module, name: str) -> SoftPromptEmbedding:
    from alignlab.adapters.inject import _set_submodule

    module = model.get_submodule(name)
    if isinstance(module, SoftPromptEmbedding):
        return module
    holder = SoftPromptEmbedding(module)
    _set_submodule(model, name, holder)
    return holder


def _check_decoder_only(raw: dict) -> None:
    submodules = peft_field(raw, "num_transformer_submodules", "int", 1)
    if submodules != 1:
        raise ValueError(f"adapter_config.json: num_transformer_submodules={submodules} is PEFT's encoder-decoder layout "
                         f"(task_type {raw.get('task_type')!r}, SEQ_2_SEQ_LM: virtual tokens for the encoder and the "
                         "decoder), which alignlab's prompt and prefix tuning do not implement; decoder-only and "
                         "encoder-only models (num_transformer_submodules=1) are supported")


#: the PEFT task types whose wrappers prepend a soft prompt (a plain ``PeftModel``, task type None, runs the
#: base model without it)
PROMPT_TASK_TYPES = ("CAUSAL_LM", "FEATURE_EXTRACTION", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


def _check_task_type(task_type) -> str | None:
    if task_type is not None and task_type not in PROMPT_TASK_TYPES:
        raise ValueError(f"task_type must be None (taken from the model) or one of {PROMPT_TASK_TYPES}, got {task_type!r}")
    return task_type


def _init_fields(init: str, text: str | None = None, tokenizer: str | None = None,
                 kwargs: dict | None = None) -> dict:
    """The four ``adapter_config.json`` fields of PEFT's prompt-tuning init."""
    return {"prompt_tuning_init": init, "prompt_tuning_init_text": text, "tokenizer_name_or_path": tokenizer,
            "tokenizer_kwargs": kwargs}


def _peft_init_from_file(raw: dict) -> dict | None:
    """A PEFT file's init fields, to be written back as they were; None where they are not a valid PEFT init (PEFT's
    ``TEXT`` needs the text and a tokenizer name), and the config's own are written then."""
    init, text = raw.get("prompt_tuning_init"), raw.get("prompt_tuning_init_text")
    name = raw.get("tokenizer_name_or_path")
    if init == "TEXT" and isinstance(text, str) and isinstance(name, str) and name:
        kwargs = raw.get("tokenizer_kwargs")
        return _init_fields("TEXT", text, name, kwargs if isinstance(kwargs, dict) else None)
    return _init_fields(init) if init in ("SAMPLE_VOCAB", "RANDOM") else None


def _task_from_peft(raw: dict) -> dict:
    """``task_type`` and ``modules_to_save`` of a PEFT prompt-learning file: the file's task decides whether it holds a
    head (another task, or none, reads as ``CAUSAL_LM``); PEFT lists its heads once per wrapper it built, so the names
    are deduplicated."""
    task = raw.get("task_type")
    saved = check_modules_to_save(raw.get("modules_to_save"))
    return {"task_type": task if task in PROMPT_TASK_TYPES else "CAUSAL_LM",
            "modules_to_save": list(dict.fromkeys(saved)) if saved else None}


def _prompt_task(model: nn.Module, task_type: str | None) -> str:
    """The PEFT task type a soft-prompt file of ``model`` names: ``task_type`` where given, else the model's head
    (``…ForSequenceClassification`` → ``SEQ_CLS`` etc.), else ``CAUSAL_LM`` for a model that generates and
    ``FEATURE_EXTRACTION`` for a bare backbone (PEFT's causal-LM wrapper needs generate's hooks)."""
    from alignlab.adapters.config import TASK_HEADS
    from alignlab.adapters.io import _model_identity

    if task_type is not None:
        return task_type
    task = _model_identity(model).get("task_type")
    if task in TASK_HEADS:
        return task
    return "CAUSAL_LM" if hasattr(model, "prepare_inputs_for_generation") else "FEATURE_EXTRACTION"


def _saved_with_prompt(model: nn.Module, config) -> list[str] | None:
    """The modules a soft-prompt adapter trains in full (a copy per adapter, see :class:`SavedModule`): the config's
    ``modules_to_save`` and, as PEFT's task wrappers add them, the head of its task
    (:func:`~alignlab.adapters.config.task_heads`).

    Raises:
        ValueError: the task needs a head the model lacks (not for a config read from a file: PEFT loads such a file,
            having trained no head), or a named module is or holds the input embedding that carries the prompt (its
            trained copy would run without it).
    """
    # a config read from a PEFT file takes the file's list, as the LoRA family's does (config.with_task_heads): PEFT
    # wrote its task's heads there and trained none on a model without them (XLNet's head is logits_proj)
    try:
        heads = task_heads(model, _prompt_task(model, config.task_type), required=not read_from_file(config))
    except ValueError as e:
        raise ValueError(f"{e}; name its head in modules_to_save and pass task_type='FEATURE_EXTRACTION' (PEFT's "
                         "wrapper for that task runs the whole model, head included)") from None
    names = list(dict.fromkeys(list(config.modules_to_save or []) + heads))
    if not names:
        return None
    from alignlab.adapters.config import saved_module_matches

    embedding = _input_embedding_name(model, config.embedding_module)
    holding = [n for n, _ in model.named_modules() if n and saved_module_matches(names, n)
               and (embedding == n or embedding.startswith(n + "."))]
    if holding:
        raise ValueError(f"modules_to_save: {holding[0]!r} is or holds the input embedding {embedding!r} that carries "
                         "the soft prompt, and cannot be trained in full next to it; name modules outside it")
    return names


def _check_seed(seed) -> int:
    if not is_int(seed):  # torch.manual_seed would truncate 1.5, or fail only at inject on "1"
        raise TypeError(f"seed must be an int, got {seed!r}")
    return int(seed)


def _check_virtual_tokens(n) -> int:
    return check_positive_int(n, "num_virtual_tokens")


@dataclass
class PromptTuningConfig:
    """Settings for ``inject(model, PromptTuningConfig(...))``.

    Args:
        num_virtual_tokens: ``n`` (> 0).
        init_token_ids: initialise from the embeddings of these token ids (e.g. a tokenized task
            description), repeated or cut to ``n``; ``None`` samples ``n`` random vocabulary rows.
        seed: seed of the random initialisation.
        embedding_module: dotted name of the input embedding (default: ``get_input_embeddings()``).
        task_type: the PEFT task type (one of :data:`PROMPT_TASK_TYPES`); ``None`` takes it from the model:
            ``SEQ_CLS`` / ``TOKEN_CLS`` / ``QUESTION_ANS`` for an HF classifier or QA model, ``CAUSAL_LM`` for a
            model that generates, ``FEATURE_EXTRACTION`` for a bare backbone. As with PEFT's task wrappers, the
            three head tasks train the model's head (``classifier`` / ``score``, ``qa_outputs``) in full next to
            the prompt, a copy per adapter, saved with it; ``"FEATURE_EXTRACTION"`` on a classifier keeps its head
            frozen and out of the file.
        modules_to_save: further modules trained in full next to the prompt, matched as in ``LoRAConfig``
            (a name suffix); the task's head is added to them, as PEFT adds it.
    Raises:
        ValueError: ``n ≤ 0``, empty or out-of-vocabulary ``init_token_ids`` (a list, tuple or 1-D tensor of ids),
            an unknown ``task_type``; at ``inject``, a head task on a model without that head (a config read from a
            PEFT file loads there as in PEFT, with no head trained), and
            ``modules_to_save`` naming no module or the one that holds the input embedding.
        TypeError: a ``seed`` that is not an int, ``modules_to_save`` that is not a list of names.
    """

    peft_type = "PROMPT_TUNING"

    num_virtual_tokens: int = 20
    init_token_ids: list[int] | None = None
    seed: int = 0
    embedding_module: str | None = None
    task_type: str | None = None
    modules_to_save: list[str] | None = None

    # PEFT's prompt-learning model holds the transformers model itself as ``base_model`` (no tuner model between), so
    # its saved modules are keyed ``base_model.<module>.<param>``
    peft_key_prefix = "base_model."
    # PEFT's init fields of adapter_config.json when known (from_text with a named tokenizer, or a PEFT file); not a
    # dataclass field: it records where the prompt came from and changes nothing in it
    _peft_init = None

    def __post_init__(self) -> None:
        self.num_virtual_tokens = _check_virtual_tokens(self.num_virtual_tokens)
        self.seed = _check_seed(self.seed)
        self.task_type = _check_task_type(self.task_type)
        self.modules_to_save = check_modules_to_save(self.modules_to_save)
        if self.init_token_ids is not None:
            ids = self.init_token_ids
            if getattr(ids, "ndim", None) == 1:  # a tokenizer's tensor / array of ids
                ids = ids.tolist()
            if not isinstance(ids, (list, tuple)) or not ids or not all(is_int(t) for t in ids):
                kind = ArgumentTypeError if not isinstance(ids, (list, tuple)) or ids else ValueError
                raise kind(f"init_token_ids must be a non-empty list of ints, got {self.init_token_ids!r}")
            self.init_token_ids = [int(t) for t in ids]

    @classmethod
    def from_text(cls, text: str, tokenizer, num_virtual_tokens: int = 20, **kwargs) -> "PromptTuningConfig":
        """Initialise the prompt from the embeddings of ``text`` (Lester et al.'s class-label / text init; PEFT's
        ``prompt_tuning_init="TEXT"``).

        ``text`` is tokenized as PEFT tokenizes it, ``tokenizer(text)["input_ids"]``: with the special tokens the
        tokenizer adds by default (Llama's ``<s>``, BERT's ``[CLS]`` … ``[SEP]``), so the initial prompt is PEFT's
        for the same text, tokenizer and ``n``: the ids repeated, specials included, or cut to ``n``. (For the ids
        without specials, pass ``init_token_ids=tokenizer(text, add_special_tokens=False)["input_ids"]``.)
        ``tokenizer`` is any callable returning ``{"input_ids": [...]}`` (e.g. an HF tokenizer). Where it has a
        ``name_or_path`` (an HF tokenizer loaded by name or from a folder), ``save_adapter`` writes
        ``prompt_tuning_init="TEXT"`` with the text and that name, as PEFT does.

        Raises:
            TypeError: ``text`` is not a string, ``tokenizer`` is not callable.
            ValueError: ``text`` tokenizes to nothing.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        if not callable(tokenizer):
            raise TypeError(f"tokenizer must be callable (text -> {{'input_ids': [...]}}), "
                            f"got {type(tokenizer).__name__}")
        ids = tokenizer(text)["input_ids"]
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if not ids:
            raise ValueError(f"text {text!r} produced no tokens")
        config = cls(num_virtual_tokens=num_virtual_tokens, init_token_ids=ids, **kwargs)
        name = getattr(tokenizer, "name_or_path", None)
        if isinstance(name, str) and name:  # PEFT's TEXT init needs a tokenizer it can load by that name
            config._peft_init = _init_fields("TEXT", text, name)
        return config

    def find_targets(self, model: nn.Module) -> list[str]:
        return [_input_embedding_name(model, self.embedding_module)]

    def modules_to_save_for(self, model: nn.Module) -> list[str] | None:
        """What ``inject`` trains in full on ``model``: ``modules_to_save`` plus the task's head."""
        return _saved_with_prompt(model, self)

    def _init(self, holder: SoftPromptEmbedding) -> torch.Tensor:
        table = holder.base_layer.weight
        vocab = table.shape[0]
        if self.init_token_ids is None:
            g = torch.Generator().manual_seed(self.seed)
            ids = torch.randint(0, vocab, (self.num_virtual_tokens,), generator=g)
        else:
            if max(self.init_token_ids) >= vocab or min(self.init_token_ids) < 0:
                raise ValueError(f"init_token_ids must be in [0, {vocab}), got {self.init_token_ids}")
            reps = -(-self.num_virtual_tokens // len(self.init_token_ids))
            ids = torch.tensor((self.init_token_ids * reps)[: self.num_virtual_tokens])
        return table.detach()[ids.to(table.device)]

    def new_layer(self, module: nn.Module, name: str, adapter_name: str) -> SoftPromptEmbedding:
        holder = SoftPromptEmbedding(module)
        holder.add_prompt(adapter_name, self._init(holder))
        return holder

    def add_to(self, layer: nn.Module, name: str, adapter_name: str) -> None:
        if not isinstance(layer, SoftPromptEmbedding):
            raise ValueError(f"module {name!r} already holds a {type(layer).__name__}; cannot add a soft prompt to it")
        layer.add_prompt(adapter_name, self._init(layer))

    def attach(self, model: nn.Module, adapter_name: str) -> None:
        _attach_hook(model)

    # -- PEFT format --------------------------------------------------------------------------------
    def extra_tensors(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": _holder(model).prompt_embeddings[adapter_name]}

    def peft_config_dict(self, model: nn.Module, adapter_name: str) -> dict:
        holder = _holder(model)
        cfg = getattr(model, "config", None)
        task = _prompt_task(model, self.task_type)
        return {
            "peft_type": "PROMPT_TUNING", "task_type": task, "base_model_name_or_path": None, "revision": None,
            "inference_mode": True, "num_virtual_tokens": self.num_virtual_tokens, "token_dim": holder.out_features,
            "num_transformer_submodules": 1, "num_attention_heads": getattr(cfg, "num_attention_heads", None),
            "num_layers": getattr(cfg, "num_hidden_layers", None), **self._peft_init_fields(),
            "modules_to_save": _saved_with_prompt(model, self),
        }

    def _peft_init_fields(self) -> dict:
        """How PEFT would initialise a fresh copy of this prompt (the file's weights replace it): ``TEXT`` with the
        text and tokenizer of :meth:`from_text` (or of the file this config came from), ``SAMPLE_VOCAB`` for random
        vocabulary rows (our random init), ``RANDOM`` for token ids given directly (PEFT has no such init)."""
        if self._peft_init is not None:
            return dict(self._peft_init)
        return _init_fields("SAMPLE_VOCAB" if self.init_token_ids is None else "RANDOM")

    @classmethod
    def from_peft(cls, raw: dict) -> "PromptTuningConfig":
        _check_decoder_only(raw)
        config = cls(num_virtual_tokens=peft_field(raw, "num_virtual_tokens", "int"), **_task_from_peft(raw))
        config._peft_init = _peft_init_from_file(raw)
        return mark_read_from_file(config)


@dataclass
class PrefixTuningConfig:
    """Settings for ``inject(model, PrefixTuningConfig(...))`` (HF decoder-only models).

    Args:
        num_virtual_tokens: prefix length ``n`` (> 0).
        prefix_projection: train through the reparameterisation MLP (Li & Liang §4.3).
        encoder_hidden_size: hidden width ``h`` of that MLP.
        init_std: std of the random initial prefix (or MLP input) embeddings.
        seed: seed of the initialisation.
        embedding_module: dotted name of the input embedding holding the prefixes.
        task_type: the PEFT task type, as for :class:`PromptTuningConfig` (None: from the model; a classifier's
            or QA model's head is trained in full next to the prefixes and saved with them, as in PEFT).
        modules_to_save: further modules trained in full, as for :class:`PromptTuningConfig`.
    Raises:
        ValueError: ``n ≤ 0``, ``encoder_hidden_size ≤ 0``, an ``init_std`` that is negative, NaN or
            infinite, an unknown ``task_type``, or a model without an HF config; at ``inject``, what
            :class:`PromptTuningConfig` raises there.
        TypeError: ``prefix_projection`` is not a bool, ``init_std`` not a real number, ``seed`` not an int,
            ``modules_to_save`` not a list of names.
    """

    peft_type = "PREFIX_TUNING"

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int = 512
    init_std: float = 1.0
    seed: int = 0
    embedding_module: str | None = None
    task_type: str | None = None
    modules_to_save: list[str] | None = None

    peft_key_prefix = PromptTuningConfig.peft_key_prefix

    def __post_init__(self) -> None:
        self.num_virtual_tokens = _check_virtual_tokens(self.num_virtual_tokens)
        self.task_type = _check_task_type(self.task_type)
        self.modules_to_save = check_modules_to_save(self.modules_to_save)
        self.prefix_projection = as_bool(self.prefix_projection, "prefix_projection")  # written to adapter_config.json
        self.init_std = check_finite_number(self.init_std, "init_std", minimum=0.0)
        self.encoder_hidden_size = check_positive_int(self.encoder_hidden_size, "encoder_hidden_size")
        self.seed = _check_seed(self.seed)
        self._layout: tuple[int, int, int] | None = None

    def find_targets(self, model: nn.Module) -> list[str]:
        _kv_layout(model)
        return [_input_embedding_name(model, self.embedding_module)]

    def modules_to_save_for(self, model: nn.Module) -> list[str] | None:
        """What ``inject`` trains in full on ``model``: ``modules_to_save`` plus the task's head."""
        return _saved_with_prompt(model, self)

    def _encoder(self, holder: SoftPromptEmbedding) -> PrefixEncoder:
        if self._layout is None:
            raise ValueError("PrefixTuningConfig.prepare(model, targets, name) must run first (inject does it)")
        layers, kv, head_dim = self._layout
        with torch.random.fork_rng(devices=[]):  # seeded without touching the global RNG
            torch.manual_seed(self.seed)
            enc = PrefixEncoder(self.num_virtual_tokens, layers, kv * head_dim,
                                self.encoder_hidden_size if self.prefix_projection else None, self.init_std)
        return enc

    def prepare(self, model: nn.Module, targets: list[str], adapter_name: str) -> None:
        self._layout = _kv_layout(model)

    def new_layer(self, module: nn.Module, name: str, adapter_name: str) -> SoftPromptEmbedding:
        holder = SoftPromptEmbedding(module)
        holder.add_prefix(adapter_name, self._encoder(holder))
        return holder

    def add_to(self, layer: nn.Module, name: str, adapter_name: str) -> None:
        if not isinstance(layer, SoftPromptEmbedding):
            raise ValueError(f"module {name!r} already holds a {type(layer).__name__}; cannot add a prefix to it")
        layer.add_prefix(adapter_name, self._encoder(layer))

    def attach(self, model: nn.Module, adapter_name: str) -> None:
        _attach_hook(model)

    # -- PEFT format --------------------------------------------------------------------------------
    def extra_tensors(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        enc = _holder(model).prefix_encoder[adapter_name]
        # with the MLP the file holds its output, the prefixes themselves (PEFT's inference format)
        return {"prompt_embeddings": enc.embedding if enc.transform is None else enc()}

    def peft_config_dict(self, model: nn.Module, adapter_name: str) -> dict:
        layers, kv, head_dim = _kv_layout(model)
        task = _prompt_task(model, self.task_type)
        return {
            "peft_type": "PREFIX_TUNING", "task_type": task, "base_model_name_or_path": None, "revision": None,
            "inference_mode": True, "num_virtual_tokens": self.num_virtual_tokens, "token_dim": kv * head_dim,
            "num_transformer_submodules": 1, "num_attention_heads": kv, "num_layers": layers,
            "encoder_hidden_size": self.encoder_hidden_size, "prefix_projection": self.prefix_projection,
            "init_weights": None, "modules_to_save": _saved_with_prompt(model, self),
        }

    @classmethod
    def from_peft(cls, raw: dict) -> "PrefixTuningConfig":
        _check_decoder_only(raw)
        num_virtual_tokens = peft_field(raw, "num_virtual_tokens", "int")
        if peft_field(raw, "prefix_projection", "bool", False):
            warnings.warn("loading a prefix trained with prefix_projection: the file holds the final prefixes, "
                          "so the reparameterisation MLP is not rebuilt", stacklevel=3)
        config = cls(num_virtual_tokens=num_virtual_tokens, prefix_projection=False, **_task_from_peft(raw))
        return mark_read_from_file(config)
