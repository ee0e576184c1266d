"""Parameter-efficient adapters: LoRA, rsLoRA, DoRA (also on fused MoE expert weights), PiSSA/OLoRA init, (IA)³, VeRA, LoKr/KronA, BitFit, prompt/prefix tuning, bottleneck adapters + AdapterFusion, AdaLoRA/SoRA, ALPS head selection; injection and PEFT-format I/O."""

from alignlab.adapters.adalora import (
    AdaLoRAAllocator,
    AdaLoRAConfig,
    AdaLoRALinear,
    SoRAConfig,
    active_ranks,
    orthogonal_regularizer,
    prune_ranks,
    sora_proximal_step,
)
from alignlab.adapters.base import AdapterLayer, SavedModule
from alignlab.adapters.bitfit import BitFitConfig, BitFitLayer
from alignlab.adapters.bottleneck import AdapterFusionConfig, BottleneckConfig, BottleneckLayer, FusionLayer
from alignlab.adapters.config import LoRAConfig
from alignlab.adapters.dora import dora_weight_norm
from alignlab.adapters.experts import ExpertLoRA
from alignlab.adapters.embedding import LoRAEmbedding, TiedLoRAHead, TrainableTokensLayer
from alignlab.adapters.inject import (
    ParameterCount,
    active_adapters,
    adapter_configs,
    adapter_layers,
    add_weighted_adapter,
    count_parameters,
    delete_adapter,
    disabled,
    find_targets,
    inject,
    mark_only_adapters_trainable,
    merge,
    merge_and_unload,
    set_adapter,
    unmerge,
)
from alignlab.adapters.heads import head_scores, restrict_to_heads, select_heads, selected_parameter_count, top_heads
from alignlab.adapters.ia3 import IA3Config, IA3Linear
from alignlab.adapters.io import adapter_state_dict, load_adapter, save_adapter
from alignlab.adapters.kron import LoKrConfig, LoKrLinear, factorization
from alignlab.adapters.lora import DoRALinear, LoRALinear, lora_forward, lora_scaling
from alignlab.adapters.prompt import PrefixEncoder, PrefixTuningConfig, PromptTuningConfig, SoftPromptEmbedding
from alignlab.adapters.vera import VeRAConfig, VeRALinear, VeRAProjections

add_adapter = inject  # `add_adapter(model, config, "name")` reads better when a model already has one

__all__ = [
    "AdapterLayer", "DoRALinear", "ExpertLoRA", "LoRAConfig", "LoRAEmbedding", "LoRALinear", "ParameterCount", "SavedModule",
    "TiedLoRAHead", "TrainableTokensLayer",
    "active_adapters", "adapter_configs", "adapter_layers", "adapter_state_dict", "add_adapter",
    "add_weighted_adapter", "count_parameters", "delete_adapter", "disabled", "dora_weight_norm",
    "find_targets", "inject", "load_adapter", "lora_forward", "lora_scaling", "mark_only_adapters_trainable",
    "merge", "merge_and_unload", "save_adapter", "set_adapter", "unmerge",
    "IA3Config", "IA3Linear", "LoKrConfig", "LoKrLinear", "factorization", "VeRAConfig", "VeRALinear", "VeRAProjections",
    "BitFitConfig", "BitFitLayer", "PrefixEncoder", "PrefixTuningConfig", "PromptTuningConfig", "SoftPromptEmbedding",
    "AdapterFusionConfig", "BottleneckConfig", "BottleneckLayer", "FusionLayer",
    "AdaLoRAAllocator", "AdaLoRAConfig", "AdaLoRALinear", "SoRAConfig", "active_ranks", "orthogonal_regularizer", "prune_ranks",
    "sora_proximal_step", "head_scores", "restrict_to_heads", "select_heads", "selected_parameter_count", "top_heads",
]
