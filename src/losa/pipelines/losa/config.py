"""LoSAConfig: the full recipe of a LoSA run (flags, Python or a YAML recipe), validated."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from losa.errors import LosaError, option
from losa.finetune.config import FinetuneConfig
from losa.pipelines.config import AllocatorParams, CalibrationConfig, check_band
from losa.pruning.masks import parse_nm

#: how messages name the fine-tuning data and distillation (:func:`losa.errors.option`)
FINETUNE_DATA, DISTILL = option("finetune_data"), option("finetune.distill", "--distill")
#: what a run without fine-tuning data and without distillation says at its start (and records in its report)
NO_FINETUNE_WARNING = (f"no {FINETUNE_DATA} and no {DISTILL}: the adapters will not be fine-tuned (pruning, "
                       f"layer-wise sparsity and rank allocation only); add {option('finetune.distill=True', '--distill')} or "
                       f"{option('finetune_data', '--finetune-data FILE')}")


def _allocator(name: str) -> str:
    """``allocator='name' (--allocator name)``: an allocator choice as messages name it."""
    return option(f"allocator={name!r}", f"--allocator {name}")


#: the settings :meth:`LoSAConfig.ignored_fields` names in its fixes
_NM, _MIXED_NM, _ADD_MIXED_NM = option("nm"), option("mixed_nm"), option("mixed_nm=True", "--mixed-nm")
_NO_LAYERWISE = option("layerwise_sparsity=False", "--no-layerwise-sparsity")
_RMI_OR_OWL = f"{_allocator('rmi')} or {_allocator('owl')}"


class LoSAConfig(AllocatorParams, CalibrationConfig):
    """LoSA recipe. Ablation switches (paper names): ``layerwise_sparsity=False`` (no LSR: uniform
    sparsity), ``rank_allocation=False`` (no SRA: every layer gets rank Ω_t), ``steps=1`` (no DSA).

    LoSA: Huang et al., ICLR 2025, "Dynamic Low-Rank Sparse Adaptation". Each field's
    ``description`` (also its command-line help) gives the details.

    Args:
        sparsity: final unstructured sparsity S in ``(0, 1)``, reached at step T by the cubic schedule
            (ignored with ``nm``).
        mixed_nm, nm_max_dev, nm_max_pairs: mixed N:M, per-layer N from the allocator's layer
            importances (RMI, or OWL outlier ratios) around the mean N of ``nm``.
        steps: T ≥ 1, the number of prune / fine-tune steps.
        layerwise_sparsity, allocator, rmi_features, beta, delta, owl_m, owl_lambda: layer-wise
            sparsity allocation and its allocator's parameters.
        rank_allocation, omega_first, omega_last, r_min, r_max, lora_alpha: rank allocation (mean
            rank Ω_1 to Ω_T, per-layer bounds ``[r_min, r_max]``), adapter capacity ``r_max`` and
            scale ``lora_alpha / r_max``.
        lora_dropout: the adapters' input dropout in fine-tuning (:class:`~losa.lora.SparseLoRAConfig`).
        lora_target_modules: glob patterns (PEFT's ``target_modules``, relative to the decoder layer) of the
            linears whose adapters are trained; the others are pruned to the same targets and keep a frozen
            adapter at rank 0 (:func:`losa.lora.freeze_adapters`), so they stay in the resume state.
        nsamples, recon_nsamples: calibration windows, and those used for reconstruction errors.
        finetune_data, max_examples, finetune: fine-tuning data, its size cap and
            :class:`FinetuneConfig`.
        method, options, nm, ignore, calib, seqlen, seed, data_dir, calib_batch_size, stats_precision,
            device: the calibration fields of :class:`CalibrationConfig` (``ignore``: glob patterns of linears
            left dense at every step; their adapters still train, unmasked, and merge into dense weights).
    Returns:
        The validated config (on construction).
    Raises:
        LosaError: an unknown key or out-of-range value, sparsity outside ``(0, 1)``, ``steps < 1``,
            ``r_min > r_max``, ``omega_first``/``omega_last`` outside ``[r_min, r_max]``, ``mixed_nm``
            without ``nm``, ``recon_nsamples > nsamples`` when both are set (an unset ``recon_nsamples`` is
            capped at ``nsamples``), or an invalid calibration field.
    """

    sparsity: float = Field(0.5, description="final unstructured sparsity S, reached at step T by the cubic "
                                             "schedule S_t = S - S(1 - t/T)^3 (not with --nm, whose pattern "
                                             "sets it)")
    mixed_nm: bool = Field(False, description="mixed N:M: per-layer N from the allocator's layer importances (RMI, "
                                              "or OWL outlier ratios) with the mean N of --nm exact")
    nm_max_dev: int = Field(1, ge=0, description="mixed N:M: the most a layer's N may move from the mean N")
    nm_max_pairs: int | None = Field(None, ge=-1, description="mixed N:M: layer pairs whose N moves by ±1 "
                                                              "(default: as many as keep the mean sparsity deviation "
                                                              "within delta; -1: no cap)")
    steps: int = Field(5, description="T, the number of prune / fine-tune steps (1 = no dynamic schedule, the "
                                      "DSA ablation)")
    layerwise_sparsity: bool = Field(True, description="per-layer sparsity from the allocator (off = uniform, the "
                                                       "LSR ablation)")
    allocator: Literal["rmi", "owl", "uniform"] = Field(
        "rmi", description="layer-wise sparsity allocator: rmi (Representation Mutual Information, linear CKA), "
                           "owl (outlier-weighted) or uniform")
    rank_allocation: bool = Field(True, description="LoRA ranks proportional to each layer's reconstruction error "
                                                    "(off = every layer gets Omega_t, the SRA ablation)")
    omega_first: float = Field(6.0, gt=0, description="mean LoRA rank Omega_1 at step 1 (linear to Omega_T)")
    omega_last: float = Field(10.0, gt=0, description="mean LoRA rank Omega_T at the last step")
    r_min: int = Field(2, ge=0, description="smallest LoRA rank of a layer")
    r_max: int = Field(16, ge=1, description="adapter capacity: the largest LoRA rank of a layer")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha; the adapter scale is alpha / r_max")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapters' input while fine-tuning")
    lora_target_modules: list[str] = Field(["*"], description="glob patterns, relative to the decoder layer (e.g. "
                                                              "mlp.*), of the linears whose adapters are trained; the "
                                                              "others are pruned alike and keep a frozen rank-0 "
                                                              "adapter")
    nsamples: int = Field(128, description="calibration windows (RMI Grams and pruning statistics; at least 2)")
    recon_nsamples: int = Field(16, ge=1, description="calibration windows used for reconstruction errors",
                                json_schema_extra={"default_help": "16, at most --nsamples"})
    recon_error: Literal["global", "channel"] = Field(
        "global", description="reconstruction error of a layer: global (one ratio over the residual stream) or "
                              "channel (the ratio per hidden channel, averaged; see "
                              "benchmarks/results/losa_recon_error.md)")
    # fine-tuning
    finetune_data: str | None = Field(None, description="fine-tuning data: Alpaca/plain-text .json/.jsonl or a hub "
                                                        "dataset (default: none; with --distill, self-generated)")
    max_examples: int | None = Field(None, ge=1, description="use at most this many fine-tuning examples")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="adapter fine-tuning")

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError(f"sparsity {v} is outside (0, 1): a LoSA target is above 0 and below 1; use e.g. 0.5 "
                             "for 50 %")
        return v

    @field_validator("nsamples")
    @classmethod
    def _nsamples(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"{v} must be at least 2: a LoSA run needs two calibration windows or more (its RMI "
                             "allocation compares the layers by linear CKA across windows)")
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
        if self.nm is None:  # the band around the final target holds every step's smaller one
            check_band(self.effective_allocator, self.sparsity, self.delta, self.owl_lambda)
        if self.recon_nsamples > self.nsamples:
            if "recon_nsamples" not in self.model_fields_set:  # the default follows a small calibration set
                self.__dict__["recon_nsamples"] = self.nsamples
            else:
                raise ValueError(f"{option('recon_nsamples')} {self.recon_nsamples} > {option('nsamples')} "
                                 f"{self.nsamples}: the reconstruction windows are among the calibration windows; "
                                 "lower it")
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

    @property
    def finetunes(self) -> bool:
        """Whether the adapters are fine-tuned: with ``finetune_data`` or label-free ``distill``."""
        return self.finetune_data is not None or self.finetune.distill

    def ignored_fields(self) -> list[tuple[tuple[str, ...], str]]:
        """Fields set to a value other than their default (:meth:`~losa.utils.config.LosaConfig.non_default_fields`,
        so a recipe that lists defaults is fine) that this recipe ignores,
        as (field path, why and the fix), e.g. ``(("finetune", "lr"), "without finetune_data (--finetune-data) or
        ...")``; the fix names each setting as :func:`losa.errors.option` does."""
        out: list[tuple[tuple[str, ...], str]] = []
        ft_set = self.finetune.non_default_fields()
        if not self.finetunes:
            why = f"without {FINETUNE_DATA} or {DISTILL}, so nothing is fine-tuned; add one of them or drop it"
            out += [(("finetune", f), why) for f in FinetuneConfig.model_fields if f in ft_set and f != "distill"]
            out += [((f,), why) for f in ("max_examples", "lora_dropout", "lora_target_modules")
                    if f in self.non_default_fields()]
        elif not self.finetune.distill and "temperature" in ft_set:
            out.append((("finetune", "temperature"),
                        f"without {DISTILL}; add {option('finetune.distill=True', '--distill')} or drop it"))
        if self.mixed_nm and self.effective_allocator == "uniform":
            out.append((("mixed_nm",), f"with {_NO_LAYERWISE} or {_allocator('uniform')}: the uniform allocator "
                                       f"moves no layer's N; use {_RMI_OR_OWL}, or drop {_MIXED_NM}"))
        if self.nm is not None and "sparsity" in self.non_default_fields():
            out.append((("sparsity",), f"with {_NM}: the N:M pattern sets the sparsity; drop it or {_NM}"))
        if not self.mixed_nm:
            out += [((f,), f"without {_MIXED_NM}; add {_ADD_MIXED_NM} or drop it")
                    for f in ("nm_max_pairs", "nm_max_dev") if f in self.non_default_fields()]
        return out + self._ignored_allocator_fields()

    def _ignored_allocator_fields(self) -> list[tuple[tuple[str, ...], str]]:
        """Allocator parameters set to a non-default value that the allocator in use never reads."""
        given = self.non_default_fields()
        params = ("rmi_features", "beta", "delta", "owl_m", "owl_lambda")
        alloc = self.effective_allocator
        if self.nm is not None and not self.mixed_nm:
            why = (f"with {_NM} without {_MIXED_NM}: every layer gets the same N:M pattern; drop it, or add "
                   f"{_ADD_MIXED_NM} with {_RMI_OR_OWL}")
            return [((f,), why) for f in ("allocator", "layerwise_sparsity", *params) if f in given]
        if alloc == "uniform":
            out: list[tuple[tuple[str, ...], str]] = []
            if self.allocator != "uniform" and "allocator" in given:  # --no-layerwise-sparsity overrides it
                out.append((("allocator",), f"with {_NO_LAYERWISE}, i.e. uniform sparsity; drop one of them"))
            why = (f"with uniform sparsity, from {_NO_LAYERWISE} or {_allocator('uniform')}; use layer-wise "
                   f"sparsity with {_RMI_OR_OWL}, or drop it")
            return out + [((f,), why) for f in params if f in given]
        # delta: the band of unstructured RMI, and with mixed N:M the default cap on moved layer pairs
        delta_used = (self.nm_max_pairs is None) if self.mixed_nm else alloc == "rmi"
        other, unused = {"rmi": ("owl", ("owl_m", "owl_lambda")), "owl": ("rmi", ("rmi_features", "beta"))}[alloc]
        out = [((f,), f"with {_allocator(alloc)}: only {_allocator(other)} reads it; use that or drop it")
               for f in unused if f in given]
        if self.mixed_nm and alloc == "owl" and "owl_lambda" in given:
            out.append((("owl_lambda",), f"with {_MIXED_NM}: N moves by {option('nm_max_dev')} within the "
                                         f"{option('nm_max_pairs')} cap; drop it"))
        if not delta_used and "delta" in given:
            why = (f"with {option('nm_max_pairs')}, which sets the moved layer pairs itself; drop one of them"
                   if self.mixed_nm else f"with {_allocator('owl')}, whose band is {option('owl_lambda')}; use that")
            out.append((("delta",), why))
        return out


def check_finetune_size(num_examples: int, config: LoSAConfig) -> None:
    need = config.steps * config.finetune.batch_size
    if num_examples < need and config.finetune_data is None:  # label-free distillation: max_examples windows
        raise LosaError(f"distillation has {num_examples} examples (windows of the calibration source), too few for "
                        f"{config.steps} steps × batch size {config.finetune.batch_size}; raise "
                        f"{option('max_examples')} to at least {need}, or lower steps or the batch size")
    if num_examples < need:
        raise LosaError(f"fine-tuning set has {num_examples} usable examples, too few for {config.steps} steps × "
                        f"batch size {config.finetune.batch_size} (records whose prompt fills max_length are dropped); add data, "
                        "raise max_length, or lower steps or the batch size")
