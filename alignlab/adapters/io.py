"""Save and load adapters in PEFT's on-disk format (LoRA / DoRA and every other family).

A directory with ``adapter_config.json`` (PEFT's ``LoraConfig`` fields) and
``adapter_model.safetensors`` with PEFT's key names::

    base_model.model.<module>.lora_A.weight          (r, in)
    base_model.model.<module>.lora_B.weight          (out, r)
    base_model.model.<module>.lora_magnitude_vector  (out,)      DoRA only
    base_model.model.<module>.weight / .bias                     modules_to_save

so ``peft.PeftModel.from_pretrained(base, path)`` loads what we save and
:func:`load_adapter` loads what PEFT saves. Other adapter families plug in through
their config (``peft_type``, ``peft_config_dict(model, name)``, ``from_peft(raw)``,
optionally ``extra_tensors(model, name)`` for tensors that live on no single layer)
and their layers (``peft_tensors(name)``: tensors keyed relative to the layer).
Families PEFT lacks use the same layout with ``peft_type = "ALIGNLAB_<METHOD>"``
and a ``format_version`` field. LoRA on fused MoE expert weights (:mod:`alignlab.adapters.experts`) is
written as PEFT's ``target_parameters`` (PEFT >= 0.19.1 layout); with DoRA or dropout there, which
PEFT's ``ParamWrapper`` lacks, the same fields and keys go out as ``peft_type = "ALIGNLAB_LORA"``.
The pieces every family's config shares to write and read
its ``adapter_config.json`` live here (:func:`peft_header`, :func:`peft_targets`,
:func:`refuse_unsupported`, :func:`peft_field` (one field checked, never coerced),
:func:`own_format_dict` / :func:`own_format_config`). Both files are written to temporary
names first and only then renamed into place: an error never leaves a half-written file, nor new weights
beside an old config.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
import warnings
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from alignlab._atomic import fsync_dir, fsync_file, keep_mode, made_folder
from alignlab._checks import ArgumentTypeError, is_int, is_real, user_path
from alignlab.adapters.base import SavedModule, fan_in_fan_out, hf_embedding
from alignlab.adapters.config import TASK_HEADS, LoRAConfig, saved_module_matches, task_type_from_file, with_task_heads
from alignlab.adapters.experts import ExpertLoRA, check_peft_expert_layout
from alignlab.adapters.inject import (_inject, _kept_rewritten_weights, _uncompiled, _user_model, adapter_configs,
                                     adapter_layers)
from alignlab.adapters.lora import LoRALinear
from alignlab.distributed import full_tensor, is_sharded, is_writer, like_target, unwrap, writer_done

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1  # of the alignlab-only formats (peft_type "ALIGNLAB_<METHOD>")
OWN_LORA_TYPE = "ALIGNLAB_LORA"  # LoRA with what PEFT cannot read: DoRA or dropout on fused expert weights
_PEFT_INIT = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def _peft_init(init: str):
    return _PEFT_INIT.get(init, init)  # pissa_niter_K has the same spelling in PEFT


# PEFT inits that leave the base weights as they are: only the adapter starts elsewhere, and a file's weights are
# loaded over it, so such a file is an ordinary LoRA adapter (loftq, corda, lora_ga rewrite the base, mica trains
# with a frozen B: refused). "nora" (PEFT 0.22): A's columns normalised, B zero
_INIT_ONLY = ("orthogonal", "eva", "nora")


def _our_init(value) -> str:
    if value is True or value is None:
        return "kaiming"
    if value is False or value in _INIT_ONLY:
        return "kaiming"  # the weights are loaded over it anyway
    if isinstance(value, str) and (value in ("gaussian", "pissa", "olora") or value.startswith("pissa_niter_")):
        return value
    raise ValueError(f"adapter_config.json: init_lora_weights={value!r} is not supported (supported: true, false, "
                     "gaussian, pissa, pissa_niter_K, olora, orthogonal, eva, nora)")


# LoraConfig fields of PEFT's LoRA variants, each of which changes what the file's tensors compute (or the model they
# go into); alignlab has none of them, and several load without a shape error (aLoRA's adapter then acted on every
# token instead of those after the invocation sequence): a value other than null / false / empty is refused by name
_PEFT_LORA_VARIANTS = {
    "alora_invocation_tokens": "activated LoRA (aLoRA) applies the adapter only after these tokens",
    "layer_replication": "PEFT duplicates base layers before adding the adapter",
    "use_bdlora": "block-diagonal LoRA factors",
    "arrow_config": "Arrow routing between adapters",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "use_qalora": "QALoRA pools the inputs of a GPTQ base in groups before lora_A",
    "megatron_config": "LoRA on Megatron-core's tensor-parallel layers, whose file holds one rank's shards",
}


def refuse_lora_variants(raw: dict, method: str = "LoRA") -> None:
    """``ValueError`` naming the first PEFT LoRA-variant field (aLoRA, BD-LoRA, Arrow, ...) that ``raw`` sets."""
    for key, what in _PEFT_LORA_VARIANTS.items():
        value = raw.get(key)
        if value is not None and value is not False and value != [] and value != {}:
            raise ValueError(f"adapter_config.json: {key}={value!r} is not supported by alignlab for {method} ({what}; "
                             "only null or false)")


# Every field of PEFT 0.22's LoraConfig. Each one is honoured by config_from_peft (r, lora_alpha, target_modules,
# rank_pattern, use_rslora, use_dora, ...), refused when set (bias, lora_bias, init_lora_weights that rewrite the base,
# _PEFT_LORA_VARIANTS), or changes no number of a loaded adapter: metadata (peft_version, revision, inference_mode,
# task_type, auto_mapping, runtime_config), options of a refused variant (megatron_core, qalora_group_size) or of an
# init the file's weights replace (loftq/eva/corda/lora_ga/astra_config: PEFT itself ignores them under another init), and
# fan_in_fan_out, which each layer's type decides in PEFT as here
PEFT_LORA_FIELDS = frozenset((
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora",
    "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "megatron_config", "megatron_core", "trainable_token_indices", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "use_dora", "velora_config", "alora_invocation_tokens", "use_qalora", "qalora_group_size",
    "monteclora_config", "layer_replication", "runtime_config", "lora_bias", "target_parameters", "use_bdlora",
    "arrow_config", "kasa_config", "ensure_weight_tying",
    "astra_config",  # PEFT 0.22: the option of init_lora_weights="astra" (which rewrites the base: refused)
))


def _is_off(value) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


def warn_unknown_lora_fields(raw: dict) -> None:
    """``RuntimeWarning`` naming each field of ``raw`` that PEFT 0.21's ``LoraConfig`` lacks and that is set (not
    null, false or empty): most likely a file from a newer PEFT whose option alignlab ignores, and which may change
    what the adapter computes. Not refused: newer PEFT versions also add fields that change nothing (as
    ``peft_version`` once was), and refusing those would stop every such file from loading; PEFT 0.21 warns too."""
    unknown = {k: v for k, v in raw.items() if k not in PEFT_LORA_FIELDS and not _is_off(v)}
    if unknown:
        listed = ", ".join(f"{k}={v!r}" for k, v in sorted(unknown.items()))
        warnings.warn(f"adapter_config.json: {listed}: not a field of PEFT 0.21's LoraConfig, ignored by alignlab; "
                      "if a newer PEFT wrote this file and the field turns on a LoRA variant, the loaded adapter "
                      "computes something else than the trained one", RuntimeWarning, stacklevel=3)


# -- what every family's config uses to write and read its adapter_config.json ------------------------
def peft_header(peft_type: str) -> dict:
    """The fields a PEFT ``adapter_config.json`` opens with (``save_adapter`` fills in the model's identity)."""
    return {"peft_type": peft_type, "task_type": None, "base_model_name_or_path": None, "revision": None,
            "inference_mode": True}


def peft_targets(raw: dict, key: str = "target_modules", required: bool = True) -> str | list | None:
    """A module-name field of a PEFT ``adapter_config.json`` (``target_modules`` by default): a regex string or a
    list of names; None where it is absent or null and not ``required``. The config class checks the names.

    Raises:
        ValueError: a ``required`` field is missing.
        ArgumentTypeError: the field is neither a string nor a list (``5`` stopped on "'int' object is not
            iterable", a mapping was read as its keys).
    """
    target = raw.get(key)
    if target is None:
        if required:
            raise ValueError(f"adapter_config.json: {key} is missing")
        return None
    if isinstance(target, str):
        return target
    if not isinstance(target, (list, tuple)):
        raise ArgumentTypeError(f"adapter_config.json: {key} must be a regex string or a list of module names, "
                                f"got {target!r}")
    return list(target)


def refuse_unsupported(raw: dict, method: str, supported: tuple[tuple[str, object], ...]) -> None:
    """``ValueError`` naming the first ``(key, only supported value)`` pair that ``raw`` sets otherwise.

    A bool matches only a bool (``0 == False`` and ``1 == True`` in Python, but a flag written as ``0`` is
    not ``false``); a number matches an equal number (``0`` for ``0.0``)."""
    for key, ok in supported:
        value = raw.get(key, ok)
        if isinstance(value, bool) != isinstance(ok, bool) or value != ok:
            raise ValueError(f"adapter_config.json: {key}={value!r} is not supported by alignlab for {method} "
                             f"(only {json.dumps(ok)})")


_REQUIRED = object()
_KINDS = {"bool": "true or false", "int": "an integer", "number": "a number"}


def peft_field(raw: dict, key: str, kind: str, default=_REQUIRED):
    """``raw[key]`` checked as a JSON ``kind`` (``"bool"``, ``"int"`` or ``"number"``); ``default`` when absent.

    Nothing is coerced: ``bool("false")`` is True and ``int(2.7)`` is 2, so a hand-edited or foreign file
    would load as a different adapter. A bool or an integer comes back as it is, a number as a ``float``.
    ``null`` counts as absent only where ``default`` is None (an optional field).

    Raises:
        ValueError: naming ``key``: missing without a default, a flag that is not true/false, an integer
            that is a fraction, a string or a bool, a number that is a string, a bool, NaN or ±inf.
    """
    if key not in raw or (raw[key] is None and default is None):
        if default is _REQUIRED:
            raise ValueError(f"adapter_config.json: {key} is missing")
        return default
    value = raw[key]
    if kind == "bool" and isinstance(value, bool) or kind == "int" and is_int(value):
        return value
    if kind == "number" and is_real(value):
        if not math.isfinite(value):
            raise ValueError(f"adapter_config.json: {key} must be a finite number, got {value!r}")
        return float(value)
    raise ValueError(f"adapter_config.json: {key} must be {_KINDS[kind]}, got {value!r}")


def own_format_dict(kind: str, config) -> dict:
    """The ``adapter_config.json`` of a method PEFT lacks: every dataclass field, versioned."""
    raw = {f.name: getattr(config, f.name) for f in fields(config) if f.init}
    for key, value in raw.items():
        if isinstance(value, (set, tuple)):
            raw[key] = sorted(value)
    return {"peft_type": kind, "format_version": FORMAT_VERSION, **raw}


def check_format_version(raw: dict) -> None:
    """``ValueError`` unless ``raw`` (an alignlab-format ``adapter_config.json``) has this alignlab's ``format_version``."""
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"adapter_config.json: format_version {version!r} is not supported (this alignlab reads {FORMAT_VERSION})")


