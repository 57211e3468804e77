"""Sparsity verification: per-module, per-layer and overall sparsity, and N:M pattern checks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from losa.errors import SparsityVerificationError
from losa.models.linear import get_weight
from losa.models.registry import get_arch, get_decoder_layers, linear_modules
from losa.pruning.masks import check_nm, max_nonzeros_per_group
from losa.pruning.target import Target

#: N:M patterns that ``inspect`` reports when no pattern is given
COMMON_M = (4, 8, 16)


def module_report(weight: torch.Tensor, nm: tuple[int, int] | None = None) -> dict:
    w = weight.detach()
    zeros = int((w == 0).sum())
    rep: dict = {"shape": list(w.shape), "numel": w.numel(), "zeros": zeros, "sparsity": zeros / w.numel()}
    if nm is not None:
        rep["nm"] = f"{nm[0]}:{nm[1]}"
        rep["nm_ok"] = check_nm(w, *nm)
    else:
        rep["max_nonzeros_per_group"] = {str(m): max_nonzeros_per_group(w, m) for m in COMMON_M}
    return rep


def sparsity_report(model: nn.Module, nm: tuple[int, int] | Sequence[tuple[int, int] | None] | None = None) -> dict:
    """Sparsity of every prunable linear module in the decoder layers, per layer and overall.

    ``nm`` is one pattern for all layers or one per layer (mixed N:M) to check against.
    """
    spec = get_arch(model)
    layers = get_decoder_layers(model, spec)
    per_layer_nm = list(nm) if isinstance(nm, list | tuple) and nm and not isinstance(nm[0], int) else [nm] * len(layers)
    modules: dict[str, dict] = {}
    layer_rows = []
    total = zeros = 0
    prefix = spec.layers_path
    for i, layer in enumerate(layers):
        lz = ln = 0
        for name, mod in linear_modules(layer, spec).items():
            rep = module_report(get_weight(mod), per_layer_nm[i])  # type: ignore[arg-type]
            modules[f"{prefix}.{i}.{name}"] = rep
            lz += rep["zeros"]
            ln += rep["numel"]
        layer_rows.append({"layer": i, "numel": ln, "zeros": lz, "sparsity": lz / ln})
        total += ln
        zeros += lz
    return {"modules": modules, "layers": layer_rows, "overall": zeros / max(total, 1), "numel": total}


def verify_targets(report: dict, targets: Sequence[Target], tol: float | None = None) -> None:
    """Fail loudly when a module misses its layer's target sparsity or N:M pattern."""
    failures = []
    for name, rep in report["modules"].items():
        t = targets[_layer_index(name)]
        in_f = rep["shape"][1]
        slack = tol if tol is not None else 1.0 / in_f + 1e-6
        if rep["sparsity"] < t.sparsity - slack:
            failures.append(f"{name}: {rep['sparsity']:.4f} < target {t.sparsity:.4f}")
        if t.is_nm and not rep.get("nm_ok", False):
            failures.append(f"{name}: violates {t.n}:{t.m}")
    if failures:
        more = f" (+{len(failures) - 3} more)" if len(failures) > 3 else ""
        raise SparsityVerificationError("sparsity verification failed: " + "; ".join(failures[:3]) + more)


def _layer_index(module_name: str) -> int:
    for part in module_name.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(module_name)
