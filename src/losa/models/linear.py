"""Uniform access to the weight of a prunable linear module, whatever its class.

Most families use ``nn.Linear`` (weight ``[out, in]``); GPT-2 uses ``transformers``' ``Conv1D``
(weight ``[in, out]``). Pruners always see ``[out, in]``.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def _conv1d() -> type | None:
    """transformers' ``Conv1D`` if transformers is loaded (a model that has one has loaded it), else None;
    so that importing losa does not import transformers."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None)


def is_prunable(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2)."""
    return isinstance(module, nn.Linear) or is_transposed(module)


def is_transposed(module: nn.Module) -> bool:
    """True for a ``Conv1D``, whose weight is stored ``[in, out]``."""
    conv = _conv1d()
    return conv is not None and isinstance(module, conv)


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
