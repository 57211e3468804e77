"""What one linear module must be pruned to: an unstructured sparsity or an N:M pattern."""

from __future__ import annotations

from dataclasses import dataclass

from losa.errors import LosaError, option
from losa.pruning.masks import validate_nm


@dataclass(frozen=True)
class Target:
    """Unstructured ``sparsity`` in [0, 1), or ``n`` non-zeros in every ``m`` (then sparsity = 1 - n/m)."""

    sparsity: float = 0.0
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        if (self.n is None) != (self.m is None):
            raise LosaError(f"an N:M target needs both n and m, e.g. Target(n=2, m=4) for {option('nm')} 2:4")
        if self.m is not None:
            validate_nm(self.n, self.m)  # type: ignore[arg-type]
            object.__setattr__(self, "sparsity", 1.0 - self.n / self.m)  # type: ignore[operator]
        elif not 0.0 <= self.sparsity < 1.0:
            raise LosaError(f"sparsity {self.sparsity} is outside [0, 1); use e.g. 0.5 for 50 %")

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def pattern(self) -> tuple[int, int] | None:
        """``(N, M)`` of an N:M target (what :func:`losa.export.verify.sparsity_report` checks), else None."""
        return (self.n, self.m) if self.is_nm else None  # type: ignore[return-value]

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:.2%} unstructured"
