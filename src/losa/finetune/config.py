"""FinetuneConfig: the adapter fine-tuning hyper-parameters (kept apart from the Trainer code so that
importing a recipe does not import transformers' Trainer)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0, description="passes over each step's data slice")
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(256, ge=8)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: str = "linear"
    gradient_checkpointing: bool = False
    bf16: bool | None = Field(None, description="None = bf16 autocast when CUDA supports it")
    distill: bool = False
    temperature: float = Field(1.0, gt=0)
    max_grad_norm: float = 1.0
    seed: int = 0
