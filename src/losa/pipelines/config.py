"""The calibration fields shared by every pipeline that prunes with calibration data (one-shot and LoSA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from losa.errors import option
from losa.pruning.base import Pruner, available_pruners, check_options, get_pruner
from losa.pruning.masks import parse_nm
from losa.utils.config import PRUNER_OPTIONS, LosaConfig

#: tokens per calibration forward when ``calib_batch_size`` is None
AUTO_BATCH_TOKENS = 1024


class AllocatorParams(LosaConfig):
    """The parameters of the RMI and OWL layer-wise sparsity allocators, shared by one-shot pruning and LoSA
    (:mod:`losa.allocation.allocators`).

    Args:
        rmi_features: RMI (LoSA, Huang et al. ICLR 2025, Eq. 4-5) compares the layers' ``inputs`` or ``outputs``
            by linear CKA over the calibration windows.
        beta: RMI's softmax temperature over the layers' importances (> 0).
        delta: RMI's band: each layer's sparsity within ``target ± delta`` (None: :func:`default_delta`).
        owl_m: OWL (Yin et al. ICML 2024): a Wanda score above ``owl_m`` times its layer's mean is an outlier.
        owl_lambda: OWL's band: each layer's sparsity within ``target ± owl_lambda`` (a LoSA step whose target
            S_t is below it uses ``S_t``).
    Raises:
        LosaError: a value out of range (on construction).
    """

    rmi_features: Literal["inputs", "outputs"] = Field("inputs", description="RMI: compare the layers' inputs or "
                                                                             "outputs by linear CKA")
    beta: float = Field(1.0, gt=0, description="RMI: temperature of the importance softmax")
    delta: float | None = Field(None, ge=0, description="RMI: band ±delta of per-layer sparsity around the target "
                                                        "(default: the official schedule, "
                                                        "losa.allocation.default_delta)")
    owl_m: float = Field(5.0, gt=0, description="OWL: a weight is an outlier above M times its layer's mean score")
    owl_lambda: float = Field(0.08, ge=0, description="OWL: the band ±lambda of per-layer sparsity (in LoSA, "
                                                      "narrowed to S_t at an early step whose target is below it)")


def check_band(allocator: str, target: float, delta: float | None, owl_lambda: float) -> None:
    """Check, before any calibration, that the layer-wise band ``target ± delta`` (RMI) or ``target ± owl_lambda``
    (OWL) keeps every layer's sparsity in [0, 1).

    Args:
        allocator: the allocator in use (only ``rmi`` and ``owl`` have a band).
        target: the unstructured sparsity the band is centred on (a fraction).
        delta: RMI's half-width (None: :func:`losa.allocation.default_delta`, always inside).
        owl_lambda: OWL's half-width.
    Raises:
        ValueError: RMI's ``target + delta`` reaches 1, or OWL's band leaves [0, 1) (OWL's band is symmetric, so
            ``owl_lambda`` above ``target`` too), naming the option to lower and its largest valid value.
    """
    if allocator == "rmi" and delta is not None and target + delta >= 1.0:
        raise ValueError(f"{option('delta')} {delta:g} lets a layer reach sparsity {target + delta:g} around the "
                         f"{target:g} target: every layer must stay below 1; use {option('delta')} below "
                         f"{1.0 - target:.4g}")
    if allocator == "owl" and (target + owl_lambda >= 1.0 or owl_lambda > target):
        limit = (f"below {1.0 - target:.4g}" if 1.0 - target <= target else f"at most {target:.4g}")
        raise ValueError(f"{option('owl_lambda')} {owl_lambda:g} spans {target - owl_lambda:g} to "
                         f"{target + owl_lambda:g} around the {target:g} target: OWL's band must stay inside [0, 1); "
                         f"use {option('owl_lambda')} {limit}")


class CalibrationConfig(LosaConfig):
    """Fields and checks shared by every recipe that prunes with calibration data (one-shot and LoSA).

    ``ignore`` (llm-compressor's name) lists glob patterns of linears left dense, matched against the name inside
    the decoder layer (``mlp.down_proj``, ``mlp.experts.*.down_proj``), with the layer index in front
    (``0.self_attn.*``) and against the full name (``model.layers.0.self_attn.o_proj``; :mod:`losa.pruning.ignore`).
    The other linears are pruned to their layer's target, and the layer-wise allocators weigh only them, so the
    model as a whole is less sparse than the target; a pattern that matches no linear is refused before the model
    is calibrated or evaluated.
    """

    method: str = Field("wanda", description="pruning method: a registered pruner (magnitude, wanda, sparsegpt)")
    options: dict[str, Any] = Field(default_factory=dict, json_schema_extra={PRUNER_OPTIONS: True},
                                    description="the chosen pruner's own options (e.g. sparsegpt blocksize, "
                                                "percdamp); an option of another pruner is an error")
    nm: str | None = Field(None, description="semi-structured N:M pattern, e.g. 2:4 or 4:8 (replaces --sparsity)")
    calib: str = Field("c4", description="calibration source: c4, wikitext2, ptb, self (model-generated text) "
                                         "or a .txt/.json/.jsonl file",
                       # the command line picks c4 only where the data are (losa.cli.common.config_from_args)
                       json_schema_extra={"default_help": "c4 with a data dir (--data-dir or $LOSA_DATA_DIR), "
                                                          "else self"})
    nsamples: int = Field(128, ge=1, description="calibration windows")
    seqlen: int = Field(2048, ge=2, description="calibration window length in tokens")
    seed: int = Field(0, description="seed of calibration sampling (and of LoSA's fine-tuning data split)")
    data_dir: str | None = Field(None, description="directory with wikitext-2-raw/, c4/, ptb/ … "
                                                   "(default: $LOSA_DATA_DIR, else the HF hub)")
    calib_batch_size: int | None = Field(None, ge=1, description="windows per calibration forward (default: about "
                                                                 "1024 tokens per batch)")
    stats_precision: Literal["model", "bfloat16", "float16"] = Field(
        "model", description="autocast dtype of the statistics-only passes (outputs are still propagated in the "
                             "model's dtype); reduced precision is faster but worse at high sparsity "
                             "(benchmarks/results/prune_stats.md)")
    device: str = Field("auto", description="compute device: auto, cpu, cuda or cuda:N")
    ignore: list[str] = Field(default_factory=list, description="glob patterns of linears left dense, matched "
                                                                "inside the decoder layer (mlp.down_proj), with the "
                                                                "layer index in front (0.self_attn.*) or as full "
                                                                "names (model.layers.0.mlp.up_proj)")

    @field_validator("ignore", mode="before")
    @classmethod
    def _ignore_text(cls, v: object) -> object:
        if v is None:  # a bare `ignore:` in a recipe
            return []
        return [p for p in v.split(",") if p.strip()] if isinstance(v, str) else v  # `ignore: mlp.down_proj,0.*`

    @field_validator("ignore")
    @classmethod
    def _ignore(cls, v: list[str]) -> list[str]:
        if any(not p.strip() for p in v):
            raise ValueError("ignore holds an empty pattern; give glob patterns such as mlp.down_proj or 0.*")
        return list(dict.fromkeys(p.strip() for p in v))

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

    @model_validator(mode="after")
    def _options(self) -> CalibrationConfig:
        check_options(self.method, self.options)
        if self.nm is not None and self.options.get("per_row"):
            per_row = option("options['per_row']", "--per-row")
            raise ValueError("per_row applies to unstructured targets only (an N:M pattern keeps the largest N of "
                             f"every group); drop {per_row} or {option('nm')}")
        return self

    def pruner(self) -> Pruner:
        """The configured pruner (its options validated by its own ``Options`` class)."""
        return get_pruner(self.method, self.options)

    @field_validator("nm", mode="before")
    @classmethod
    def _nm(cls, v: object) -> object:
        if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, int) for x in v):
            v = f"{v[0]}:{v[1]}"  # (2, 4) as sparsity_report takes it
        if isinstance(v, str):
            parse_nm(v)
        elif v is not None:
            raise ValueError(f"nm {v!r} is not an N:M pattern; write it as '2:4' (or (2, 4))")
        return v

    def stats_autocast(self) -> Any:
        """The torch dtype for autocast in statistics-only passes, or None."""
        import torch

        return None if self.stats_precision == "model" else getattr(torch, self.stats_precision)

    def calib_batch(self, seqlen: int | None = None) -> int:
        """Windows per calibration forward: ``calib_batch_size``, or about AUTO_BATCH_TOKENS tokens."""
        return self.calib_batch_size or max(1, AUTO_BATCH_TOKENS // (seqlen or self.seqlen))


