"""LoSA's dynamic schedule: cubic sparsity ramp and linear rank-budget ramp."""

from __future__ import annotations

from losa.errors import LosaError


def sparsity_at(step: int, total_steps: int, target: float) -> float:
    """``S_t = S − S·(1 − t/T)³`` for t = 1..T (S_T = S)."""
    if total_steps < 1 or not 1 <= step <= total_steps:
        raise LosaError(f"step {step} outside 1..{total_steps}; T must be ≥ 1")
    return target - target * (1.0 - step / total_steps) ** 3


def rank_budget_at(step: int, total_steps: int, omega_first: float = 6.0, omega_last: float = 10.0) -> float:
    """``Ω_t`` linear from Ω_1 (t=1) to Ω_T (t=T); Ω_T when T = 1."""
    if total_steps < 1 or not 1 <= step <= total_steps:
        raise LosaError(f"step {step} outside 1..{total_steps}; T must be ≥ 1")
    if total_steps == 1:
        return float(omega_last)
    return omega_first + (omega_last - omega_first) * (step - 1) / (total_steps - 1)
