"""Layer-wise sparsity allocators (pure functions; a registry so variants are one name away).

Every allocator returns per-layer sparsities ``s`` (float64 array, one per decoder layer) whose
parameter-count-weighted mean equals the target exactly (up to float rounding):
``Σ_l p_l s_l / Σ_l p_l = target``.

- ``uniform``: ``s_l = target``.
- ``rmi`` (LoSA): redundancy ``R_l = Σ_{j≠l} CKA(l, j)``, normalised to sum to 1, importance
  ``Imp_l = exp(−β R̃_l)``; minimise ``Σ Imp_l s_l`` subject to the weighted mean and
  ``target − δ ≤ s_l ≤ target + δ``. This is a fractional knapsack LP, solved exactly by sorting.
- ``owl`` (outlier-weighted layerwise sparsity): more Wanda outliers → lower sparsity, within ±λ.
- ``atp`` (Huang et al., ICML 2025, "Determining Layer-wise Sparsity for LLMs Through a Theoretical
  Perspective"): sparsity rising linearly with depth, ``s_l = S − β(L−1)/2 + β(l−1)`` for equal layers;
  β is chosen by a grid search on calibration loss (``losa.pipelines.oneshot``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from losa.errors import LosaError

Allocator = Callable[..., np.ndarray]
ALLOCATORS: dict[str, Allocator] = {}


def register_allocator(name: str) -> Callable[[Allocator], Allocator]:
    def deco(fn: Allocator) -> Allocator:
        ALLOCATORS[name] = fn
        return fn

    return deco


def get_allocator(name: str) -> Allocator:
    try:
        return ALLOCATORS[name]
    except KeyError:
        raise LosaError(f"unknown sparsity allocator {name!r}; choose one of {sorted(ALLOCATORS)}") from None


def allocate(name: str, target: float, sizes: Sequence[float], **kwargs) -> np.ndarray:
    """Run allocator ``name`` for ``target`` over layers with parameter counts ``sizes``."""
    return get_allocator(name)(target, sizes, **kwargs)


#: the allocators' keyword arguments with one entry per layer (``cka``: one row and one column per layer)
_PER_LAYER = ("outlier_ratios",)


def live_layers(sizes: Sequence[float]) -> list[int]:
    """The indices of the layers with something to prune (size > 0; a layer that ``ignore`` leaves dense
    entirely has size 0)."""
    return [i for i, z in enumerate(sizes) if z > 0]


def allocate_live(name: str, target: float, sizes: Sequence[float], **kwargs) -> np.ndarray:
    """:func:`allocate` over the layers with a positive size only; a layer of size 0 (nothing to prune) gets
    ``target``, which it never reaches and which does not count in the parameter-weighted mean.

    Args:
        name, target: as :func:`allocate`.
        sizes: prunable parameters per layer, ``[L]``, zeros allowed (not all).
        kwargs: the allocator's arguments; ``cka`` (``[L, L]``) and ``outlier_ratios`` (``[L]``) are cut to the
            layers with a positive size.
    Returns:
        Per-layer sparsity, ``[L]``.
    Raises:
        LosaError: what :func:`allocate` raises (every size 0 included).
    """
    live = live_layers(sizes)
    if len(live) == len(sizes) or not live:
        return allocate(name, target, sizes, **kwargs)
    sub = dict(kwargs)
    if sub.get("cka") is not None:
        sub["cka"] = np.asarray(sub["cka"])[np.ix_(live, live)]
    for k in _PER_LAYER:
        if sub.get(k) is not None:
            sub[k] = [sub[k][i] for i in live]
    out = np.full(len(sizes), float(target))
    out[live] = allocate(name, target, [sizes[i] for i in live], **sub)
    return out


def default_delta(target: float) -> float:
    """Half-width δ of the per-layer sparsity band around ``target``.

    Official LoSA schedule: 0.01 for S ≤ 0.5, 0.02 for S ≤ 0.6, 0.03 for S ≤ 0.7. Above 0.7 the
    official code silently reuses the last value; here δ = min(0.03, (1 − S)/4), so the most
    pruned layer never exceeds S + (1 − S)/4 (e.g. 0.925 at S = 0.9) and δ shrinks as the
    remaining density shrinks.
    """
    if target <= 0.5:
        return 0.01
    if target <= 0.6:
        return 0.02
    if target <= 0.7:
        return 0.03
    return min(0.03, (1.0 - target) / 4.0)


def _check(target: float, sizes: Sequence[float]) -> np.ndarray:
    if not 0.0 <= target < 1.0:
        raise LosaError(f"target sparsity {target} must be in [0, 1); pass e.g. sparsity=0.5")
    p = np.asarray(sizes, dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or np.any(p <= 0):
        raise LosaError("layer sizes must be a non-empty list of positive parameter counts")
    return p


@register_allocator("uniform")
def uniform(target: float, sizes: Sequence[float], **_: object) -> np.ndarray:
    p = _check(target, sizes)
    return np.full(p.size, float(target))


def rmi_importance(cka: np.ndarray, beta: float = 1.0) -> np.ndarray:
    """``Imp_l = exp(−β R̃_l)`` with ``R_l = Σ_{j≠l} CKA(l, j)`` normalised to sum to 1."""
    c = np.asarray(cka, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise LosaError(f"CKA matrix must be square, got shape {c.shape}")
    r = c.sum(1) - np.diag(c)
    total = r.sum()
    r_norm = r / total if total > 0 else np.full(r.size, 1.0 / r.size)
    return np.exp(-beta * r_norm)


def solve_band_lp(cost: np.ndarray, weights: np.ndarray, target: float, lo: np.ndarray,
                  hi: np.ndarray) -> np.ndarray:
    """Exact solution of ``min Σ c_l s_l  s.t.  Σ w_l s_l = target, lo ≤ s ≤ hi`` (w > 0, Σw = 1).

    Start every layer at its lower bound, then raise layers to their upper bound in order of
    increasing cost per unit of weighted budget ``c_l / w_l`` until the budget is spent; the last
    raised layer takes the fractional remainder (the classic fractional-knapsack optimum).
    """
    s = lo.astype(np.float64).copy()
    budget = target - float(weights @ s)
    if budget < -1e-12 or float(weights @ hi) < target - 1e-12:
        raise LosaError(f"sparsity target {target} is outside the per-layer bounds; widen delta")
    for l in np.argsort(cost / weights, kind="stable"):  # noqa: E741
        if budget <= 0:
            break
        room = (hi[l] - lo[l]) * weights[l]
        take = min(room, budget)
        s[l] = lo[l] + take / weights[l]
        budget -= take
    return s


@register_allocator("rmi")
def rmi(target: float, sizes: Sequence[float], *, cka: np.ndarray, beta: float = 1.0,
        delta: float | None = None, **_: object) -> np.ndarray:
    """LoSA's RMI allocation (see module docstring); ``delta=None`` uses :func:`default_delta`."""
    p = _check(target, sizes)
    c = np.asarray(cka, dtype=np.float64)
    if c.shape != (p.size, p.size):
        raise LosaError(f"CKA matrix is {c.shape} but there are {p.size} layers")
    d = default_delta(target) if delta is None else float(delta)
    if d < 0:
        raise LosaError(f"delta must be ≥ 0, got {d}")
    imp = rmi_importance(c, beta)
    w = p / p.sum()
    lo = np.full(p.size, max(0.0, target - d))
    hi = np.full(p.size, min(1.0, target + d))
    return solve_band_lp(imp, w, target, lo, hi)


