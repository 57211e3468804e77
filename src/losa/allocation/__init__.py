"""Layer-wise sparsity: linear CKA (RMI), sparsity allocators, mixed N:M allocation."""

from losa.allocation.allocators import ALLOCATORS, allocate, default_delta, get_allocator, register_allocator
from losa.allocation.cka import GramAccumulator, cka_from_grams, cka_matrix, gram
from losa.allocation.mixed_nm import allocate_mixed_nm

__all__ = [
    "ALLOCATORS",
    "GramAccumulator",
    "allocate",
    "allocate_mixed_nm",
    "cka_from_grams",
    "cka_matrix",
    "default_delta",
    "get_allocator",
    "gram",
    "register_allocator",
]
