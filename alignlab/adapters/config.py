"""``LoRAConfig``: which modules get which LoRA / DoRA adapter; the checks every adapter config shares."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

# as_bool, check_finite_number, check_positive_* are re-exported: the other adapter configs import them from here
from alignlab._checks import (ArgumentTypeError, as_bool, as_python_number, check_finite_number, check_positive_int,
                              check_positive_number, is_int)
from alignlab.adapters.base import hf_embedding
from alignlab.adapters.experts import ExpertLoRA, find_expert_targets, fused_expert_parameters
from alignlab.adapters.lora import LoRALinear, _check_init, check_adapter_dtype, check_dropout  # re-exported too


@dataclass
class LoRAConfig:
    """Settings for :func:`alignlab.adapters.inject`.

    Args:
        r: default rank.
        alpha: default scaling numerator (``s = α/r``; ``α/√r`` with ``use_rslora``).
        dropout: dropout on the adapter input.
        target_modules: which ``nn.Linear`` leaves to adapt: ``"all-linear"`` (every linear except
            the output head), a regex string (full match on the module's dotted name), or a list of
            names/suffixes (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``). Default
            ``"all-linear"``, or ``[]`` (no linear) when ``target_parameters`` is given.
        target_parameters: fused 3-D expert weights of MoE blocks to adapt, one LoRA pair per expert
            (:class:`~alignlab.adapters.experts.ExpertLoRA`): dotted parameter names or suffixes, as
            PEFT's ``target_parameters`` (``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``).
        include_experts: with ``target_modules="all-linear"``, also adapt every fused expert weight
            (off by default: ``"all-linear"`` alone covers ``nn.Linear`` leaves only).
        exclude_modules: same forms as ``target_modules`` (except ``"all-linear"``); matches are skipped.
        rank_pattern / alpha_pattern: ``{regex: value}`` overrides; a pattern applies to a module whose
            name matches ``(^|.*\\.)pattern$``.
        use_rslora: rank-stabilised scaling.
        use_dora: DoRA instead of plain LoRA.
        init: ``"kaiming"``, ``"gaussian"``, ``"pissa"``, ``"pissa_niter_K"`` or ``"olora"``.
        modules_to_save: modules trained in full next to the adapters (e.g. ``["lm_head"]``): every module whose
            name ends with one of these strings, as in PEFT (a plain suffix: ``"classifier"`` takes DistilBERT's
            ``pre_classifier`` too).
        adapter_dtype: dtype of the adapter weights (default: fp32 on 16-bit or quantized bases).
        exact_fp32: adapter math in fp32, rounded once into the output, on the layers this config
            creates (default False: autocast semantics, the fast path; see ``LoRALinear``).
        trainable_token_indices: train only these rows of the input embedding (a list of token ids) or
            of named modules (``{"embed_tokens": [ids]}``), e.g. new special tokens; a tied output head
            shares the rows, under its LoRA if it is a target too (PEFT's option of that name; see
            :mod:`alignlab.adapters.embedding`).
        layers_to_transform / layers_pattern: PEFT's options of those names: with a list ``target_modules``, a
            module it selects by suffix is adapted only if its first numbered block (after ``layers_pattern``, e.g.
            ``"layers"``, when given) is ``layers_to_transform`` (an index or a list of them).
        ensure_weight_tying: LoRA on an embedding whose table an output head shares acts on the head too
            (``logits = x Eᵀ + s·(x B) A``, the same factors; PEFT's option of that name). Default False:
            the head keeps the frozen table, and merging unties the two.
        task_type: PEFT's task type (one of :data:`PEFT_TASK_TYPES`), with PEFT's meaning: ``"SEQ_CLS"`` and
            ``"TOKEN_CLS"`` also train the model's ``classifier`` / ``score`` head in full, ``"QUESTION_ANS"`` its
            ``qa_outputs`` (added to ``modules_to_save``, so never an adapter target), as PEFT's task wrappers do;
            the others add nothing. ``save_adapter`` writes it; ``None`` (the default, as in PEFT: no head trained)
            writes the model's task type where the file holds what PEFT reads for it.

    ``nn.Embedding`` modules named in ``target_modules`` get LoRA in PEFT's embedding layout
    (:class:`~alignlab.adapters.embedding.LoRAEmbedding`); ``"all-linear"`` never selects them.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "kaiming"
    modules_to_save: list[str] | None = None
    adapter_dtype: torch.dtype | None = None
    exact_fp32: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    ensure_weight_tying: bool = False
    # last, so that positional construction keeps its meaning
    target_parameters: list[str] | None = None
    include_experts: bool = False
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    task_type: str | None = None

    adapts_embeddings = True  # find_targets also offers nn.Embedding leaves to this config

    def __post_init__(self) -> None:
        # stored as Python numbers: a NumPy scalar from a sweep would not serialise into adapter_config.json
        self.r = check_positive_int(self.r, "r")
        self.alpha = check_positive_number(self.alpha, "alpha")
        self.dropout = check_dropout(self.dropout)
        _check_init(self.init)
        # stored as Python bools: json (adapter_config.json) cannot write a NumPy bool
        self.use_rslora = as_bool(self.use_rslora, "use_rslora")
        self.use_dora = as_bool(self.use_dora, "use_dora")
        check_adapter_dtype(self.adapter_dtype)
        self.exact_fp32 = as_bool(self.exact_fp32, "exact_fp32")
        if self.target_parameters is not None and (not _is_str_list(self.target_parameters) or not self.target_parameters):
            raise TypeError(f"target_parameters must be a non-empty list of parameter names, got {self.target_parameters!r}")
        if self.target_modules is None:
            self.target_modules = [] if self.target_parameters else "all-linear"
        self.include_experts = as_bool(self.include_experts, "include_experts")
        self.layers_to_transform, self.layers_pattern = _check_layers(self.layers_to_transform, self.layers_pattern,
                                                                      self.target_modules)
        if self.include_experts and self.target_modules != "all-linear":
            raise ValueError("include_experts extends target_modules='all-linear'; name expert weights with target_parameters instead")
        check_target_spec(self.target_modules, self.exclude_modules, allow_empty=bool(self.target_parameters))
        self.rank_pattern, self.alpha_pattern = check_patterns(self.rank_pattern, self.alpha_pattern)
        if self.modules_to_save is not None and not _is_str_list(self.modules_to_save):
            raise TypeError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        self.ensure_weight_tying = as_bool(self.ensure_weight_tying, "ensure_weight_tying")
        self.task_type = check_task_type(self.task_type)
        if self.trainable_token_indices is not None:
            from alignlab.adapters.embedding import check_token_indices

            spec = self.trainable_token_indices
            for key, ids in (spec.items() if isinstance(spec, dict) else [(None, spec)]):
                check_token_indices(ids, "trainable_token_indices" + ("" if key is None else f"[{key!r}]"))

    @property
    def rewrites_base_weight(self) -> bool:
        """Whether the initialisation writes into the base weight (PiSSA, OLoRA: ``W ← W − s·BA``); ``inject``
        then keeps a copy of each target's weight until every target took the adapter, to put back on failure."""
        return self.init != "kaiming" and self.init != "gaussian"

    # -- resolution per module ------------------------------------------------------------------
    def rank_for(self, name: str) -> int:
        return _pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        return _pattern_value(self.alpha_pattern, name, self.alpha)

    def expert_parameters(self, model: nn.Module) -> dict[str, list[str]]:
        """``{experts module name: [expert weight names]}`` this config adapts in ``model``."""
        if not self.target_parameters and not self.include_experts:
            return {}
        return find_expert_targets(model, self.target_parameters, self.include_experts)

    def _expert_args(self, module: nn.Module, name: str) -> tuple[dict[str, int], dict[str, float]]:
        """Ranks and alphas of the expert weights of ``module`` (at ``name``) that this config targets;
        rank/alpha patterns match the parameter's dotted name, as in PEFT."""
        params = [p for p in fused_expert_parameters(module)
                  if self.include_experts or name_matches(self.target_parameters, f"{name}.{p}")]
        return {p: self.rank_for(f"{name}.{p}") for p in params}, {p: self.alpha_for(f"{name}.{p}") for p in params}

    def new_layer(self, module: nn.Module, name: str, adapter_name: str) -> nn.Module:
        if fused_expert_parameters(module):
            return ExpertLoRA(module, *self._expert_args(module, name), self.dropout, self.init, self.use_rslora,
                              self.use_dora, adapter_name, self.adapter_dtype, self.exact_fp32)
        if isinstance(module, nn.Embedding):
            from alignlab.adapters.embedding import LoRAEmbedding

            self._check_embedding(name)
            return LoRAEmbedding(module, self.rank_for(name), self.alpha_for(name), self.use_rslora, adapter_name,
                                 self.adapter_dtype)
        return LoRALinear(module, self.rank_for(name), self.alpha_for(name), self.dropout, self.init,
                          self.use_rslora, self.use_dora, adapter_name, self.adapter_dtype, self.exact_fp32)

    def add_to(self, layer: nn.Module, name: str, adapter_name: str) -> None:
        from alignlab.adapters.embedding import LoRAEmbedding

        if isinstance(layer, LoRAEmbedding):
            self._check_embedding(name)
            layer.add_adapter(adapter_name, self.rank_for(name), self.alpha_for(name), self.use_rslora, self.adapter_dtype)
            return
        if isinstance(layer, ExpertLoRA):
            layer.add_adapter(adapter_name, *self._expert_args(layer.base_layer, name), self.dropout, self.init,
                              self.use_rslora, self.use_dora, self.adapter_dtype)
            return
        if not isinstance(layer, LoRALinear):
            raise ValueError(f"module {name!r} already holds a {type(layer).__name__}; cannot add a LoRA adapter to it")
        layer.add_adapter(adapter_name, self.rank_for(name), self.alpha_for(name), self.dropout, self.init,
                          self.use_rslora, self.use_dora, self.adapter_dtype)

    def _check_embedding(self, name: str) -> None:
        if self.use_dora:
            raise ValueError(f"use_dora: DoRA on the embedding {name!r} is not supported; leave it out of target_modules")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"init={self.init!r} is not supported on the embedding {name!r} (it starts with A = 0, "
                             "B ~ N(0, 1), as in PEFT)")

    # -- trainable token rows: checked before any layer is built, added after the LoRA layers -----------
    def prepare(self, model: nn.Module, targets: list[str], adapter_name: str) -> None:
        warn_embedding_read_elsewhere(model, targets)
        if self.ensure_weight_tying:
            from alignlab.adapters.embedding import check_heads_can_tie

            check_heads_can_tie(model, targets)
        if self.trainable_token_indices is not None:
            from alignlab.adapters.embedding import token_row_plan
            from alignlab.adapters.inject import _match_modules_to_save

            plan = token_row_plan(model, self.trainable_token_indices, set(targets), self.ensure_weight_tying)
            # the LoRA layers and modules_to_save wrappers come later: find the rows' modules (tied heads too) that
            # they would take, a head tied to a LoRA embedding under ensure_weight_tying included
            saved = _match_modules_to_save(model, self)
            modules = dict(model.named_modules())
            tables = [modules[t].weight for t in targets if isinstance(modules[t], nn.Embedding)]
            lora = set(targets) | {n for n, m in modules.items() if self.ensure_weight_tying
                                   and isinstance(m, nn.Linear) and any(m.weight is t for t in tables)}
            for module, _, heads in plan:
                if module in lora:
                    raise ValueError(f"trainable_token_indices: {module!r} also gets a LoRA adapter; a module takes "
                                     "either trainable token rows or LoRA (as in PEFT)")
                for head in sorted(set(heads) & lora):
                    self._check_lora_over_token_rows(head, module)
            for name in [n for module, _, heads in plan for n in (module, *heads)]:
                inside = [s for s in saved if name == s or name.startswith(s + ".")]
                if inside:
                    raise ValueError(f"trainable_token_indices: {name!r} is trained in full (modules_to_save "
                                     f"{inside[0]!r}); leave it out of one of the two")

    def _check_lora_over_token_rows(self, head: str, embedding: str) -> None:
        """LoRA on a head tied to an embedding with trainable token rows: the rows go under the LoRA (``logits =
        x W'ᵀ + s·B A x``, ``W'`` the table with the trained rows), as PEFT nests them. Refused where the LoRA would
        read the frozen table instead of ``W'`` (DoRA's weight norm; PiSSA/OLoRA, which would also rewrite the shared
        table, ``inject`` refuses on any tied head) and under ``ensure_weight_tying``, which PEFT reads as "move the
        head's LoRA onto the embedding" (it then fails)."""
        what = "ensure_weight_tying=True" if self.ensure_weight_tying else "use_dora=True" if self.use_dora else None
        if what is None:
            return
        raise ValueError(f"trainable_token_indices: the head {head!r} tied to {embedding!r} also gets a LoRA adapter, "
                         f"and with {what} that is not supported (PEFT 0.21 supports LoRA on a tied head over trainable "
                         "token rows only as plain LoRA, without ensure_weight_tying); drop that option, or leave the "
                         "head out of target_modules")

    def attach(self, model: nn.Module, adapter_name: str) -> None:
        active = adapter_name in (getattr(model, "alignlab_active_adapters", None) or [])
        tied = []
        if self.ensure_weight_tying:
            from alignlab.adapters.embedding import tie_lora_heads

            tied = tie_lora_heads(model, adapter_name, active)
        if self.trainable_token_indices is not None:
            from alignlab.adapters.embedding import add_trainable_tokens

            add_trainable_tokens(model, self.trainable_token_indices, adapter_name, active, self.adapter_dtype,
                                 self.ensure_weight_tying)
        elif self.ensure_weight_tying and not tied:
            import warnings

            warnings.warn(f"ensure_weight_tying=True tied nothing for adapter {adapter_name!r}: alignlab ties an output "
                          "head to a LoRA on the input embedding whose table it shares (target the embedding, e.g. "
                          "'embed_tokens'); a LoRA on the head itself or a head in modules_to_save trains untied here "
                          "(PEFT 0.21 ties those), and save_adapter writes ensure_weight_tying=false",
                          RuntimeWarning, stacklevel=3)


def _check_layers(layers, pattern, target_modules):
    """``layers_to_transform`` / ``layers_pattern`` checked (``ValueError`` / ``TypeError`` naming them); next to a regex
    string ``target_modules`` they are refused, as PEFT's ``LoraConfig`` refuses them."""
    if isinstance(layers, list) and not layers:
        layers = None
    if layers is not None:
        ok = is_int(layers) and layers >= 0 or isinstance(layers, (list, tuple)) and all(is_int(i) and i >= 0 for i in layers)
        if not ok:
            raise ValueError(f"layers_to_transform must be a layer index or a list of them, got {layers!r}")
        layers = int(layers) if is_int(layers) else [int(i) for i in layers]
        if isinstance(target_modules, str):
            raise ValueError("layers_to_transform works with a list target_modules, not a regex string (as in PEFT); "
                             f"put the layer indices into the regex {target_modules!r} instead")
    if pattern is not None and not isinstance(pattern, str) and not _is_str_list(pattern):
        raise TypeError(f"layers_pattern must be a name or a list of names, got {pattern!r}")
    return layers, pattern


def layer_selected(config, name: str) -> bool:
    """Whether ``name`` (selected by a ``target_modules`` suffix) passes ``layers_to_transform``: PEFT 0.21's rule,
    the first numbered segment (after one of ``layers_pattern``) is one of the indices."""
    layers = getattr(config, "layers_to_transform", None)
    if layers is None:
        return True
    pattern = getattr(config, "layers_pattern", None)
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def warn_embedding_read_elsewhere(model: nn.Module, targets: list[str], saved: bool = False) -> None:
    """``RuntimeWarning`` for LoRA on the input embedding (``saved``: a ``modules_to_save`` copy of it) when other,
    untargeted embedding modules hold its table: the update reaches only calls of the targeted module. transformers
    5's T5 keeps ``encoder.embed_tokens`` and ``decoder.embed_tokens`` beside ``shared`` over one table, and only they
    run in forward, so LoRA on ``shared``, or a trained copy of it (as PEFT builds both), trains nothing and changes no
    output."""
    source = hf_embedding(model)
    modules = dict(model.named_modules())
    for name in targets:
        emb = modules.get(name)
        if not isinstance(emb, nn.Embedding) or emb is not source:
            continue
        others = [n for n, m in modules.items() if n and n not in targets and m is not emb
                  and isinstance(m, nn.Embedding) and m.weight is emb.weight]
        if others:
            import warnings

            what, acts, hint = (("modules_to_save: the embedding", "the trained copy acts", "name")
                                if saved else ("LoRA on the embedding", "the update acts", "target"))
            warnings.warn(f"{what} {name!r}: its table is also held by {others}, which keep the frozen table; {acts} "
                          f"only where {name!r} itself is called (on T5, 'shared' is not: {hint} 'embed_tokens' "
                          "instead)", RuntimeWarning, stacklevel=4)


def check_modules_to_save(modules_to_save) -> list[str] | None:
    """``modules_to_save`` as a list of module names (or None); ``TypeError`` naming the argument otherwise."""
    if modules_to_save is None:
        return None
    if not _is_str_list(modules_to_save):
        raise TypeError(f"modules_to_save must be a list of module names, got {modules_to_save!r}")
    return list(modules_to_save)


#: PEFT's task types (its ``TaskType``), the values ``task_type`` takes in the adapter configs and their files
PEFT_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
#: the heads PEFT's task wrappers add to ``modules_to_save`` for these task types (a name suffix each, so the model
#: has one of the two classifier names), and whose trained copies their files therefore hold
# PEFT 0.22's CLASSIFIER_MODULE_NAMES: "pre_classifier" (DistilBERT's randomly initialised layer before its classifier)
# named, now that an entry no longer matches any name ending with it ("classifier" took it until PEFT 0.21)
TASK_HEADS = {"SEQ_CLS": ["classifier", "score", "pre_classifier"], "TOKEN_CLS": ["classifier", "score", "pre_classifier"],
              "QUESTION_ANS": ["qa_outputs"]}


def check_task_type(task_type, arg: str = "task_type", accepted: tuple[str, ...] = PEFT_TASK_TYPES) -> str | None:
    """``task_type`` as it is (None or one of ``accepted``); ``ValueError`` naming ``arg`` and the accepted values
    otherwise (PEFT's ``PeftConfig`` refuses the same values)."""
    if task_type is not None and (not isinstance(task_type, str) or task_type not in accepted):
        raise ValueError(f"{arg} must be None or one of {accepted}, got {task_type!r}")
    return task_type


def task_heads(model: nn.Module, task_type: str | None, required: bool = True) -> list[str]:
    """The ``modules_to_save`` entries PEFT's wrapper for ``task_type`` adds that ``model`` has (``classifier`` or
    ``score`` for ``SEQ_CLS`` / ``TOKEN_CLS``, ``qa_outputs`` for ``QUESTION_ANS``); none for the other tasks.

    Raises:
        ValueError: ``required`` and the task needs such a head that ``model`` lacks (PEFT trains nothing then, and
            says nothing: a head named otherwise, BART's ``classification_head``, stays frozen).
    """
    wanted = TASK_HEADS.get(task_type, [])
    names = [n for n, _ in model.named_modules() if n]
    heads = [w for w in wanted if any(saved_module_matches([w], n) for n in names)]
    if required and wanted and not heads:
        heads_ = ", ".join(wanted[:-1]) + " or " + wanted[-1] if len(wanted) > 1 else wanted[0]
        raise ValueError(f"task_type {task_type!r}: PEFT trains the model's {heads_} head and reads it "
                         f"from the file, and this {type(model).__name__} has none")
    return heads


def with_task_heads(model: nn.Module, config) -> list[str] | None:
    """What a LoRA-family config trains in full on ``model`` (what :func:`alignlab.adapters.inject` and
    ``save_adapter`` take for it): its ``modules_to_save`` and, as PEFT's task wrappers add it, the head of its
    ``task_type`` (:func:`task_heads`). A config read from a file takes the file's list as it is: PEFT wrote the
    task's heads into it, and a model without them (BART's head is ``classification_head``) trained none.

    Raises:
        ValueError: a user's ``task_type`` needs a head the model lacks (name the head in ``modules_to_save``
            and leave ``task_type`` None: ``save_adapter`` still writes the model's task type).
    """
    try:
        heads = task_heads(model, config.task_type, required=not read_from_file(config))
    except ValueError as e:
        raise ValueError(f"{e}; name its head in modules_to_save and leave task_type None (save_adapter still writes "
                         "the model's task type)") from None
    names = list(dict.fromkeys(list(config.modules_to_save or []) + heads))
    return names or None


def task_type_from_file(config, raw: dict):
    """``config`` (built from a PEFT ``adapter_config.json`` ``raw``) with the file's ``task_type``, checked
    (``ValueError`` naming it, as PEFT refuses such a file) and marked as read from a file (:func:`with_task_heads`)."""
    config.task_type = check_task_type(raw.get("task_type"), "adapter_config.json: task_type")
    return mark_read_from_file(config)


def mark_read_from_file(config):
    """``config``, marked as built from a PEFT ``adapter_config.json``: the head of its task is then taken from the
    file's ``modules_to_save`` alone, never required of the model (:func:`with_task_heads`; the soft-prompt configs
    too), since PEFT loads a file for a model whose head its task wrapper did not find, and trained none there."""
    config._task_type_from_file = True
    return config


def read_from_file(config) -> bool:
    """Whether :func:`mark_read_from_file` marked ``config``."""
    return getattr(config, "_task_type_from_file", False)


def check_nonzero_number(value, arg: str, why: str) -> float:
    """``value`` as a Python float (:func:`check_finite_number`); ``ValueError`` naming ``arg`` if it is 0, where
    ``why`` says how 0 leaves the adapter a no-op that no gradient can move."""
    value = check_finite_number(value, arg)
    if value == 0:
        raise ValueError(f"{arg} must be non-zero: {why}")
    return value


def check_target_spec(target_modules, exclude_modules, allow_all_linear: bool = True, allow_empty: bool = False) -> None:
    """Validate ``target_modules`` / ``exclude_modules`` in the forms :func:`find_targets` accepts
    (an empty list only with ``allow_empty``: other targets are named elsewhere)."""
    if isinstance(target_modules, str):
        if not (allow_all_linear and target_modules == "all-linear"):
            _compile("target_modules", target_modules)
    elif not _is_str_list(target_modules) or not (target_modules or allow_empty):
        kinds = "'all-linear', a regex string" if allow_all_linear else "a regex string"
        raise TypeError(f"target_modules must be {kinds} or a non-empty list of names, got {target_modules!r}")
    if isinstance(exclude_modules, str):
        if exclude_modules == "all-linear":  # read as a regex it matched nothing: a warning, and no layer excluded
            raise ValueError("exclude_modules='all-linear' would exclude every target; name the modules to skip")
        _compile("exclude_modules", exclude_modules)
    elif exclude_modules is not None and not _is_str_list(exclude_modules):
        raise TypeError(f"exclude_modules must be a regex string or a list of names, got {exclude_modules!r}")


def check_patterns(rank_pattern: dict, alpha_pattern: dict) -> tuple[dict[str, int], dict[str, float]]:
    """``{regex: value}`` overrides: valid regexes, positive integer ranks, positive finite alphas.

    Returns copies holding Python numbers (NumPy scalars are accepted, and would not serialise to JSON)."""
    for name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(pattern, dict):
            raise TypeError(f"{name} must be a dict {{regex: value}}, got {type(pattern).__name__}")
        for key, value in pattern.items():
            _compile(name, key)
            check_positive_number(value, f"{name}[{key!r}]")
            if name == "rank_pattern" and not is_int(value):
                raise ArgumentTypeError(f"rank_pattern[{key!r}] must be an int, got {value!r}")
    return {k: int(v) for k, v in rank_pattern.items()}, {k: as_python_number(v) for k, v in alpha_pattern.items()}


def _is_str_list(value) -> bool:
    return isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value)