def outlier_ratio(scores, m: float = 5.0) -> float:
    """Fraction of entries of ``scores`` (e.g. Wanda |W|·‖X‖ of a layer) above ``m × mean``."""
    import torch

    s = torch.as_tensor(scores).detach().to(torch.float64).reshape(-1)
    if s.numel() == 0:
        raise LosaError("outlier_ratio needs a non-empty score tensor")
    return float((s > m * s.mean()).double().mean())


@register_allocator("owl")
def owl(target: float, sizes: Sequence[float], *, outlier_ratios: Sequence[float], lam: float = 0.08,
        **_: object) -> np.ndarray:
    """OWL: sparsity decreases linearly with the layer's outlier ratio, within ``target ± lam``.

    The ratios are min-max normalised to [0, 1], centred on their parameter-weighted mean and
    scaled so the largest deviation is exactly ``lam`` (OWL's official code spans 2λ; here the band
    is symmetric so it matches ``rmi``'s ±δ semantics). The weighted mean is exactly ``target``.
    """
    p = _check(target, sizes)
    d = np.asarray(outlier_ratios, dtype=np.float64)
    if d.shape != (p.size,):
        raise LosaError(f"got {d.size} outlier ratios for {p.size} layers")
    if lam < 0 or target + lam > 1 or target - lam < 0:
        raise LosaError(f"OWL band target±lam = {target}±{lam} leaves [0, 1]; lower lam")
    w = p / p.sum()
    span = d.max() - d.min()
    if span <= 0:
        return np.full(p.size, float(target))
    c = (d - d.min()) / span
    c = c - w @ c
    c = c / np.abs(c).max()
    return target - lam * c


