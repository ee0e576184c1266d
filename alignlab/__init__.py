"""alignlab: composable pieces for adapting and aligning large language models.

Take the piece you need: adapters (LoRA, DoRA, ...), NF4 quantization (QLoRA),
preference / RL / distillation losses, merge functions. Every piece is a plain
``torch.nn.Module`` or a function on tensors.

The subpackages are the API (``alignlab.adapters``, ``alignlab.quant``,
``alignlab.losses``, ``alignlab.merging``, ``alignlab.context``, ``alignlab.data``,
``alignlab.eval``, ``alignlab.decoding``, ``alignlab.bench``, ``alignlab.optim``,
``alignlab.kernels``, ``alignlab.distributed``); the most used
names are also re-exported here. Subpackages load on first access, so
``import alignlab`` stays cheap.

Errors: an argument of the wrong kind (a str or None where a number is wanted, a float where an int is)
raises :class:`alignlab.ArgumentTypeError`, both a ``TypeError`` and a ``ValueError``; a value of the
right kind out of range raises ``ValueError``. Both name the argument and say what was expected.
"""

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("adapters", "bench", "context", "data", "decoding", "distributed", "eval", "kernels", "losses", "merging", "optim", "quant")
_EXPORTS = {
    "LoRAConfig": "adapters", "LoRALinear": "adapters", "DoRALinear": "adapters", "inject": "adapters",
    "disabled": "adapters", "merge": "adapters", "unmerge": "adapters", "merge_and_unload": "adapters",
    "save_adapter": "adapters", "load_adapter": "adapters", "count_parameters": "adapters",
    "linear_cross_entropy": "losses", "linear_logprobs": "losses", "sequence_logprobs": "losses",
    "dpo_loss": "losses", "fused_linear_dpo": "losses", "fused_linear_distill_loss": "losses",
    "measure": "bench", "compare": "bench",
    "merge_checkpoints": "merging",
    "NF4Linear": "quant", "quantize_model": "quant", "nf4_quantize": "quant", "nf4_dequantize": "quant",
    "ArgumentTypeError": "_checks",
}

__all__ = ["__version__", *_SUBPACKAGES, *_EXPORTS]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"alignlab.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"alignlab.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'alignlab' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
