"""Per-linear-module input statistics, accumulated by forward hooks during calibration."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class InputStat(ABC):
    """Accumulates a statistic of a linear module's inputs, fed ``[tokens, in_features]`` chunks."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.in_features = in_features
        self.device = torch.device(device)
        self.tokens = 0

    @abstractmethod
    def update(self, x: torch.Tensor) -> None: ...


class InputNormStat(InputStat):
    """Squared L2 norm of every input feature over all calibration tokens (Wanda's ‖X_j‖²)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        super().__init__(in_features, device)
        self.sq_norm = torch.zeros(in_features, dtype=torch.float64, device=self.device)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.in_features).to(self.device, torch.float32)
        self.sq_norm += x.square().sum(0).double()
        self.tokens += x.shape[0]

    @property
    def norm(self) -> torch.Tensor:
        return self.sq_norm.sqrt().float()


class HessianStat(InputStat):
    """H = (2/N)·Σ x xᵀ over all N calibration tokens (SparseGPT's layer-wise Hessian).

    Only the upper triangle is accumulated, in row blocks (about 40 % fewer FLOPs than the full product
    for wide inputs); :attr:`xtx` returns the symmetric matrix.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        super().__init__(in_features, device)
        self._upper = torch.zeros(in_features, in_features, dtype=torch.float32, device=self.device)
        nblocks = max(1, min(8, in_features // 256))
        self._block = -(-in_features // nblocks)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.in_features).to(self.device, torch.float32)
        b = self._block
        for i in range(0, self.in_features, b):
            self._upper[i:i + b, i:].addmm_(x[:, i:i + b].t(), x[:, i:])
        self.tokens += x.shape[0]

    @property
    def xtx(self) -> torch.Tensor:
        """Σ x xᵀ (symmetric)."""
        upper = self._upper.triu()
        return upper.add_(upper.triu(1).t())  # upper's own diagonal/upper part is untouched by the add

    @property
    def hessian(self) -> torch.Tensor:
        return self.xtx.mul_(2.0 / max(self.tokens, 1))  # xtx is a fresh tensor: scale it in place

    @property
    def sq_norm(self) -> torch.Tensor:
        return self._upper.diagonal().double()