def own_format_config(cls: type, raw: dict, kinds: tuple[tuple[str, str], ...] = ()):
    """Rebuild a config written by :func:`own_format_dict`; raises ``ValueError`` on a newer format.

    ``kinds`` lists ``(field, kind)`` pairs checked with :func:`peft_field` first (a null is accepted,
    the config's own default or check decides); the values then reach ``cls`` unconverted."""
    check_format_version(raw)
    for key, kind in kinds:
        peft_field(raw, key, kind, None)
    names = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(raw) - names - {"peft_type", "format_version"})
    if unknown:
        raise ValueError(f"adapter_config.json: unknown field(s) {unknown} for {cls.__name__}")
    return cls(**{k: v for k, v in raw.items() if k in names})


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (see module docstring), detached, on CPU.

    On a model sharded by FSDP2 every rank must call it: each tensor is gathered whole.

    Raises:
        ValueError: a tensor is on the ``meta`` device (a model made under ``torch.device("meta")`` and never
            filled), named with its key; ``.cpu()`` said only "Cannot copy out of meta tensor; no data!".
    """
    tensors = _adapter_tensors(_user_model(model), adapter_name)
    meta = [k for k, v in tensors.items() if v.is_meta]
    if meta:
        raise ValueError(f"adapter {adapter_name!r} has {len(meta)} tensor(s) on the meta device, with no data to "
                         f"save, e.g. {meta[0]!r}: load or initialise the model's weights (to_empty + "
                         f"load_state_dict) before saving")
    return {k: full_tensor(v.detach()).contiguous().cpu() for k, v in tensors.items()}


def peft_config_dict(model: nn.Module, config: LoRAConfig, adapter_name: str) -> dict:
    """PEFT ``LoraConfig`` fields for ``config``, with ``target_modules`` resolved to exact module names."""
    from alignlab.adapters.embedding import TiedLoRAHead, TrainableTokensLayer

    layers = {n: l for n, l in adapter_layers(model)
              if adapter_name in l.adapter_names() and not isinstance(l, (TrainableTokensLayer, TiedLoRAHead))}
    experts = {n: layers.pop(n) for n in list(layers) if isinstance(layers[n], ExpertLoRA)}
    rank_pattern = {_exact(n): l.r[adapter_name] for n, l in layers.items() if l.r[adapter_name] != config.r}
    alpha_pattern = {_exact(n): l.alpha[adapter_name] for n, l in layers.items() if l.alpha[adapter_name] != float(config.alpha)}
    params = {f"{n}.{p}": (l.r[adapter_name][p], l.alpha[adapter_name][p]) for n, l in experts.items() for p in l.r[adapter_name]}
    rank_pattern.update({_exact(k): r for k, (r, _) in params.items() if r != config.r})
    alpha_pattern.update({_exact(k): a for k, (_, a) in params.items() if a != float(config.alpha)})
    raw = {
        **peft_header("LORA"),
        "task_type": config.task_type,  # None: save_adapter writes the model's where the file holds its head
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(layers),
        "target_parameters": sorted(params) or None,
        "exclude_modules": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "init_lora_weights": _peft_init(config.init),
        "modules_to_save": with_task_heads(model, config),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out(layers.values()),
        "layers_to_transform": None,
        "layers_pattern": None,
        "trainable_token_indices": config.trainable_token_indices,
        "ensure_weight_tying": config.ensure_weight_tying and _ties_something(model, adapter_name),
    }
    if experts and (config.use_dora or config.dropout > 0):  # PEFT's ParamWrapper has neither: our own format
        raw.update(peft_type=OWN_LORA_TYPE, format_version=FORMAT_VERSION)
    return raw


def _ties_something(model: nn.Module, adapter_name: str) -> bool:
    """Whether adapter ``adapter_name`` ties anything: an output head carrying its embedding LoRA, or trainable token
    rows (whose head shares them). Else its ``ensure_weight_tying`` did nothing here (LoRA on a tied ``lm_head``, a
    tied head in ``modules_to_save``, an untied model), and the file says false: PEFT 0.21 reads the flag as an
    order to tie, moving a tied head's LoRA onto the embedding (logits 31 off ours on a tiny Llama) or asking for
    the embedding's copy of a saved head (``KeyError``), an adapter other than the one trained here."""
    from alignlab.adapters.embedding import TiedLoRAHead, TrainableTokensLayer

    return any(isinstance(l, (TiedLoRAHead, TrainableTokensLayer)) and adapter_name in l.adapter_names()
               for _, l in adapter_layers(model))


