"""Mixed N:M: each layer gets its own N (kept weights per group of M), with an exact mean N/M.

Given the layer importances (higher = keep more), choose integers ``N_l`` with ``|N_l − N̄| ≤ max_dev`` and ``1 ≤ N_l ≤ M``
so that the parameter-weighted mean ``Σ p_l N_l / Σ p_l`` equals the target mean ``N̄ = (1 − S)·M``
exactly, maximising ``Σ Imp_l N_l`` (the integer version of the RMI LP). Equal sizes reduce to a
greedy fill; unequal sizes use an exact dynamic program over reachable weighted sums.

An LP's optimum sits on its bounds, so without a further limit *every* layer moves by ``max_dev``: at
M = 4 that is ±25 % sparsity per layer, far beyond the ±δ (1-3 %) of unstructured LoSA. ``max_pairs``
caps the deviation instead: starting from the uniform N (integer mean), it raises the ``k`` most important
layers by one and lowers the ``k`` least important by one (``k ≤ max_pairs``), which is the optimum of
the same objective under that cap. :func:`pairs_for_delta` turns an unstructured δ into such a cap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from losa.errors import LosaError

_MAX_STATES = 2_000_000


def pairs_for_delta(delta: float, m: int, num_layers: int) -> int:
    """Layer pairs that may move ±1 so that the mean |s_l − S| stays ≤ δ: ``2k/(L·M) ≤ δ``."""
    return int(np.floor(delta * m * num_layers / 2 + 1e-9))


def allocate_mixed_nm(mean_n: float, m: int, importance: Sequence[float], sizes: Sequence[int] | None = None,
                      max_dev: int = 1, max_pairs: int | None = None) -> list[int]:
    """Per-layer N for mixed N:M with exact weighted mean ``mean_n`` (e.g. 2 for a 2:8 average).

    ``max_pairs`` (integer ``mean_n`` and equal layer sizes): at most that many layers go up by one and
    as many down by one; None = no cap (every layer may move by up to ``max_dev``)."""
    imp = np.asarray(importance, dtype=np.float64)
    nl = imp.size
    p = np.ones(nl, dtype=np.int64) if sizes is None else np.asarray(sizes, dtype=np.int64)
    if p.shape != (nl,) or nl == 0 or np.any(p <= 0):
        raise LosaError("mixed N:M needs one positive size per layer and at least one layer")
    if m < 1 or not 0 < mean_n <= m:
        raise LosaError(f"mixed N:M mean N={mean_n} must lie in (0, M={m}]")
    if max_pairs is not None:
        if float(mean_n) != int(mean_n) or len(set(p.tolist())) != 1:
            raise LosaError("a cap on moved layers (max_pairs) needs an integer mean N and equal-size layers; "
                            "drop the cap or use a whole N")
        return _capped_pairs(imp, int(mean_n), m, max_pairs if max_dev >= 1 else 0)
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


def _capped_pairs(imp: np.ndarray, n: int, m: int, pairs: int) -> list[int]:
    order = np.argsort(-imp, kind="stable")
    out = [n] * imp.size
    k = min(pairs, imp.size // 2) if 1 < n < m else 0  # N ± 1 stays within [1, M]
    for j in range(k):
        out[order[j]] += 1
        out[order[-1 - j]] -= 1
    return out


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
