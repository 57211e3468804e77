"""Linear CKA between layer representations, from n×n Gram matrices (pure math, no model hooks).

For representations X (n×p) and Y (n×q), one row per sample, with K = XXᵀ, L = YYᵀ and the
centring matrix H = I − 11ᵀ/n::

    HSIC(K, L) = tr(K H L H)          (the 1/(n−1)² factor cancels in CKA)
    CKA(K, L)  = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))

Only the Grams are needed, so a layer's features (n × seqlen·hidden) never have to be kept: the
:class:`GramAccumulator` adds ``X_c X_cᵀ`` for each chunk of feature columns as the calibration pass
produces it, in float64. Memory is O(L·n²) for L layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from losa.errors import LosaError

_EPS = 1e-300


def gram(features: torch.Tensor, chunk_cols: int = 1 << 20) -> torch.Tensor:
    """``X Xᵀ`` in float64 for ``features`` of shape [n, ...] (trailing dims flattened), chunk by chunk."""
    x = features.reshape(features.shape[0], -1)
    n, p = x.shape
    out = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    step = max(1, chunk_cols // max(n, 1))
    for start in range(0, p, step):
        c = x[:, start : start + step].to(torch.float64)
        out.addmm_(c, c.T)
    return out


def center_gram(k: torch.Tensor) -> torch.Tensor:
    """``H K H`` with H = I − 11ᵀ/n (double centring: subtract row and column means, add grand mean)."""
    k = k.to(torch.float64)
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def hsic(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741
    """tr(K H L H) for symmetric Grams (= ⟨HKH, HLH⟩_F)."""
    return float((center_gram(k) * center_gram(l)).sum())


def cka_from_grams(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741
    """Linear CKA of two representations given their n×n Grams; 0 when either is constant."""
    if k.shape != l.shape or k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise LosaError(f"CKA needs two n×n Gram matrices of the same size, got {tuple(k.shape)} and {tuple(l.shape)}")
    kc, lc = center_gram(k), center_gram(l)
    denom = float(torch.sqrt((kc * kc).sum() * (lc * lc).sum()))
    if denom <= _EPS:
        return 0.0
    return float((kc * lc).sum()) / denom


def cka_matrix(grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """L×L float64 matrix of pairwise linear CKA (diagonal 1 for non-constant layers)."""
    if len(grams) == 0:
        raise LosaError("cka_matrix needs at least one Gram matrix; run the calibration pass first")
    cent = [center_gram(g) for g in grams]
    flat = torch.stack([c.reshape(-1) for c in cent])  # [L, n²]
    inner = flat @ flat.T
    norms = torch.sqrt(torch.clamp(torch.diagonal(inner), min=0))
    denom = norms[:, None] * norms[None, :]
    out = torch.where(denom > _EPS, inner / torch.where(denom > _EPS, denom, 1.0), torch.zeros_like(inner))
    return out


class GramAccumulator:
    """Streaming per-layer Grams: ``update(layer, chunk)`` adds ``chunk chunkᵀ`` to layer's Gram.

    ``chunk`` is [n, ...]: all n samples, any subset of the feature columns (e.g. one layer's whole
    [n, seq, hidden] input, or a slice of its sequence positions). Since XXᵀ = Σ_c X_c X_cᵀ over
    column blocks, feeding each column block exactly once gives the exact Gram.
    """

    def __init__(self, num_layers: int, n: int) -> None:
        if num_layers < 1 or n < 2:
            raise LosaError(f"RMI needs ≥1 layer and ≥2 calibration samples (got {num_layers} layers, n={n}); "
                            "raise nsamples")
        self.n = n
        self.grams: list[torch.Tensor | None] = [None] * num_layers

    def update(self, layer: int, chunk: torch.Tensor) -> None:
        if chunk.shape[0] != self.n:
            raise LosaError(f"Gram update for layer {layer} has {chunk.shape[0]} rows, expected n={self.n}")
        g = gram(chunk).cpu()
        cur = self.grams[layer]
        self.grams[layer] = g if cur is None else cur + g

    def result(self) -> list[torch.Tensor]:
        missing = [i for i, g in enumerate(self.grams) if g is None]
        if missing:
            raise LosaError(f"Gram matrices missing for layers {missing}; the calibration pass did not visit them")
        return [g for g in self.grams if g is not None]

    def cka(self) -> torch.Tensor:
        return cka_matrix(self.result())
