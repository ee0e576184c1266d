"""alignlab.optim: optimizers whose state does not spike memory (QLoRA's 8-bit / paged optimizers).

:class:`AdamW8bit` stores both Adam moments as blockwise 8-bit codes (0.254x the bytes of fp32 moments),
with a fused Triton update on CUDA, and with ``offload=True`` keeps them in pinned CPU memory, streamed
through the GPU with copies overlapped with the update. On FSDP2's sharded (``DTensor``) parameters each
rank updates its own shard and keeps the state of that shard only.
"""

from alignlab.optim.adamw8bit import AdamW8bit, adamw8bit_reference_, dequantize_moments, state_bytes

__all__ = ["AdamW8bit", "adamw8bit_reference_", "dequantize_moments", "state_bytes"]
