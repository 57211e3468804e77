"""The contract between the layer-sequential engine and what it runs over each decoder layer.

A visitor subclasses :class:`LayerVisitor` and declares, as class attributes, how the engine must
run it; the engine reads nothing else from it (no attribute probing). Per decoder layer the engine
calls, in order:

1. :meth:`LayerVisitor.before_layer` — weight changes that must be in place before the layer runs
   (e.g. merging a layer's adapters so the calibration forward sees the merged weights);
2. :meth:`LayerVisitor.stats_for` — the input statistics to gather for the layer's linear modules;
3. the layer's calibration forward (in single-pass mode, :meth:`LayerVisitor.visit_module` for each
   linear at its first call, before it computes);
4. :meth:`LayerVisitor.visit` with a :class:`LayerContext` — prune, measure, or record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from losa.pruning.stats import InputStat

if TYPE_CHECKING:  # pragma: no cover
    from losa.calib.engine import LayerwiseEngine


@dataclass
class LayerContext:
    """What a visitor sees for one decoder layer.

    Attributes:
        index: the decoder layer's index.
        layer: the decoder layer module.
        linears: its prunable linear modules by name relative to the layer (e.g. ``self_attn.q_proj``).
        stats: the statistics gathered for them (as asked by :meth:`LayerVisitor.stats_for`).
        inputs: the layer's inputs, one ``[batch, seq, hidden]`` tensor per calibration batch.
        outputs: the layer's outputs (same shapes); empty when the statistics pass stopped early.
        single_pass: the layer ran in single-pass mode (outputs are those of the modified layer).
        seen: in single-pass mode, the modules already handed to :meth:`LayerVisitor.visit_module`.
        outputs_skipped: the statistics pass stopped before the layer's last projection (no outputs).
        chunked_mlp: the gated MLP ran in token chunks.
        modified: set by the visitor after changing weights, so the engine recomputes the outputs.
    """

    index: int
    layer: nn.Module
    linears: dict[str, nn.Module]
    stats: dict[str, InputStat]
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    engine: LayerwiseEngine
    single_pass: bool = False
    seen: frozenset[str] = field(default_factory=frozenset)
    outputs_skipped: bool = False
    chunked_mlp: bool = False
    modified: bool = False

    def forward(self, inputs: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run this layer (as it is now) over ``inputs`` (default: the calibration inputs).

        Returns:
            one output ``[batch, seq, hidden]`` per input batch.
        """
        return self.engine.forward_layer(self.layer, self.inputs if inputs is None else inputs)


class LayerVisitor:
    """Base of every calibration-engine visitor.

    Class attributes (the declared contract):
        single_pass: hand each linear to :meth:`visit_module` at its first call, inside the one forward
            that also yields the layer's outputs (used when all calibration samples form one batch).
        needs_outputs: :meth:`visit` reads ``ctx.outputs``; when False and statistics are gathered, the
            statistics pass stops once every linear has seen its input.
    """

    single_pass: bool = False
    needs_outputs: bool = True

    def before_layer(self, index: int, linears: dict[str, nn.Module]) -> None:
        """Change weights before the layer's calibration forward (default: nothing)."""

    def stats_for(self, index: int, linears: dict[str, nn.Module]) -> dict[str, InputStat]:
        """The statistics to gather for this layer's linear modules (default: none)."""
        return {}

    def visit(self, ctx: LayerContext) -> None:
        """Inspect or modify the layer; set ``ctx.modified = True`` after changing weights."""

    def visit_module(self, index: int, name: str, module: nn.Module, stat: InputStat) -> None:
        """Single-pass mode: act on one linear before its first call computes (with ``stat`` filled).

        Raises:
            NotImplementedError: a visitor that sets ``single_pass`` must implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} sets single_pass but has no visit_module")