def _depth_offsets(p: np.ndarray) -> np.ndarray:
    """``(l − 1) − Σ_k w_k (k − 1)``: the depth index centred on its parameter-weighted mean."""
    w = p / p.sum()
    idx = np.arange(p.size, dtype=np.float64)
    return idx - float(w @ idx)


def atp_beta_max(target: float, sizes: Sequence[float], s_max: float = 1.0 - 1e-6) -> float:
    """The largest β that keeps every ATP layer sparsity within [0, ``s_max``] (default: strictly below 1 by 1e-6).

    Args:
        target: S, the mean sparsity.
        sizes: parameters per decoder layer, ``[L]``.
        s_max: the highest sparsity the deepest layer may reach (a grid search passes ``1 - 1/K`` for the
            narrowest linear's K inputs, so that no row loses every weight).
    Returns:
        β ≥ 0 (0 for one layer, or when ``s_max`` is not above ``target``).
    Raises:
        LosaError: invalid target or sizes.
    """
    p = _check(target, sizes)
    off = _depth_offsets(p)
    if p.size == 1:
        return 0.0
    up = (min(s_max, 1.0 - 1e-6) - target) / off.max()  # the deepest layer must stay at or below s_max
    down = target / -off.min()  # the first layer must stay at or above 0
    return float(max(0.0, min(up, down)))


@register_allocator("atp")
def atp(target: float, sizes: Sequence[float], *, beta: float, **_: object) -> np.ndarray:
    """ATP: ``s_l = S + β·((l − 1) − Σ_k w_k (k − 1))``, an arithmetic progression in depth.

    With equal layer sizes this is the paper's ``s_l = S − β(L−1)/2 + β(l−1)``; with unequal sizes the
    progression is shifted so the parameter-weighted mean is exactly ``S``.

    Args:
        target: S, the mean sparsity.
        sizes: parameters per decoder layer, ``[L]``.
        beta: the step between consecutive layers, in ``[0, atp_beta_max(target, sizes)]``.
    Returns:
        ``[L]`` float64 sparsities.
    Raises:
        LosaError: ``beta`` outside its valid range (a layer would leave [0, 1)).
    """
    p = _check(target, sizes)
    bmax = atp_beta_max(target, sizes)
    if not 0.0 <= beta <= bmax + 1e-12:
        raise LosaError(f"ATP beta={beta} is outside [0, {bmax:.6g}] for S={target} over {p.size} layers "
                        "(a layer would leave [0, 1)); lower beta")
    return np.clip(target + beta * _depth_offsets(p), 0.0, 1.0 - 1e-6)


def atp_grid(target: float, sizes: Sequence[float], points: int = 8, beta_max: float | None = None) -> list[float]:
    """``points`` evenly spaced β from 0 (uniform) to the valid maximum (or ``beta_max`` if smaller).

    Raises:
        LosaError: ``points`` < 2.
    """
    if points < 2:
        raise LosaError(f"ATP grid needs at least 2 points, got {points}")
    hi = atp_beta_max(target, sizes)
    if beta_max is not None:
        hi = min(hi, float(beta_max))
    return [float(x) for x in np.linspace(0.0, hi, points)]
