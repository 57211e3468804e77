"""Modules without calibration tokens: an idle mixture-of-experts expert (no token routed to it) has an
empty Wanda norm / SparseGPT Hessian, so its mask would be arbitrary. Such a module is pruned by
magnitude instead, and the visitor warns once per decoder layer naming the idle experts."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import torch

from losa.pruning.base import Pruner, PruneResult
from losa.pruning.magnitude import MagnitudePruner
from losa.pruning.stats import InputStat
from losa.pruning.target import Target


def prune_weight(pruner: Pruner, weight: torch.Tensor, stat: InputStat | None,
                 target: Target, label: str = "") -> tuple[PruneResult, bool]:
    """Prune ``weight`` with ``pruner``, or by magnitude when its statistic saw no token.

    Args:
        pruner: the method.
        weight: ``[out, in]``.
        stat: the module's input statistic (None for data-free pruners).
        target: sparsity or N:M pattern.
        label: names the module in the pruner's warnings (e.g. ``layer 3 mlp.down_proj``).
    Returns:
        the result, and whether the magnitude fallback was used (``stat`` is empty and ``pruner`` needs data).
    Raises:
        LosaError: from the pruner (e.g. Wanda without any statistic).
    """
    if pruner.stat is not None and stat is not None and stat.tokens == 0:
        return MagnitudePruner().prune(weight, None, target, label=label), True
    return pruner.prune(weight, stat, target, label=label), False


def warn_idle(index: int, names: Sequence[str], method: str) -> None:
    """Warn that the modules ``names`` of decoder layer ``index`` got no tokens and were pruned by magnitude.

    Args:
        index: the decoder layer.
        names: module names relative to the layer (e.g. ``mlp.experts.3.gate_proj``); nothing happens if empty.
        method: the pruner that could not be used.
    """
    if not names:
        return
    # the expert is the name up to its index (a LoSA run names the adapter's base: mlp.experts.3.up_proj.base)
    experts = list(dict.fromkeys(m.group(1) if (m := re.match(r"(.*experts\.\d+)\.", n)) else n.rpartition(".")[0]
                                 or n for n in names))
    warnings.warn(f"decoder layer {index}: {len(experts)} expert(s) got no calibration tokens ({', '.join(experts)}); "
                  f"their {len(names)} matrices were pruned by magnitude instead of {method}", stacklevel=3)
