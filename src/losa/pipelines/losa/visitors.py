"""Calibration-engine visitors used by LoSA: RMI Grams (+ OWL outlier ratios) and adapter-aware pruning.

Both see the model with its sparse LoRA adapters active, which computes exactly what the merged
model computes, so "merge, then measure / prune" needs no global merge: the prune visitor merges
one decoder layer's adapters just before that layer's calibration forward, prunes the merged
weights, and unmerges them with the new masks (see :meth:`SparseLoRALinear.unmerge`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from losa.allocation.allocators import outlier_ratio
from losa.allocation.cka import GramAccumulator
from losa.calib.visitor import LayerContext, LayerVisitor
from losa.lora.layer import SparseLoRALinear
from losa.models.linear import get_weight, in_features, set_weight
from losa.pruning.base import Pruner
from losa.pruning.idle import prune_weight, warn_idle
from losa.pruning.ignore import is_ignored
from losa.pruning.stats import InputNormStat, InputStat
from losa.pruning.target import Target
from losa.pruning.wanda import wanda_scores


def _merge_layer(linears: dict[str, nn.Module], wrappers: dict[int, SparseLoRALinear]) -> None:
    for m in linears.values():
        w = wrappers.get(id(m))
        if w is not None:
            w.merge(keep_original=True)


@dataclass
class RMIVisitor(LayerVisitor):
    """Accumulates each layer's n×n Gram of its inputs (or outputs); optionally OWL outlier ratios."""

    acc: GramAccumulator
    features: str = "inputs"
    owl_m: float | None = None
    wrappers: dict[int, SparseLoRALinear] = field(default_factory=dict)
    outlier_ratios: dict[int, float] = field(default_factory=dict)
    grams: bool = True  #: accumulate the Grams (off: OWL's outlier ratios only)

    def before_layer(self, index: int, linears: dict[str, nn.Module]) -> None:
        if self.owl_m is not None:  # OWL scores the merged weights: merge, so the base modules (and hooks) run
            _merge_layer(linears, self.wrappers)

    def stats_for(self, index: int, linears: dict[str, nn.Module]) -> dict[str, InputStat]:
        if self.owl_m is None:
            return {}
        return {n: InputNormStat(in_features(m), device=get_weight(m).device) for n, m in linears.items()}

    def visit(self, ctx: LayerContext) -> None:
        feats = ctx.inputs if self.features == "inputs" else ctx.outputs
        # Grams are sums over feature columns; with batched calibration the rows arrive in pieces, so
        # assemble the full [n, ...] block one sequence chunk at a time to bound the float64 copy.
        _, seq, hidden = feats[0].shape
        step = max(1, (1 << 24) // max(1, self.acc.n * hidden))
        for s in range(0, seq, step) if self.grams else ():
            self.acc.update(ctx.index, torch.cat([f[:, s:s + step] for f in feats], 0))
        if self.owl_m is not None:
            scores = [wanda_scores(get_weight(m).detach(), ctx.stats[n].norm).reshape(-1)
                      for n, m in ctx.linears.items()]
            self.outlier_ratios[ctx.index] = outlier_ratio(torch.cat(scores), self.owl_m)
            for m in ctx.linears.values():
                w = self.wrappers.get(id(m))
                if w is not None and w.merged:
                    w.unmerge()  # bit-exact restore of the pre-merge weight


@dataclass
class AdapterPruneVisitor(LayerVisitor):
    """Per decoder layer: merge its adapters, prune the merged weights to the layer's target, unmerge
    with the new masks. ``wrappers`` maps ``id(base linear)`` to its :class:`SparseLoRALinear`. Linears that
    ``ignore`` names are left dense: their merge is undone bit for bit and their masks stay as they were."""

    pruner: Pruner
    targets: list[Target]
    wrappers: dict[int, SparseLoRALinear]
    needs_outputs: bool = False  #: the layer is recomputed after pruning
    ignore: tuple[str, ...] = ()  #: glob patterns of linears left dense (:mod:`losa.pruning.ignore`)
    layers_path: str = ""  #: the decoder layers' path in the model, for full names in ``ignore``

    def ignored(self, index: int, name: str, mod: nn.Module) -> bool:
        # an adapter's base linear is named inside its wrapper (mlp.down_proj.base); ignore names the wrapper
        wrapped = name.removesuffix(".base") if id(mod) in self.wrappers else name
        return is_ignored(self.ignore, index, wrapped, self.layers_path)

    def before_layer(self, index: int, linears: dict[str, nn.Module]) -> None:
        _merge_layer(linears, self.wrappers)  # the calibration forward now runs the merged weights

    def stats_for(self, index: int, linears: dict[str, nn.Module]) -> dict[str, InputStat]:
        if self.pruner.stat is None:
            return {}
        return {n: self.pruner.stat(in_features(m), device=get_weight(m).device) for n, m in linears.items()
                if not self.ignored(index, n, m)}

    def visit(self, ctx: LayerContext) -> None:
        idle = []
        for name, mod in ctx.linears.items():
            w = self.wrappers.get(id(mod))
            if self.ignored(ctx.index, name, mod):  # left dense: the merge is undone bit for bit
                if w is not None and w.merged:
                    w.unmerge()
                continue
            res, no_tokens = prune_weight(self.pruner, get_weight(mod).detach(), ctx.stats.get(name),
                                          self.targets[ctx.index],
                                          label=f"layer {ctx.index} {name}")
            if no_tokens:  # an expert no calibration token was routed to: pruned by magnitude
                idle.append(name)
            if w is not None:
                w.unmerge(res.weight, res.mask)
            else:
                set_weight(mod, res.weight)
        warn_idle(ctx.index, idle, self.pruner.name)
        ctx.modified = True
