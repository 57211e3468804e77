"""Sparse (masked) LoRA: ``W x + (α/r_max)·((B[:, :r] A[:r]) ⊙ M) x`` with per-module active rank."""

from losa.lora.config import SparseLoRAConfig
from losa.lora.function import masked_lora_linear
from losa.lora.layer import SparseLoRALinear
from losa.lora.model import (
    adapter_state_dict,
    add_sparse_lora,
    freeze_adapters,
    load_adapter_state_dict,
    load_adapters,
    lora_parameters,
    merge_and_unload,
    save_adapters,
    set_layer_ranks,
    sparse_lora_modules,
)

__all__ = [
    "SparseLoRAConfig",
    "SparseLoRALinear",
    "adapter_state_dict",
    "add_sparse_lora",
    "freeze_adapters",
    "load_adapter_state_dict",
    "load_adapters",
    "lora_parameters",
    "masked_lora_linear",
    "merge_and_unload",
    "save_adapters",
    "set_layer_ranks",
    "sparse_lora_modules",
]
