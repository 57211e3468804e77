"""Uniform access to the weight of a prunable linear module, whatever its class.

Most families use ``nn.Linear`` (weight ``[out, in]``); GPT-2 uses ``transformers``' ``Conv1D``
(weight ``[in, out]``). Pruners always see ``[out, in]``.
"""

from __future__ import annotations

import torch
from torch import nn

try:  # transformers >= 4.x keeps Conv1D here
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def is_transposed(module: nn.Module) -> bool:
    return bool(Conv1D) and isinstance(module, Conv1D)


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (a view; do not write through it)."""
    w = module.weight
    return w.t() if is_transposed(module) else w


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Copy an ``[out, in]`` weight back into the module, in its own layout and dtype."""
    with torch.no_grad():
        target = module.weight
        src = weight.t() if is_transposed(module) else weight
        target.copy_(src.to(dtype=target.dtype, device=target.device))


def in_features(module: nn.Module) -> int:
    return get_weight(module).shape[1]
