"""Pruner interface and registry. A new pruner is one class decorated with ``@register_pruner``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from losa.errors import LosaError, option
from losa.pruning.stats import InputStat
from losa.pruning.target import Target
from losa.utils.config import LosaConfig


class PrunerOptions(LosaConfig):
    """A pruner's own options (none by default). A pruner with options subclasses this as its ``Options``;
    each default is written once, there. They reach the CLI as flags and a recipe as ``options:``."""


@dataclass
class PruneResult:
    weight: torch.Tensor  #: the pruned (and possibly updated) weight, ``[out, in]``, zeros where ``mask`` is False
    mask: torch.Tensor  #: boolean keep-mask, ``[out, in]``


class Pruner(ABC):
    """Maps (weight, input statistic, target) to a pruned weight and its mask. Pure: no model access.

    Args:
        options: the pruner's :attr:`Options` (an instance or a mapping of its fields).
    Raises:
        LosaError: an option this pruner does not have (one line naming the pruner that owns it).
    """

    name: str = ""
    #: the pruner's typed options (an empty config for a pruner with none)
    Options: type[PrunerOptions] = PrunerOptions
    #: the statistic class this pruner needs from calibration, or None (data-free)
    stat: type[InputStat] | None = None
    #: with ``sequential: auto``, prune each linear at its first call in one pass per layer ("module"
    #: order) instead of from the unpruned layer's statistics ("layer" order). Chosen per method from
    #: measurements (benchmarks/results/prune.md): SparseGPT's error compensation gains from seeing the
    #: already-pruned upstream modules; Wanda at 70 % and 2:4 is better with the reference "layer" order.
    single_pass_default: bool = False

    def __init__(self, options: PrunerOptions | dict | None = None) -> None:
        if isinstance(options, self.Options):
            self.options = options
        else:
            values = dict(options or {})
            check_options(self.name, values)
            self.options = self.Options(**values)

    @abstractmethod
    def prune(self, weight: torch.Tensor, stat: InputStat | None, target: Target,
              label: str | None = None) -> PruneResult:
        """Prune one weight matrix.

        Args:
            weight: ``[out, in]``.
            stat: the module's input statistic (None for data-free pruners).
            target: unstructured sparsity or N:M pattern.
            label: the module's name (e.g. ``layer 3 self_attn.q_proj``), for warnings and errors.
        Returns:
            The pruned weight and its boolean keep-mask.
        Raises:
            LosaError: missing calibration statistic or a target the pruner cannot meet.
        """


_PRUNERS: dict[str, type[Pruner]] = {}


def register_pruner(cls: type[Pruner]) -> type[Pruner]:
    if not cls.name:
        raise ValueError("a pruner needs a name")
    _PRUNERS[cls.name] = cls
    return cls


def available_pruners() -> list[str]:
    """Names of the registered pruners, sorted."""
    return sorted(_PRUNERS)


def pruner_classes() -> dict[str, type[Pruner]]:
    """Registered pruner classes by name, sorted by name."""
    return {n: _PRUNERS[n] for n in available_pruners()}


def pruner_class(name: str) -> type[Pruner]:
    """The pruner class registered as ``name``.

    Raises:
        LosaError: no such pruner (the message lists the registered ones).
    """
    try:
        return _PRUNERS[name]
    except KeyError:
        raise LosaError(f"unknown pruning method {name!r}; choose one of {', '.join(available_pruners())}") from None


def check_options(method: str, options: dict) -> None:
    """Fail with one line when ``options`` holds a key that ``method``'s pruner does not have.

    Raises:
        LosaError: naming the option, the pruner that owns it (if any) and the fix.
    """
    own = pruner_class(method).Options.model_fields
    for key in options:
        if key in own:
            continue
        owners = [n for n, c in pruner_classes().items() if key in c.Options.model_fields]
        where = f"it is an option of {' / '.join(owners)}" if owners else "no pruner has it"
        chosen = option(f"method={method!r}", f"--method {method}")
        raise LosaError(f"option {key!r} does not apply to {chosen}: {where}; drop it or change the method")


def get_pruner(name: str, options: PrunerOptions | dict | None = None) -> Pruner:
    """Instantiate the pruner registered as ``name`` with its options.

    Raises:
        LosaError: unknown pruner, or an option it does not have.
    """
    return pruner_class(name)(options)
