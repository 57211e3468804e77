"""Model loading and the architecture registry."""

from losa.models.linear import get_weight, is_prunable, set_weight
from losa.models.moe import unfuse_experts, unfused_experts
from losa.models.registry import (
    ArchSpec,
    get_arch,
    get_decoder_layers,
    linear_modules,
    prunable_weights,
    register_arch,
)
from losa.utils.lazy import lazy_attributes

# loading imports transformers: bound on first use
__getattr__, __dir__ = lazy_attributes(__name__, {"load_model": "losa.models.loading"})

__all__ = [
    "ArchSpec",
    "get_arch",
    "get_decoder_layers",
    "linear_modules",
    "prunable_weights",
    "unfused_experts",
    "unfuse_experts",
    "register_arch",
    "load_model",
    "get_weight",
    "set_weight",
    "is_prunable",
]
