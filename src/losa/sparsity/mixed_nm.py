"""Mixed N:M: each layer gets its own N (kept weights per group of M), with an exact mean N/M.

Given the layer importances (higher = keep more), choose integers ``N_l`` with ``|N_l − N̄| ≤ max_dev`` and ``1 ≤ N_l ≤ M``
so that the parameter-weighted mean ``Σ p_l N_l / Σ p_l`` equals the target mean ``N̄ = (1 − S)·M``
exactly, maximising ``Σ Imp_l N_l`` (the integer version of the RMI LP). Equal sizes reduce to a
greedy fill; unequal sizes use an exact dynamic program over reachable weighted sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from losa.errors import LosaError

_MAX_STATES = 2_000_000


def allocate_mixed_nm(mean_n: float, m: int, importance: Sequence[float], sizes: Sequence[int] | None = None,
                      max_dev: int = 1) -> list[int]:
    """Per-layer N for mixed N:M with exact weighted mean ``mean_n`` (e.g. 2 for a 2:8 average)."""
    imp = np.asarray(importance, dtype=np.float64)
    nl = imp.size
    p = np.ones(nl, dtype=np.int64) if sizes is None else np.asarray(sizes, dtype=np.int64)
    if p.shape != (nl,) or nl == 0 or np.any(p <= 0):
        raise LosaError("mixed N:M needs one positive size per layer and at least one layer")
    if m < 1 or not 0 < mean_n <= m:
        raise LosaError(f"mixed N:M mean N={mean_n} must lie in (0, M={m}]")
    g = math.gcd(*[int(x) for x in p])
    units = [int(x) // g for x in p]
    target = Fraction(mean_n).limit_denominator(10**6) * sum(units)
    if target.denominator != 1:
        raise LosaError(f"mean N={mean_n} over layers of sizes {list(p)} cannot be met exactly with integer N "
                        f"per layer; choose a mean N such that mean_n·(number of layers) is an integer")
    target_units = int(target)
    lo = max(1, math.ceil(mean_n - max_dev - 1e-12))
    hi = min(m, math.floor(mean_n + max_dev + 1e-12))
    base = lo * sum(units)
    extra = target_units - base
    if extra < 0 or extra > (hi - lo) * sum(units):
        raise LosaError(f"mean N={mean_n} unreachable with per-layer N in [{lo}, {hi}]; raise max_dev")
    if len(set(units)) == 1:
        return _greedy_equal(imp, lo, hi, extra // units[0])
    return _dp(imp, units, lo, hi, extra, mean_n)


def _greedy_equal(imp: np.ndarray, lo: int, hi: int, extra: int) -> list[int]:
    n = [lo] * imp.size
    for l in np.argsort(-imp, kind="stable"):  # noqa: E741
        add = min(hi - lo, extra)
        n[l] += add
        extra -= add
    return n


def _dp(imp: np.ndarray, units: list[int], lo: int, hi: int, extra: int, mean_n: float) -> list[int]:
    # best[sum] = (objective, choices) over the layers seen so far; exact, bounded state count.
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for l, u in enumerate(units):  # noqa: E741
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for s, (obj, ch) in best.items():
            for k in range(hi - lo + 1):
                t = s + k * u
                if t > extra:
                    break
                cand = (obj + imp[l] * k, ch + (k,))
                if t not in nxt or cand[0] > nxt[t][0]:
                    nxt[t] = cand
        best = nxt
        if len(best) > _MAX_STATES:
            raise LosaError("mixed N:M allocation over very unequal layer sizes is too large to solve exactly; "
                            "use equal-size layers or plain N:M")
    if extra not in best:
        raise LosaError(f"mean N={mean_n} cannot be reached exactly with these layer sizes and N in [{lo}, {hi}]; "
                        "raise max_dev or change the target")
    return [lo + k for k in best[extra][1]]