def _compile(arg: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{arg}: {pattern!r} is not a valid regular expression ({exc})") from None


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether a ``rank_pattern`` / ``alpha_pattern`` key applies to a dotted module name: ``(^|.*\\.)pattern$``,
    PEFT's rule."""
    return re.match(rf"(^|.*\.)(?:{pattern})$", name) is not None


def _pattern_value(patterns: dict, name: str, default):
    for pattern, value in patterns.items():
        if pattern_matches(pattern, name):
            return value
    return default


def saved_module_matches(modules_to_save: list[str], name: str) -> bool:
    """Whether a dotted module name is one of ``modules_to_save``: it is one of them or ends with ``"." + `` one
    (PEFT 0.22's rule, ``_is_valid_match``: ``"norm"`` is ``model.norm``, not ``input_layernorm``; PEFT up to 0.21
    matched any suffix, and :func:`~alignlab.adapters.load_adapter` still loads such files, see
    ``io._add_saved_copies_in_file``)."""
    return any(name == t or name.endswith("." + t) for t in modules_to_save)


def name_matches(spec: str | list[str], name: str) -> bool:
    """Whether a dotted module name matches a regex string (full match) or a list of names/suffixes."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return matching_entry(spec, name) is not None


def matching_entry(names: list[str], name: str) -> str | None:
    """The first entry of a list of names/suffixes that selects the dotted module ``name``, else None."""
    return next((t for t in names if name == t or name.endswith("." + t)), None)
