"""Magnitude pruning: keep the largest |W| (per matrix for unstructured, per group for N:M)."""

from __future__ import annotations

import torch
from pydantic import Field

from losa.pruning.base import Pruner, PruneResult, PrunerOptions, register_pruner
from losa.pruning.masks import nm_mask, unstructured_mask
from losa.pruning.stats import InputStat
from losa.pruning.target import Target


def scores_to_mask(scores: torch.Tensor, target: Target, per_row: bool) -> torch.Tensor:
    if target.is_nm:
        return nm_mask(scores, target.n, target.m)  # type: ignore[arg-type]
    return unstructured_mask(scores, target.sparsity, per_row=per_row)


class MagnitudeOptions(PrunerOptions):
    """Magnitude pruning's options."""

    per_row: bool = Field(False, description="magnitude: compare |W| within each output row instead of over "
                                             "the whole matrix (unstructured targets only)")


@register_pruner
class MagnitudePruner(Pruner):
    """Keep the largest |W| (data-free baseline)."""

    name = "magnitude"
    stat = None
    Options = MagnitudeOptions
    options: MagnitudeOptions

    def prune(self, weight: torch.Tensor, stat: InputStat | None, target: Target,
              label: str | None = None) -> PruneResult:
        per_row = self.options.per_row
        mask = scores_to_mask(weight.abs().float(), target, per_row=per_row)
        return PruneResult(weight * mask, mask)
