"""Wanda (Sun et al., 2023): score |W_ij|·‖X_j‖₂, compared within each output row."""

from __future__ import annotations

import torch

from losa.errors import LosaError, option
from losa.pruning.base import Pruner, PruneResult, register_pruner
from losa.pruning.magnitude import scores_to_mask
from losa.pruning.stats import InputNormStat, InputStat
from losa.pruning.target import Target


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W|·‖X_j‖₂ with ``input_norm`` the per-input-feature L2 norm over calibration tokens."""
    return weight.abs().float() * input_norm.to(weight.device, torch.float32).unsqueeze(0)


@register_pruner
class WandaPruner(Pruner):
    name = "wanda"
    stat = InputNormStat

    def prune(self, weight: torch.Tensor, stat: InputStat | None, target: Target,
              label: str | None = None) -> PruneResult:
        if stat is None or not hasattr(stat, "sq_norm"):
            fix = option("method='magnitude'", "--method magnitude")
            raise LosaError(f"wanda needs calibration data; pass {option('calib')}, or use {fix}")
        norm = stat.sq_norm.sqrt().float()
        mask = scores_to_mask(wanda_scores(weight, norm), target, per_row=True)
        return PruneResult(weight * mask, mask)
