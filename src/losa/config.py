"""Validated configuration for one-shot pruning (flags, Python or a YAML recipe)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from losa.errors import LosaError
from losa.pruning.base import available_pruners
from losa.pruning.masks import validate_nm
from losa.pruning.target import Target


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4), validated."""
    try:
        n_str, m_str = str(text).split(":")
        n, m = int(n_str), int(m_str)
    except ValueError:
        raise LosaError(f"invalid N:M pattern {text!r}; write it as N:M, e.g. 2:4") from None
    validate_nm(n, m)
    return n, m


#: tokens per calibration forward when ``calib_batch_size`` is None
AUTO_BATCH_TOKENS = 1024


class CalibrationFields(BaseModel):
    """Fields and checks shared by every recipe that prunes with calibration data (one-shot and LoSA)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: str = "wanda"
    nm: str | None = None
    calib: str = "c4"
    nsamples: int = Field(128, ge=1)
    seqlen: int = Field(2048, ge=2)
    seed: int = 0
    data_dir: str | None = None
    #: windows per calibration forward; None = as many as fit in about 1024 tokens (AUTO_BATCH_TOKENS)
    calib_batch_size: int | None = Field(None, ge=1)
    #: "model": statistics passes run in the model's dtype; "bfloat16"/"float16": statistics-only passes
    #: (not the passes that propagate outputs to the next layer) run under autocast in that dtype; measured
    #: on SmolLM2/CPU: 1.0-1.3x faster for Wanda, worse perplexity at 60-70 % (benchmarks/results/prune_stats.md)
    stats_precision: Literal["model", "bfloat16", "float16"] = "model"
    blocksize: int = Field(128, ge=1)
    percdamp: float = Field(0.01, gt=0)
    device: str = "auto"

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in available_pruners():
            raise ValueError(f"unknown method {v!r}; choose one of {', '.join(available_pruners())}")
        return v

    @field_validator("calib")
    @classmethod
    def _calib(cls, v: str) -> str:
        from losa.data.sources import NAMED_FILES

        if v != "self" and v not in NAMED_FILES and not Path(v).is_file():
            raise ValueError(f"calibration source {v!r} is not c4/wikitext2/ptb/self and no such file exists")
        return v

    @field_validator("nm")
    @classmethod
    def _nm(cls, v: str | None) -> str | None:
        if v is not None:
            parse_nm(v)
        return v

    def stats_autocast(self) -> Any:
        """The torch dtype for autocast in statistics-only passes, or None."""
        import torch

        return None if self.stats_precision == "model" else getattr(torch, self.stats_precision)

    def calib_batch(self, seqlen: int | None = None) -> int:
        """Windows per calibration forward: ``calib_batch_size``, or about AUTO_BATCH_TOKENS tokens."""
        return self.calib_batch_size or max(1, AUTO_BATCH_TOKENS // (seqlen or self.seqlen))


class PruneConfig(CalibrationFields):
    """One-shot pruning recipe.

    ``sparsity`` is a float (all layers) or a list with one value per decoder layer. ``nm`` ("2:4")
    selects semi-structured pruning; with ``nm_n`` (one N per layer) and the M of ``nm`` it is mixed N:M.
    """

    sparsity: float | list[float] = 0.5
    nm_n: list[int] | None = None
    #: "layer": every linear's statistics come from the layer before pruning (statistics pass, then a
    #: second pass to propagate; what llm-compressor and the Wanda/SparseGPT reference code do).
    #: "module": one forward per layer; each linear is pruned at its first call, so later modules of the
    #: layer see the already-pruned earlier ones ("true sequential"); needs all samples in one batch.
    #: "auto": "module" when the pruner prefers it and that batch fits in memory, else "layer" (always
    #: "layer" with a reduced ``stats_precision``, which applies to the statistics pass of that mode).
    sequential: Literal["auto", "layer", "module"] = "auto"
    offload: bool | None = None
    verify: bool = True

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: float | list[float]) -> float | list[float]:
        for s in v if isinstance(v, list) else [v]:
            if not 0.0 <= s < 1.0:
                raise ValueError(f"sparsity {s} is outside [0, 1); use e.g. 0.5 for 50 %")
        return v

    @model_validator(mode="after")
    def _mixed(self) -> PruneConfig:
        if self.stats_precision != "model" and self.sequential == "module":
            raise ValueError(f"stats_precision={self.stats_precision} applies to the statistics pass of "
                             "sequential=layer; module mode has none (its one pass also propagates outputs). "
                             "Use sequential: layer or auto")
        if self.nm_n is not None:
            if self.nm is None:
                raise ValueError("nm_n (per-layer N) needs nm to give M, e.g. nm: '2:8'")
            m = parse_nm(self.nm)[1]
            for n in self.nm_n:
                validate_nm(n, m)
        return self

    # ------------------------------------------------------------------
    def layer_targets(self, num_layers: int) -> list[Target]:
        """One :class:`Target` per decoder layer."""
        if self.nm is not None:
            n, m = parse_nm(self.nm)
            ns = self.nm_n if self.nm_n is not None else [n] * num_layers
            if len(ns) != num_layers:
                raise LosaError(f"nm_n has {len(ns)} entries but the model has {num_layers} decoder layers")
            return [Target(n=int(k), m=m) for k in ns]
        if isinstance(self.sparsity, list):
            if len(self.sparsity) != num_layers:
                raise LosaError(f"sparsity list has {len(self.sparsity)} entries but the model has "
                                f"{num_layers} decoder layers; give one per layer or a single float")
            return [Target(sparsity=float(s)) for s in self.sparsity]
        return [Target(sparsity=float(self.sparsity))] * num_layers

    def describe(self) -> str:
        if self.nm is not None:
            return f"{self.method} {'mixed ' if self.nm_n else ''}{self.nm}"
        s = self.sparsity
        return f"{self.method} {s:.0%}" if isinstance(s, float) else f"{self.method} per-layer"


def validation_message(err: ValidationError) -> str:
    """A pydantic error as one line: ``field: message``."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "invalid config: " + "; ".join(parts)


def build_config(cls: type[BaseModel], values: dict[str, Any]) -> Any:
    """Instantiate a config, turning validation errors into a one-line :class:`LosaError`."""
    try:
        return cls(**values)
    except ValidationError as e:
        raise LosaError(validation_message(e)) from None


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML recipe (a mapping of config fields)."""
    p = Path(path)
    if not p.is_file():
        raise LosaError(f"recipe file {p} not found; check the path")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LosaError(f"recipe {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LosaError(f"recipe {p} must be a mapping of config fields")
    return data
