"""LoSAConfig: the full recipe of a LoSA run (flags, Python or a YAML recipe), validated."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from losa.config import CalibrationFields, parse_nm, validation_message
from losa.errors import LosaError
from losa.finetune.config import FinetuneConfig


class LoSAConfig(CalibrationFields):
    """LoSA recipe. Ablation switches (paper names): ``layerwise_sparsity=False`` (no LSR: uniform
    sparsity), ``rank_allocation=False`` (no SRA: every layer gets rank Ω_t), ``steps=1`` (no DSA)."""

    # pruning (method, nm = N:M target applied at every step with no cubic ramp, calibration: shared fields)
    sparsity: float = 0.5
    mixed_nm: bool = Field(False, description="per-layer N from RMI importance with exact mean N (needs nm)")
    nm_max_dev: int = Field(1, ge=0)
    #: mixed N:M: layer pairs that move N by ±1 (None = as many as keep the mean |s_l − S| within δ, the
    #: unstructured deviation budget; -1 = no cap, every layer moves by up to nm_max_dev)
    nm_max_pairs: int | None = Field(None, ge=-1)
    steps: int = Field(5, description="T, number of prune/fine-tune steps")
    # layer-wise sparsity
    layerwise_sparsity: bool = True
    allocator: Literal["rmi", "owl", "uniform"] = "rmi"
    rmi_features: Literal["inputs", "outputs"] = "inputs"
    beta: float = Field(1.0, gt=0)
    delta: float | None = Field(None, ge=0, description="None: official schedule (see default_delta)")
    owl_m: float = Field(5.0, gt=0)
    owl_lambda: float = Field(0.08, ge=0)
    # ranks
    rank_allocation: bool = True
    omega_first: float = Field(6.0, gt=0)
    omega_last: float = Field(10.0, gt=0)
    r_min: int = Field(2, ge=0)
    r_max: int = Field(16, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    # calibration (calib, nsamples, seqlen, calib_batch_size, blocksize, percdamp: shared fields)
    nsamples: int = Field(128, ge=2)
    recon_nsamples: int = Field(16, ge=1, description="calibration windows used for reconstruction errors")
    # fine-tuning
    finetune_data: str | None = Field(None, description="json/jsonl path or hub name; None: no fine-tuning")
    max_examples: int | None = Field(None, ge=1, description="use at most this many fine-tuning examples")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)

    def __init__(self, **data: object) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:  # one clear line instead of pydantic's report
            raise LosaError(validation_message(e)) from None

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError(f"target sparsity {v} must be in (0, 1); use e.g. 0.5 for 50 %")
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"steps T={v} must be ≥ 1 (T=1 is the no-dynamic-schedule ablation)")
        return v

    @model_validator(mode="after")
    def _check(self) -> LoSAConfig:
        if self.r_min > self.r_max:
            raise ValueError(f"r_min={self.r_min} > r_max={self.r_max}; set r_min ≤ r_max")
        for name in ("omega_first", "omega_last"):
            om = getattr(self, name)
            if not self.r_min <= om <= self.r_max:
                raise ValueError(f"{name}={om} outside [r_min, r_max] = [{self.r_min}, {self.r_max}]; adjust it")
        if self.mixed_nm and self.nm is None:
            raise ValueError("mixed_nm needs nm to give M and the mean N, e.g. nm: '2:8'")
        if self.recon_nsamples > self.nsamples:
            raise ValueError(f"recon_nsamples={self.recon_nsamples} > nsamples={self.nsamples}; lower it")
        return self

    @property
    def target_sparsity(self) -> float:
        """Final sparsity: ``sparsity``, or 1 − N/M for an N:M target."""
        if self.nm is not None:
            n, m = parse_nm(self.nm)
            return 1.0 - n / m
        return self.sparsity

    @property
    def effective_allocator(self) -> str:
        return self.allocator if self.layerwise_sparsity else "uniform"


def check_finetune_size(num_examples: int, config: LoSAConfig) -> None:
    need = config.steps * config.finetune.batch_size
    if num_examples < need:
        raise LosaError(f"fine-tuning set has {num_examples} usable examples, too few for {config.steps} steps × "
                        f"batch size {config.finetune.batch_size} (records whose prompt fills max_length are dropped); add data, "
                        "raise max_length, or lower steps or the batch size")
