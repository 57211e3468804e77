"""Model loading and the architecture registry."""

from losa.models.linear import get_weight, is_prunable, set_weight
from losa.models.loading import load_model
from losa.models.registry import ArchSpec, get_arch, get_decoder_layers, linear_modules, register_arch

__all__ = [
    "ArchSpec",
    "get_arch",
    "get_decoder_layers",
    "linear_modules",
    "register_arch",
    "load_model",
    "get_weight",
    "set_weight",
    "is_prunable",
]
