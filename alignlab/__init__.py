"""alignlab: composable pieces for adapting and aligning large language models.

Take the piece you need: adapters (LoRA, DoRA, ...), NF4 quantization (QLoRA),
preference / RL / distillation losses, merge functions. Every piece is a plain
``torch.nn.Module`` or a function on tensors.
"""

__version__ = "0.1.0"
