"""Pruner interface and registry. A new pruner is one class decorated with ``@register_pruner``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from losa.calib.stats import InputStat
from losa.errors import LosaError
from losa.pruning.target import Target


@dataclass
class PruneResult:
    weight: torch.Tensor  #: the pruned (and possibly updated) weight, ``[out, in]``, zeros where ``mask`` is False
    mask: torch.Tensor  #: boolean keep-mask, ``[out, in]``


class Pruner(ABC):
    """Maps (weight, input statistic, target) to a pruned weight and its mask. Pure: no model access."""

    name: str = ""
    #: the statistic class this pruner needs from calibration, or None (data-free)
    stat: type[InputStat] | None = None
    #: with ``sequential: auto``, prune each linear at its first call in one pass per layer ("module"
    #: order) instead of from the unpruned layer's statistics ("layer" order). Chosen per method from
    #: measurements (benchmarks/results/prune.md): SparseGPT's error compensation gains from seeing the
    #: already-pruned upstream modules; Wanda at 70 % and 2:4 is better with the reference "layer" order.
    single_pass_default: bool = False

    def __init__(self, **options: object) -> None:
        self.options = options

    @abstractmethod
    def prune(self, weight: torch.Tensor, stat: InputStat | None, target: Target) -> PruneResult: ...


_PRUNERS: dict[str, type[Pruner]] = {}


def register_pruner(cls: type[Pruner]) -> type[Pruner]:
    if not cls.name:
        raise ValueError("a pruner needs a name")
    _PRUNERS[cls.name] = cls
    return cls


def available_pruners() -> list[str]:
    return sorted(_PRUNERS)


def get_pruner(name: str, **options: object) -> Pruner:
    try:
        cls = _PRUNERS[name]
    except KeyError:
        raise LosaError(f"unknown pruning method {name!r}; choose one of {', '.join(available_pruners())}") from None
    return cls(**options)
