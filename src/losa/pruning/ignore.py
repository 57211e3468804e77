"""Linears that one-shot pruning leaves dense (``PruneConfig.ignore``, llm-compressor's ``ignore``).

A pattern is a glob (``fnmatch``) matched against each prunable linear's name inside its decoder layer
(``mlp.down_proj``, ``mlp.experts.3.gate_proj``) and against the same name with the layer index in front
(``0.self_attn.q_proj``), so ``mlp.down_proj`` leaves every layer's down projection dense, ``0.*`` all of the
first layer and ``31.self_attn.*`` the attention of layer 31.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from losa.errors import LosaError
from losa.models.registry import get_arch, get_decoder_layers, prunable_weights


def is_ignored(patterns: Sequence[str], layer: int, name: str) -> bool:
    """Whether the linear ``name`` (inside decoder layer ``layer``) matches one of ``patterns``."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(f"{layer}.{name}", p) for p in patterns)


def check_ignore(model: nn.Module, patterns: Sequence[str]) -> int:
    """Check ``patterns`` against ``model`` before any work.

    Args:
        model: a causal LM of a registered architecture.
        patterns: the glob patterns of ``PruneConfig.ignore``.
    Returns:
        How many prunable linears (expert matrices counted one by one) the patterns leave dense.
    Raises:
        LosaError: a pattern that matches no linear (a typo would otherwise prune everything silently; the
            message lists the names), or patterns that leave nothing to prune.
    """
    if not patterns:
        return 0
    spec = get_arch(model)
    names = [(i, n) for i, layer in enumerate(get_decoder_layers(model, spec)) for n in prunable_weights(layer, spec)]
    for p in patterns:
        if not any(is_ignored([p], i, n) for i, n in names):
            inside = ", ".join(dict.fromkeys(n for _, n in names))
            raise LosaError(f"ignore pattern {p!r} matches no linear of the decoder layers ({inside}; with a layer "
                            "index in front, e.g. 0.self_attn.*); fix or drop it")
    ignored = sum(is_ignored(patterns, i, n) for i, n in names)
    if ignored == len(names):
        raise LosaError(f"ignore {','.join(patterns)} leaves every linear of the decoder layers dense: nothing would "
                        "be pruned; narrow the patterns")
    return ignored
