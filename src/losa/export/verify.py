"""Sparsity verification: per-module, per-layer and overall sparsity, and N:M pattern checks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, Field
from torch import nn

from losa.errors import LosaError, SparsityVerificationError
from losa.models.offload import onloaded
from losa.models.registry import get_arch, get_decoder_layers, prunable_weights
from losa.pruning.masks import check_nm, max_nonzeros_per_group, parse_nm, validate_nm
from losa.pruning.target import Target

#: N:M patterns that ``inspect`` reports when no pattern is given
COMMON_M = (4, 8, 16)


class ModuleSparsity(BaseModel):
    """Sparsity of one prunable linear module."""

    name: str = Field(description="full module name, e.g. model.layers.3.mlp.down_proj")
    layer: int = Field(description="decoder layer index")
    module: str = Field(description="name inside the decoder layer, e.g. mlp.down_proj")
    shape: list[int] = Field(description="[out_features, in_features]")
    numel: int
    zeros: int
    sparsity: float = Field(description="zeros / numel")
    nm: str | None = Field(None, description="the N:M pattern checked, e.g. 2:4")
    nm_ok: bool | None = Field(None, description="every group of M inputs holds at most N non-zeros")
    max_nonzeros_per_group: dict[str, int | None] | None = Field(
        None, description="without a pattern: the most non-zeros in any group of M (per M in COMMON_M)")


class LayerSparsity(BaseModel):
    """Sparsity of one decoder layer's prunable linear modules together."""

    layer: int
    numel: int
    zeros: int
    sparsity: float


class SparsityReport(BaseModel):
    """Per-module, per-layer and overall sparsity of a model's decoder layers (``losa prune`` records it in the
    checkpoint's ``losa.json``; ``losa.save_checkpoint`` writes only the manifest it is given)."""

    modules: dict[str, ModuleSparsity]
    layers: list[LayerSparsity]
    overall: float = Field(description="zeros / numel over every prunable linear of the decoder layers")
    numel: int


def module_report(weight: torch.Tensor, nm: tuple[int, int] | None = None, name: str = "", layer: int = -1,
                  module: str = "") -> ModuleSparsity:
    """Sparsity of one weight ``[out, in]``; checks ``nm`` = (N, M) when given."""
    w = weight.detach()
    zeros = int((w == 0).sum())
    rep = ModuleSparsity(name=name, layer=layer, module=module, shape=list(w.shape), numel=w.numel(), zeros=zeros,
                         sparsity=zeros / w.numel())
    if nm is not None:
        rep.nm = f"{nm[0]}:{nm[1]}"
        rep.nm_ok = check_nm(w, *nm)
    else:
        rep.max_nonzeros_per_group = {str(m): max_nonzeros_per_group(w, m) for m in COMMON_M}
    return rep


NMArg = tuple[int, int] | str | None


def _pattern(nm: NMArg) -> tuple[int, int] | None:
    if nm is None:
        return None
    if isinstance(nm, str):
        return parse_nm(nm)
    if not (isinstance(nm, tuple | list) and len(nm) == 2):
        raise LosaError(f"N:M pattern {nm!r} must be (N, M) or 'N:M', e.g. (2, 4) or '2:4'")
    validate_nm(*nm)
    return int(nm[0]), int(nm[1])


def _per_layer(nm: NMArg | Sequence[NMArg], num_layers: int) -> list[tuple[int, int] | None]:
    """``nm`` of :func:`sparsity_report` as one checked pattern (or None) per decoder layer."""
    one = nm is None or isinstance(nm, str) or (isinstance(nm, tuple | list) and len(nm) == 2
                                                  and all(isinstance(x, int) for x in nm))
    if one:
        return [_pattern(nm)] * num_layers  # type: ignore[arg-type]
    per = list(nm)  # type: ignore[arg-type]
    if len(per) != num_layers:
        raise LosaError(f"nm lists {len(per)} patterns for {num_layers} decoder layers; give one per layer or a "
                        "single pattern")
    return [_pattern(x) for x in per]


def sparsity_report(model: nn.Module, nm: NMArg | Sequence[NMArg] = None) -> SparsityReport:
    """Sparsity of every prunable weight in the decoder layers, per layer and overall.

    Weights offloaded by accelerate are onloaded one decoder layer at a time.
    Fused mixture-of-experts tensors count as their expert matrices (``mlp.experts.<e>.gate_proj`` ...,
    see :func:`~losa.models.registry.prunable_weights`), so experts left dense fail :func:`verify_targets`
    (unless its ``ignore`` patterns name them).

    Args:
        model: a model of a registered architecture.
        nm: one N:M pattern for all layers (``(2, 4)`` or ``"2:4"``), or one per layer (mixed N:M), to
            check; None: report the largest non-zero count per group for M in :data:`COMMON_M`.
    Returns:
        the typed report.
    Raises:
        LosaError: the model's architecture is not registered (or its experts cannot be pruned); an
            invalid pattern, or a per-layer list of another length than the decoder layers.
    """
    spec = get_arch(model)
    layers = get_decoder_layers(model, spec)
    per_layer_nm = _per_layer(nm, len(layers))
    modules: dict[str, ModuleSparsity] = {}
    layer_rows = []
    total = zeros = 0
    prefix = spec.layers_path
    for i, layer in enumerate(layers):
        lz = ln = 0
        with onloaded(layer):  # weights offloaded by accelerate are read one layer at a time
            for name, weight in prunable_weights(layer, spec).items():
                full = f"{prefix}.{i}.{name}"
                rep = module_report(weight, per_layer_nm[i], full, i, name)  # type: ignore[arg-type]
                modules[full] = rep
                lz += rep.zeros
                ln += rep.numel
        layer_rows.append(LayerSparsity(layer=i, numel=ln, zeros=lz, sparsity=lz / max(ln, 1)))
        total += ln
        zeros += lz
    return SparsityReport(modules=modules, layers=layer_rows, overall=zeros / max(total, 1), numel=total)


def verify_targets(report: SparsityReport, targets: Sequence[Target], tol: float | None = None,
                   ignore: Sequence[str] = ()) -> None:
    """Fail loudly when a module misses its layer's target sparsity or N:M pattern.

    Args:
        report: from :func:`sparsity_report` (with the targets' N:M patterns checked).
        targets: one target per decoder layer.
        tol: allowed shortfall in sparsity (default: one weight per row, ``1 / in_features``).
        ignore: glob patterns of the linears left dense (``ignore`` of ``PruneConfig`` / ``LoSAConfig``,
            :mod:`losa.pruning.ignore`), which are not checked.
    Raises:
        SparsityVerificationError: naming the first three modules that miss (and how many more).
    """
    from losa.pruning.ignore import module_ignored

    failures = []
    for name, rep in report.modules.items():
        if module_ignored(ignore, rep):
            continue
        t = targets[rep.layer]
        slack = tol if tol is not None else 1.0 / rep.shape[1] + 1e-6
        if rep.sparsity < t.sparsity - slack:
            failures.append(f"{name}: {rep.sparsity:.4f} < target {t.sparsity:.4f}")
        if t.is_nm and not rep.nm_ok:
            failures.append(f"{name}: violates {t.n}:{t.m}")
    if failures:
        more = f" (+{len(failures) - 3} more)" if len(failures) > 3 else ""
        raise SparsityVerificationError("sparsity verification failed: " + "; ".join(failures[:3]) + more)