def _warn_heads_peft_leaves_untied(model: nn.Module, adapter_name: str) -> None:
    """``RuntimeWarning`` when the adapter ties a head to a LoRA embedding PEFT does not tie: PEFT (0.21) ties only an
    embedding named ``embed_tokens`` and drops the head's keys of any other (GPT-2's ``wte``) without a word about
    them, so it loads such a file with the head's update missing (logits 22 off on a tiny GPT-2)."""
    from alignlab.adapters.embedding import TiedLoRAHead

    for name, layer in adapter_layers(model):
        if isinstance(layer, TiedLoRAHead) and adapter_name in layer.adapter_names():
            source = next((n for n, m in model.named_modules() if m is layer.source), "")
            if source.split(".")[-1] != "embed_tokens":
                import warnings

                warnings.warn(f"adapter {adapter_name!r}: the head {name!r} carries the LoRA of the embedding {source!r} "
                              "(ensure_weight_tying), which PEFT does not tie (it ties only an embedding named "
                              "'embed_tokens'): PEFT loads this file without the head's update, so its outputs differ; "
                              "load_adapter reads it as saved", RuntimeWarning, stacklevel=3)


def _exact(name: str) -> str:
    return "^" + name.replace(".", r"\.")


def _atomic_write(files: dict[Path, object]) -> None:
    """``write(tmp)`` for every ``path: write`` to a fresh file next to ``path``, then rename each over its
    ``path``. Every file is written before any is renamed, so a writer that fails (a full disk) leaves
    the previous files in place as a matching pair, never new weights beside an old config. A rename that
    fails after another went through (Ctrl-C between the two, ``adapter_config.json`` a directory) puts the
    files already renamed back as they were: each previous file is kept under a second name (a hard link,
    a copy where the file system has none) until the last rename is done. Each new file is fsynced before
    its rename and the folder after them, so a crash never leaves an empty file where a good one was. Each
    writer creates its file, so a new file gets the permissions that writer gives (the umask's for the config,
    as PEFT's; ``mkstemp`` made every file 0600, unreadable to the other users of a shared machine), and a
    replaced file keeps its own (a rename gave a private 0600 file the umask's 0644)."""
    tag = uuid.uuid4().hex[:12]
    tmps = {path: str(path.parent / f".{path.name}.{tag}.tmp") for path in files}
    olds = {path: str(path.parent / f".{path.name}.{tag}.old") for path in files}
    placed: list[Path] = []
    try:
        for path, write in files.items():
            write(tmps[path])
            fsync_file(tmps[path])  # the bytes on disk before the name: else a crash can leave an empty file
            keep_mode(tmps[path], path)  # after the read-only open of fsync_file (a 0200 target's mode forbids it)
        for path in files:
            if path.is_file() or path.is_symlink():
                _keep_previous(path, olds[path])
        for path, tmp in tmps.items():
            os.replace(tmp, path)
            placed.append(path)
        for parent in dict.fromkeys(path.parent for path in files):
            fsync_dir(parent)
    except BaseException:
        for path in reversed(placed):  # the previous file back, or none where there was none
            if os.path.lexists(olds[path]):
                os.replace(olds[path], path)
            else:
                os.unlink(path)
        for tmp in tmps.values():
            if os.path.lexists(tmp):
                os.unlink(tmp)
        raise
    finally:
        for old in olds.values():
            if os.path.lexists(old):
                os.unlink(old)


