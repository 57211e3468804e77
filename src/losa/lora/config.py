"""Configuration of sparse (masked) LoRA adapters."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from losa.errors import LosaError


class SparseLoRAConfig(BaseModel):
    """Capacity ``r_max`` per module; the active rank (≤ r_max) is set per module at run time.

    The scale is ``alpha / r_max`` for every module, so changing the active rank never rescales the
    ranks that were already trained.
    """

    model_config = ConfigDict(extra="forbid")

    r_max: int = Field(16, ge=1)
    rank: int = Field(8, ge=0, description="initial active rank of every module")
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    #: glob patterns (relative to the decoder layer) of linear modules to adapt; default all prunable
    target_modules: tuple[str, ...] = ("*",)
    init_seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SparseLoRAConfig:
        if self.rank > self.r_max:
            raise LosaError(f"initial LoRA rank {self.rank} exceeds capacity r_max={self.r_max}; raise r_max")
        return self

    @property
    def scale(self) -> float:
        return self.alpha / self.r_max
