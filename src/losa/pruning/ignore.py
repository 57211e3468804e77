"""Linears that pruning leaves dense (``ignore`` of ``PruneConfig`` and ``LoSAConfig``, llm-compressor's name).

A pattern is a glob (``fnmatch``, case-sensitive) matched against each prunable linear's name inside its decoder
layer (``mlp.down_proj``, ``mlp.experts.3.gate_proj``), against the same name with the layer index in front
(``0.self_attn.q_proj``), and against its full name in the model (``model.layers.0.self_attn.q_proj``, as
``losa inspect --modules`` and ``losa.json`` show it). So ``mlp.down_proj`` leaves every layer's down projection
dense, ``0.*`` all of the first layer and ``31.self_attn.*`` the attention of layer 31.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from torch import nn

from losa.errors import LosaError
from losa.models.registry import get_arch, get_decoder_layers, prunable_weights


def is_ignored(patterns: Sequence[str], layer: int, name: str, layers_path: str = "") -> bool:
    """Whether a linear matches one of ``patterns``.

    Args:
        patterns: glob patterns (see the module docstring).
        layer: index of its decoder layer.
        name: its name inside the decoder layer, e.g. ``mlp.down_proj``.
        layers_path: the decoder layers' path in the model (``ArchSpec.layers_path``, e.g. ``model.layers``);
            empty: full names are not tried.
    Returns:
        True if a pattern matches the name, ``<layer>.<name>`` or ``<layers_path>.<layer>.<name>``.
    """
    names = [name, f"{layer}.{name}"] + ([f"{layers_path}.{layer}.{name}"] if layers_path else [])
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def _collapsed(names: list[str]) -> str:
    """The names inside a decoder layer, each expert matrix once (``mlp.experts.<e>.gate_proj``)."""
    return ", ".join(dict.fromkeys(re.sub(r"\.experts\.\d+\.", ".experts.<e>.", n) for n in names))


def check_ignore(model: nn.Module, patterns: Sequence[str]) -> int:
    """Check ``patterns`` against ``model`` before any work.

    Args:
        model: a causal LM of a registered architecture.
        patterns: the glob patterns of ``ignore``.
    Returns:
        How many prunable linears (expert matrices counted one by one) the patterns leave dense.
    Raises:
        LosaError: a pattern that matches no linear of the decoder layers (a typo would otherwise prune
            everything silently; the message lists the names, or says that a regular expression, or a module
            outside the decoder layers such as ``lm_head``, is not how the patterns work), or patterns that leave
            nothing to prune.
    """
    if not patterns:
        return 0
    spec = get_arch(model)
    names = [(i, n) for i, layer in enumerate(get_decoder_layers(model, spec)) for n in prunable_weights(layer, spec)]
    for p in patterns:
        if any(is_ignored([p], i, n, spec.layers_path) for i, n in names):
            continue
        if p.startswith("re:"):
            raise LosaError(f"ignore pattern {p!r} is a regular expression (llm-compressor's re:); losa takes glob "
                            f"patterns such as mlp.down_proj, *.down_proj or 0.self_attn.*")
        named = [n for n, _ in model.named_modules() if n and fnmatch.fnmatchcase(n, p)]
        inside = [n for n in named if n.startswith(f"{spec.layers_path}.")]
        if inside:
            raise LosaError(f"ignore pattern {p!r} names {inside[0]}, a module of the decoder layers that is not a "
                            f"prunable linear (a block, a norm or a router, which losa never prunes); for the linears "
                            f"inside a block end the pattern in .*, e.g. {p}.*")
        if named:
            raise LosaError(f"ignore pattern {p!r} names {named[0]}, which is outside the decoder layers: losa "
                            "prunes only the decoder layers' linears (never the LM head or the embeddings), so "
                            "drop it")
        inner = [n for _, n in names]
        leaf = [n for n in inner if n.endswith(f".{p}")]
        hint = (f"for every {p} write *.{p}" if leaf else
                f"or with the layer index in front, e.g. 0.{inner[0].split('.')[0]}.*")
        raise LosaError(f"ignore pattern {p!r} matches no linear of the decoder layers ({_collapsed(inner)}; {hint}); "
                        "fix or drop it")
    ignored = sum(is_ignored(patterns, i, n, spec.layers_path) for i, n in names)
    if ignored == len(names):
        raise LosaError(f"ignore {','.join(patterns)} leaves every linear of the decoder layers dense: nothing would "
                        "be pruned; narrow the patterns")
    return ignored


def module_ignored(patterns: Sequence[str], module) -> bool:
    """:func:`is_ignored` for a :class:`~losa.export.verify.ModuleSparsity` row (its ``layer``, its ``module`` name
    inside the layer and its full ``name``)."""
    return is_ignored(patterns, module.layer, module.module) or any(fnmatch.fnmatchcase(module.name, p)
                                                                   for p in patterns)