def _keep_previous(path: Path, old: str) -> None:
    """``path``'s file also under the name ``old`` (a hard link: no bytes copied; a copy where links fail)."""
    try:
        os.link(path, old, follow_symlinks=False)
    except OSError:
        shutil.copy2(path, old, follow_symlinks=False)


def _ddp_wrapped(model: nn.Module) -> bool:
    """Whether ``model`` (inside a ``torch.compile`` wrapper or not) is a ``DistributedDataParallel`` wrapper."""
    return unwrap(_uncompiled(model)) is not _uncompiled(model)


def _check_model_and_path(model, path) -> Path:
    """``path`` as a ``Path`` with a leading ``~`` expanded; ``TypeError`` naming the argument unless ``model`` is
    an ``nn.Module`` and ``path`` a str or path."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (a directory), got {type(path).__name__}")
    return user_path(path, "path")


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write adapter ``adapter_name`` of ``model`` to directory ``path`` in PEFT's format.

    A sharded (FSDP2) model or a ``DistributedDataParallel`` wrapper: call it on every rank. The adapter is
    gathered whole and rank 0 alone writes the files (the same bytes a single process writes); the other ranks
    wait until they are in place. If rank 0 cannot write them, every rank raises (rank 0 its own error, the
    others a ``RuntimeError``) instead of waiting. Any other model (also ``ddp.module``, with a process group
    running) is saved by the process that calls, with no collective: ``if rank == 0: save_adapter(...)`` works
    (it used to wait in a collective for the ranks that never called, until the group's timeout).

    A leading ``~`` in ``path`` is the home folder (as in ``load_adapter``); returns the folder written. Files
    replaced there keep their permissions; new ones get the umask's.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``path`` not a str / ``os.PathLike``.
        ValueError: the model has no adapter of that name (lists the ones it has), ``path`` is a file, or the
            adapter is merged into the base (``unmerge`` first; PEFT saves a merged adapter as it is).
    """
    out = _check_model_and_path(model, path)
    wrapped = _ddp_wrapped(model)  # every rank calls
    model = _user_model(model)
    collective = wrapped or is_sharded(model)
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"adapter {adapter_name!r} not found; this model has {sorted(configs)}")
    config = configs[adapter_name]
    if not isinstance(config, LoRAConfig) and not hasattr(config, "peft_config_dict"):
        raise ValueError(f"save_adapter cannot write {adapter_name!r}: {type(config).__name__} has no file format")
    merged = [n for n, l in adapter_layers(model) if adapter_name in l.merged_adapters]
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged into the base (e.g. {merged[0]!r}); unmerge before saving")
    state = adapter_state_dict(model, adapter_name)
    raw = peft_config_dict(model, config, adapter_name) if isinstance(config, LoRAConfig) else config.peft_config_dict(model, adapter_name)
    _warn_heads_peft_leaves_untied(model, adapter_name)
    identity = _model_identity(model)
    if not _holds_task_heads(model, identity.get("task_type"), raw.get("modules_to_save")):
        identity.pop("task_type")
    raw.update({k: v for k, v in identity.items() if k in raw and raw[k] is None})
    meta = json.dumps(raw, indent=2, sort_keys=True)
    error = None
    if is_writer() or not collective:
        try:
            if out.is_file():  # was FileExistsError "[Errno 17] File exists", which did not say what was wanted
                raise ValueError(f"path {str(out)!r} is a file; save_adapter writes a directory (adapter_config.json "
                                 f"and adapter_model.safetensors), as PEFT's save_pretrained does")
            with made_folder(out):  # a failed first save leaves no empty folder behind
                _atomic_write({out / WEIGHTS_NAME: lambda tmp: save_file(state, tmp, metadata={"format": "pt"}),
                               out / CONFIG_NAME: lambda tmp: Path(tmp).write_text(meta)})
        except BaseException as e:  # every rank hears of it, Ctrl-C on rank 0 too: the others would otherwise
            # wait for rank 0 until the process group's timeout (rank 0 re-raises its own exception)
            error = e
    if collective:
        writer_done(error, f"adapter {adapter_name!r} to {out}")
    elif error is not None:
        raise error
    return out


