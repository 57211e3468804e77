"""Magnitude pruning: keep the largest |W| (per matrix for unstructured, per group for N:M)."""

from __future__ import annotations

import torch

from losa.calib.stats import InputStat
from losa.pruning.base import Pruner, PruneResult, register_pruner
from losa.pruning.masks import nm_mask, unstructured_mask
from losa.pruning.target import Target


def scores_to_mask(scores: torch.Tensor, target: Target, per_row: bool) -> torch.Tensor:
    if target.is_nm:
        return nm_mask(scores, target.n, target.m)  # type: ignore[arg-type]
    return unstructured_mask(scores, target.sparsity, per_row=per_row)


@register_pruner
class MagnitudePruner(Pruner):
    name = "magnitude"
    stat = None

    def prune(self, weight: torch.Tensor, stat: InputStat | None, target: Target) -> PruneResult:
        per_row = bool(self.options.get("per_row", False))
        mask = scores_to_mask(weight.abs().float(), target, per_row=per_row)
        return PruneResult(weight * mask, mask)
