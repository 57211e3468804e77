"""One-shot pruners (pure functions + registry) and mask math."""

from losa.pruning import magnitude, sparsegpt, wanda  # noqa: F401  (register the built-in pruners)
from losa.pruning.base import Pruner, PruneResult, available_pruners, get_pruner, register_pruner
from losa.pruning.masks import nm_mask, unstructured_mask
from losa.pruning.target import Target

__all__ = ["PruneResult", "Pruner", "Target", "available_pruners", "get_pruner", "register_pruner",
           "nm_mask", "unstructured_mask"]