# HF head classes -> PEFT task types (what AutoPeftModel* dispatch on)
_TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
               ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
               ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"))


def _holds_task_heads(model: nn.Module, task: str | None, modules_to_save: list[str] | None) -> bool:
    """Whether a file naming ``task`` holds the heads PEFT reads for it; without them (a classifier the adapter
    left frozen) PEFT fails on the missing key, so such a file is written without a task type (a plain ``PeftModel``,
    the same outputs)."""
    heads = [n for n, _ in model.named_modules() if n and saved_module_matches(TASK_HEADS.get(task, []), n)
             and not any(n.startswith(h + ".") for h in _saved_module_names(model))]
    return all(saved_module_matches(list(modules_to_save or []), n) for n in heads)


def _saved_module_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, SavedModule)]


def _model_identity(model: nn.Module) -> dict:
    """``base_model_name_or_path`` (from an HF model's config) and ``task_type`` (from its head class), when known."""
    out = {}
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if isinstance(name, str) and name:
        out["base_model_name_or_path"] = name
    cls = type(model).__name__
    task = next((t for suffix, t in _TASK_TYPES if cls.endswith(suffix)), None)
    if task == "SEQ_2_SEQ_LM" and not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        task = None  # a decoder-only vision-language model (LLaVA, Gemma 3): PEFT would build a seq2seq wrapper
    if task is not None:
        out["task_type"] = task
    return out


def config_from_peft(raw: dict) -> LoRAConfig:
    """A :class:`LoRAConfig` from the contents of a PEFT ``adapter_config.json``.

    Raises:
        ValueError: not a LoRA adapter, or a PEFT feature alignlab does not support.
    """
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"adapter_config.json: peft_type must be 'LORA', got {raw.get('peft_type')!r}")
    # fan_in_fan_out is not checked: as in PEFT, each layer's type decides (True for GPT-2's Conv1D)
    refuse_unsupported(raw, "LoRA", (("lora_bias", False), ("bias", "none")))
    refuse_lora_variants(raw)
    _check_fields(raw)
    warn_unknown_lora_fields(raw)
    _warn_peft_random_pissa(raw)
    return task_type_from_file(LoRAConfig(
        r=int(raw.get("r", 8)),  # PEFT's defaults for r and lora_alpha
        alpha=float(raw.get("lora_alpha", 8)),
        dropout=float(raw.get("lora_dropout", 0.0)),
        target_modules=[] if raw.get("target_modules") is None and raw.get("target_parameters") else peft_targets(raw),
        target_parameters=peft_targets(raw, "target_parameters", required=False) or None,
        exclude_modules=raw.get("exclude_modules"),
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        use_rslora=bool(raw.get("use_rslora", False)),
        use_dora=bool(raw.get("use_dora", False)),
        init=_our_init(raw.get("init_lora_weights", True)),
        modules_to_save=raw.get("modules_to_save") or None,
        trainable_token_indices=raw.get("trainable_token_indices"),
        ensure_weight_tying=bool(raw.get("ensure_weight_tying", False)),
        layers_to_transform=raw.get("layers_to_transform"),
        layers_pattern=raw.get("layers_pattern"),
    ), raw)


def _warn_peft_random_pissa(raw: dict) -> None:
    """``RuntimeWarning`` for a ``pissa_niter_K`` file that PEFT wrote (it writes ``peft_version``; ``save_adapter``
    does not): PEFT's randomized SVD draws at random, so the residual ``load_adapter`` rebuilds from our fixed draw is
    not the one the adapter was trained on, and the loaded model is off (0.3 in the logits of a tiny Qwen2) without
    any error."""
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.startswith("pissa_niter_") and raw.get("peft_version"):
        warnings.warn(f"adapter_config.json: init_lora_weights={init!r} from PEFT {raw['peft_version']}: its randomized "
                      "SVD drew at random, so the residual base weights rebuilt here differ from the ones the adapter "
                      "was trained on and the outputs will not match PEFT's; convert the file with PEFT's "
                      "save_pretrained(..., path_initial_model_for_weight_conversion=...) (a plain LoRA file) or "
                      "train with 'pissa'", RuntimeWarning, stacklevel=3)


