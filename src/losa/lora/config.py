"""Configuration of sparse (masked) LoRA adapters."""

from __future__ import annotations

from pydantic import Field, model_validator

from losa.errors import LosaError
from losa.utils.config import LosaConfig


class SparseLoRAConfig(LosaConfig):
    """Sparse (masked) LoRA adapters as used by LoSA (Huang et al., ICLR 2025).

    Capacity ``r_max`` per module; the active rank (≤ r_max) is set per module at run time. The
    scale is ``alpha / r_max`` for every module (not LoRA's ``alpha / r``, Hu et al., 2022), so
    changing the active rank never rescales the ranks that were already trained.

    Args:
        r_max: adapter capacity (≥ 1): rows of ``A`` ``[r_max, in]`` and columns of ``B`` ``[out, r_max]``.
        rank: initial active rank of every module, in ``[0, r_max]``.
        alpha: LoRA alpha (> 0); the adapter scale is ``alpha / r_max``.
        dropout: dropout probability in ``[0, 1)`` on the module input in training (it feeds the fused
            masked map, see :meth:`SparseLoRALinear.forward`).
        target_modules: glob patterns, relative to the decoder layer (e.g. ``mlp.*``), of the linear
            modules to adapt; default ``("*",)``, every prunable linear.
        init_seed: seed of the Kaiming-uniform initialisation of ``A``.
    Returns:
        The validated config (on construction).
    Raises:
        LosaError: on construction, a value out of range, an unknown key, or ``rank > r_max``; on
            assignment, the same (one line; the config keeps its earlier value).
    """

    r_max: int = Field(16, ge=1, description="adapter capacity: rows of A / columns of B")
    rank: int = Field(8, ge=0, description="initial active rank of every module")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; scale = alpha / r_max")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: tuple[str, ...] = Field(("*",), description="glob patterns (relative to the decoder layer) of "
                                                                "the linear modules to adapt; default all prunable")
    init_seed: int = Field(0, description="seed of A's initialisation")

    @model_validator(mode="after")
    def _check(self) -> SparseLoRAConfig:
        if self.rank > self.r_max:
            raise LosaError(f"initial LoRA rank {self.rank} exceeds capacity r_max={self.r_max}; raise r_max")
        return self

    @property
    def scale(self) -> float:
        """The adapter scale ``alpha / r_max``, shared by every module and every active rank."""
        return self.alpha / self.r_max
