"""Sparsity-aware rank allocation: ranks proportional to each layer's reconstruction error."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from losa.errors import LosaError


def allocate_ranks(errors: Sequence[float], omega: float, r_min: int, r_max: int) -> list[int]:
    """``r_l = round(L_l / mean(L) · Ω)`` clipped to [r_min, r_max], then adjusted to ``Σ r_l = round(L·Ω)``.

    The adjustment removes (adds) one rank at a time from (to) the layer whose integer rank exceeds
    (falls short of) its ideal real-valued share the most, never leaving [r_min, r_max].
    """
    e = np.asarray(errors, dtype=np.float64)
    if e.ndim != 1 or e.size == 0 or not np.all(np.isfinite(e)) or np.any(e < 0):
        raise LosaError("reconstruction errors must be a non-empty list of finite non-negative numbers")
    if r_min < 0 or r_min > r_max:
        raise LosaError(f"rank bounds r_min={r_min} > r_max={r_max}; set r_min ≤ r_max")
    n = e.size
    budget = int(round(n * omega))
    if not n * r_min <= budget <= n * r_max:
        raise LosaError(f"rank budget {budget} (= {n} layers × Ω {omega}) is outside [{n * r_min}, {n * r_max}]; "
                        "adjust omega or r_min/r_max")
    mean = e.mean()
    ideal = e / mean * omega if mean > 0 else np.full(n, float(omega))
    r = np.clip(np.round(ideal), r_min, r_max).astype(np.int64)
    while (diff := int(r.sum()) - budget) != 0:
        over = r - ideal
        if diff > 0:
            cand = np.where(r > r_min, over, -np.inf)
            r[int(np.argmax(cand))] -= 1
        else:
            cand = np.where(r < r_max, over, np.inf)
            r[int(np.argmin(cand))] += 1
    return [int(x) for x in r]