def _check_fields(raw: dict) -> None:
    """``ValueError`` naming the first LoRA field of wrong type (see :func:`peft_field`)."""
    for key in ("use_rslora", "use_dora", "ensure_weight_tying"):
        peft_field(raw, key, "bool", None)  # null: PEFT reads it as false, and so do we
    peft_field(raw, "r", "int", 8)
    peft_field(raw, "lora_alpha", "number", 8)
    peft_field(raw, "lora_dropout", "number", 0.0)


def _read_config(path: Path) -> dict:
    """The JSON object in ``path``; ``ValueError`` naming the file when it is not valid JSON or not an object."""
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of config fields, got {type(raw).__name__}")
    return raw


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors in safetensors file ``path``; ``ValueError`` naming it when it cannot be read (a truncated or
    half-copied file raised safetensors' ``SafetensorError`` "incomplete metadata", which named no file)."""
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); was it truncated or copied only in "
                         f"part?") from None


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Load a PEFT-format LoRA/rsLoRA/DoRA adapter from ``path`` into ``model`` (in place; returns it).

    A model already sharded by FSDP2 cannot take new layers: inject the adapter (same config)
    before ``fully_shard``; ``load_adapter`` then copies the file's weights into its shards (every
    rank reads the file and keeps its own part). The same holds for a model already wrapped in
    ``DistributedDataParallel``, which all-reduces only the parameters it had when it was made: the
    file is copied into the adapter injected before wrapping (or load into the plain model, then wrap).
    A leading ``~`` in ``path`` is the home folder.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``path`` not a str / ``os.PathLike``.
        FileNotFoundError: ``path`` lacks ``adapter_config.json`` or ``adapter_model.safetensors``.
        ValueError: a weights file safetensors cannot read (truncated; the file is named); missing or
            unexpected keys, or shape mismatches (the key is named); a sharded or
            DDP-wrapped model without adapter ``adapter_name`` or with a different rank / alpha / DoRA setting.
            A refused file leaves the model as it was: no adapter, the flags and base weights it had (a PiSSA /
            OLoRA init's residuals put back).
    """
    root = _check_model_and_path(model, path)
    wrapped = _ddp_wrapped(model)
    model = _user_model(model)
    for fname in (CONFIG_NAME, WEIGHTS_NAME):
        if not (root / fname).is_file():
            raise FileNotFoundError(f"{root / fname} not found: expected a PEFT adapter directory")
    raw = _read_config(root / CONFIG_NAME)
    config = _config_from_file(raw)
    check_peft_expert_layout(model, config, raw)
    if is_sharded(model) or wrapped:
        how = "sharded (FSDP2)" if is_sharded(model) else "wrapped in DistributedDataParallel"
        _load_into_sharded(model, config, _read_weights(root / WEIGHTS_NAME), adapter_name, how)
        return model
    _drop_absent_modules_to_save(model, config)
    state = _read_weights(root / WEIGHTS_NAME)
    _add_saved_copies_in_file(model, config, state)
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    rewritten = _kept_rewritten_weights(model, config)  # a PiSSA / OLoRA file's init writes residuals into the base
    _inject(model, config, adapter_name, from_file=True, kept=rewritten)
    try:
        if _drop_tied_heads_the_file_lacks(model, state, adapter_name):
            config.ensure_weight_tying = False
        _copy_into(model, state, adapter_name)
    except ValueError:
        from alignlab.adapters.inject import _delete_adapter

        _delete_adapter(model, adapter_name)  # the residual warning would be wrong: the weights go back next
        for restore in rewritten.values():
            restore()
        for p in model.parameters():  # inject froze the base: leave the model as it was
            if id(p) in trainable:
                p.requires_grad_(trainable[id(p)])
        raise
    return model


def _load_into_sharded(model: nn.Module, config, state: dict[str, torch.Tensor], adapter_name: str,
                       how: str = "sharded (FSDP2)") -> None:
    """Copy the file into adapter ``adapter_name`` the model already has: a model that is ``how`` cannot take new
    parameters (FSDP2 would not shard them, DDP would not all-reduce their gradients)."""
    have = adapter_configs(model).get(adapter_name)
    if have is None:
        if how.startswith("sharded"):
            hint = "inject it before fully_shard, then load_adapter copies the weights into its shards"
        else:  # DDP registered its parameters at construction: new ones would train apart on each rank
            hint = ("load_adapter into the plain model, then wrap it (DDP all-reduces only the parameters it had when "
                    "it was made), or inject the adapter before wrapping and load_adapter copies the weights into it")
        raise ValueError(f"model is {how} and has no adapter {adapter_name!r}: {hint}")
    fields_ = ("r", "alpha", "use_rslora", "use_dora")
    if type(have) is not type(config):
        raise ValueError(f"adapter {adapter_name!r} of the {how.split()[0]} model differs from the file's: "
                         f"{type(have).__name__} in the model, {type(config).__name__} in the file")
    if isinstance(config, LoRAConfig):
        diff = [f"{f}: {getattr(have, f)!r} in the model, {getattr(config, f)!r} in the file" for f in fields_
                if float(getattr(have, f)) != float(getattr(config, f))]
        if diff:
            raise ValueError(f"adapter {adapter_name!r} of the {how.split()[0]} model differs from the file's: "
                             + "; ".join(diff))
    # a file of PEFT <= 0.21 may hold trained copies of modules its modules_to_save named by suffix only
    # ("norm": every *_layernorm); a wrapped model cannot take new copies, so say which ones it needs
    extra = _saved_copies_beyond_rule(model, config, state)
    if extra:
        names = list(getattr(have, "modules_to_save", None) or [])
        raise ValueError(
            f"model is {how}: the adapter file holds trained copies of {len(extra)} module(s) that adapter "
            f"{adapter_name!r} does not copy, e.g. {extra[0]!r} (a file of PEFT <= 0.21, whose modules_to_save "
            f"matched every module name ending with an entry); inject with modules_to_save={names + extra!r} "
            "before wrapping, then load_adapter copies them")
    _copy_into(model, state, adapter_name)


def _drop_tied_heads_the_file_lacks(model: nn.Module, state: dict, adapter_name: str) -> bool:
    """Older PEFT (0.18) writes ``ensure_weight_tying`` but leaves a tied head without the embedding's LoRA
    (no ``<head>.lora_A.weight`` in the file): read such a file as it was trained, with the head untouched.
    Returns whether a tied head was dropped."""
    from alignlab.adapters.embedding import TiedLoRAHead
    from alignlab.adapters.inject import _set_submodule
    from alignlab.adapters.tied_keys import follow_adapters_in_tied_keys

    dropped = False
    for name, layer in list(adapter_layers(model)):
        if isinstance(layer, TiedLoRAHead) and adapter_name in layer.adapter_names() \
                and f"{PREFIX}{name}.lora_A.weight" not in state:
            layer.delete_adapter(adapter_name)
            dropped = True
            if not layer.adapter_names():
                _set_submodule(model, name, layer.base_layer)
    if dropped:
        follow_adapters_in_tied_keys(model)
    return dropped


def _drop_absent_modules_to_save(model: nn.Module, config) -> None:
    """Keep the ``modules_to_save`` names this model has, as PEFT does when loading.

    PEFT writes its task heads for every architecture (``["classifier", "score"]`` for
    ``SEQ_CLS``); a model has one of them. The file's weights for a kept module are still
    checked key by key, so nothing the model has is skipped.
    """
    wanted = getattr(config, "modules_to_save", None)
    if not wanted:
        return
    names = [n for n, _ in model.named_modules() if n]
    kept = [w for w in wanted if any(saved_module_matches([w], n) for n in names)]
    config.modules_to_save = kept or None


def _add_saved_copies_in_file(model: nn.Module, config, state: dict) -> None:
    """Name in ``config.modules_to_save`` (by their full names) the modules whose trained copies the file holds that
    the name rule does not match: PEFT up to 0.21 wrapped every module whose name merely ended with an entry
    (``"norm"``: each ``input_layernorm`` too), PEFT 0.22 and alignlab only whole names; such a file loads as it was
    trained. Only modules that end with an entry (the old rule) and whose every parameter the file holds (a copy, not
    an adapter tensor such as DoRA's magnitude beside a layer) are added."""
    extra = _saved_copies_beyond_rule(model, config, state)
    if extra:
        config.modules_to_save = list(config.modules_to_save) + extra


def _saved_copies_beyond_rule(model: nn.Module, config, state: dict) -> list[str]:
    """The full names of the modules whose trained copies the file holds beyond what ``config.modules_to_save``
    matches by whole names (see :func:`_add_saved_copies_in_file`), sorted."""
    wanted = list(getattr(config, "modules_to_save", None) or [])
    if not wanted:
        return []
    held = {k.removeprefix(PREFIX).rpartition(".")[0] for k in state}  # a saved module's tensors: "<module>.<name>"
    names = {n for n, _ in model.named_modules() if n}
    return sorted(n for n in held if n in names and not saved_module_matches(wanted, n)
                  and any(n.endswith(w) for w in wanted)
                  and all(f"{PREFIX}{n}.{k}" in state for k, _ in model.get_submodule(n).named_parameters()))


def _config_from_file(raw: dict):
    """The alignlab config for a PEFT (or alignlab-format) ``adapter_config.json``, dispatched on ``peft_type``."""
    kind = raw.get("peft_type")
    if kind == "LORA":
        return config_from_peft(raw)
    if kind == OWN_LORA_TYPE:
        check_format_version(raw)
        return config_from_peft({k: v for k, v in raw.items() if k != "format_version"} | {"peft_type": "LORA"})
    registry = _config_registry()
    if kind not in registry:
        raise ValueError(f"adapter_config.json: peft_type must be 'LORA' or one of {sorted(registry)}, got {kind!r}")
    if "lora_alpha" in raw and kind != "ADALORA":
        raise ValueError(f"adapter_config.json: peft_type must be 'LORA' for a config with LoRA fields (lora_alpha), got {kind!r}")
    return registry[kind].from_peft(raw)


def _config_registry() -> dict:
    from alignlab.adapters.adalora import AdaLoRAConfig, SoRAConfig
    from alignlab.adapters.bitfit import BitFitConfig
    from alignlab.adapters.bottleneck import AdapterFusionConfig, BottleneckConfig
    from alignlab.adapters.ia3 import IA3Config
    from alignlab.adapters.kron import LoKrConfig
    from alignlab.adapters.prompt import PrefixTuningConfig, PromptTuningConfig
    from alignlab.adapters.vera import VeRAConfig

    classes = (AdaLoRAConfig, SoRAConfig, AdapterFusionConfig, BitFitConfig, BottleneckConfig, IA3Config, LoKrConfig, PrefixTuningConfig, PromptTuningConfig, VeRAConfig)
    return {cls.peft_type: cls for cls in classes}


def _copy_into(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str) -> None:
    expected = _adapter_tensors(model, adapter_name)
    # PEFT also writes the frozen tensors of a targeted input or output embedding (lm_head is one of its
    # EMBEDDING_LAYER_NAMES; its default save_embedding_layers="auto"), or the whole tables (save_embedding_layers=True,
    # or "auto" after a vocabulary resize), and loads them back into the base: so do we
    expected |= {k: p for k, p in _peft_base_tables(model, adapter_name).items() if k in state}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise ValueError(f"adapter file lacks {len(missing)} key(s) the model needs, e.g. {missing[0]!r}")
    if unexpected:
        raise ValueError(f"adapter file has {len(unexpected)} key(s) that match no adapted module, e.g. {unexpected[0]!r}")
    for key, target in expected.items():
        if tuple(state[key].shape) != tuple(target.shape):
            raise ValueError(f"{key}: shape {tuple(state[key].shape)} in the file, {tuple(target.shape)} in the model")
    _refuse_writes_into_saved_originals(model, state, expected)
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(like_target(state[key], target))


def _refuse_writes_into_saved_originals(model: nn.Module, state: dict, expected: dict) -> None:
    """``ValueError`` if a key of the file would write other values into the frozen original of a ``modules_to_save``
    module through a tensor tied to it (PEFT 0.22 with ``ensure_weight_tying`` saves a tied ``lm_head``'s copy,
    the trained embedding, under ``lm_head.weight``: copied into the head, it overwrote the embedding's original, so
    ``disabled(model)`` ran a changed base). The original's own key (PEFT's ``save_embedding_layers``) is read
    first: an alias holding the same values writes nothing new."""
    originals = {}
    for n, m in model.named_modules():
        if isinstance(m, SavedModule):
            for k, p in m.original_module.named_parameters():
                originals[id(p)] = f"{PREFIX}{n}.original_module.{k}"
    for key, target in expected.items():
        own = originals.get(id(target))
        if own is None or key == own:
            continue
        holds = state[own] if own in state else target  # what the original holds once the file's own key is read
        if not torch.equal(like_target(state[key], target), like_target(holds, target)):
            raise ValueError(
                f"{key}: the file writes other values into a tensor tied to {own!r}, the frozen original of a "
                "modules_to_save copy (PEFT 0.22's ensure_weight_tying ties a tied head to the trained embedding "
                "copy; here such a head trains untied, see docs/adapters.md): loading it would change the base "
                "model that disabled() runs. Such files are not supported; saved without ensure_weight_tying, PEFT "
                "trains the head untied too, and the file loads")


def _peft_base_tables(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The base tensors PEFT may write next to an adapter, by its key names: those of the input and output embeddings,
    from inside whatever wraps them (``<m>.base_layer.*`` under a LoRA, ``<m>.token_adapter.base_layer.*`` under
    trainable rows, ``<m>.original_module.*`` and ``<m>.modules_to_save.*`` of a saved module, ``<m>.*`` unwrapped),
    and of every embedding or tied head carrying a LoRA. A head whose rows are tied to the embedding's gets the rows'
    copy PEFT writes for it too (``<m>.token_adapter.trainable_tokens_delta``, the same values)."""
    from alignlab.adapters.base import AdapterLayer
    from alignlab.adapters.embedding import LoRAEmbedding, TiedLoRAHead, TrainableTokensLayer

    tables = {id(hf_embedding(model)), id(hf_embedding(model, "get_output_embeddings"))}
    out = {}
    for n, m in model.named_modules():
        if not (isinstance(m, (LoRAEmbedding, TiedLoRAHead)) or id(m) in tables):
            continue
        if isinstance(m, TrainableTokensLayer):
            out |= {f"{PREFIX}{n}.token_adapter.base_layer.{k}": p for k, p in m.base_layer.named_parameters(recurse=False)}
            if m.tied_to is not None and adapter_name in m.adapter_names():
                out[f"{PREFIX}{n}.token_adapter.trainable_tokens_delta"] = m.tied_to.trainable_tokens_delta[adapter_name]
        elif isinstance(m, AdapterLayer):
            out |= {f"{PREFIX}{n}.base_layer.{k}": p for k, p in m.base_layer.named_parameters(recurse=False)}
        elif isinstance(m, SavedModule):
            out |= {f"{PREFIX}{n}.original_module.{k}": p for k, p in m.original_module.named_parameters()}
            if adapter_name in m.modules_to_save:
                out |= {f"{PREFIX}{n}.modules_to_save.{k}": p for k, p in m.modules_to_save[adapter_name].named_parameters()}
        else:
            out |= {f"{PREFIX}{n}.{k}": p for k, p in m.named_parameters(recurse=False)}
    return out


def _adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The live parameters of one adapter, keyed by PEFT's names."""
    refs = {}
    for name, layer in adapter_layers(model):
        if isinstance(layer, LoRALinear) and adapter_name in layer.adapter_names():
            refs[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight
            refs[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight
            if layer.is_dora(adapter_name):
                refs[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name]
        elif hasattr(layer, "peft_tensors") and adapter_name in layer.adapter_names():
            for key, tensor in layer.peft_tensors(adapter_name).items():
                refs[f"{PREFIX}{name}.{key}"] = tensor
    config = adapter_configs(model).get(adapter_name)
    if hasattr(config, "extra_tensors"):
        refs.update(config.extra_tensors(model, adapter_name))
    prefix = getattr(config, "peft_key_prefix", PREFIX)
    for name, module in model.named_modules():
        if isinstance(module, SavedModule) and adapter_name in module.modules_to_save:
            for pname, p in module.modules_to_save[adapter_name].named_parameters():
                refs[f"{prefix}{name}.{pname}"] = p
    return refs
