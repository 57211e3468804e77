"""The one-call pruning API: ``losa.prune(model, tokenizer, PruneConfig(...))``."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, field_validator, model_validator
from torch import nn
from tqdm.auto import tqdm

from losa.calib.engine import LayerwiseEngine
from losa.calib.visitor import LayerContext, LayerVisitor
from losa.data.calibration import check_calib_ids, get_calibration, record_calib_ids
from losa.errors import LosaError, option
from losa.export.verify import SparsityReport, sparsity_report, verify_targets
from losa.models.linear import get_weight, in_features, set_weight
from losa.models.moe import unfused_experts
from losa.models.offload import is_offloaded, onloaded
from losa.models.registry import check_window, get_arch, get_decoder_layers, layer_sizes, linear_modules
from losa.pipelines.config import AllocatorParams, CalibrationConfig, check_band
from losa.pruning.base import Pruner
from losa.pruning.idle import prune_weight, warn_idle
from losa.pruning.ignore import check_ignore, is_ignored
from losa.pruning.masks import parse_nm, validate_nm
from losa.pruning.stats import InputStat
from losa.pruning.target import Target
from losa.utils.config import build_config
from losa.utils.device import activation_budget, resolve_device

#: the fields only an allocator reads, by allocator
ALLOCATOR_PARAMS = {"atp": ("atp_beta", "atp_grid_points"), "owl": ("owl_m", "owl_lambda"),
                    "rmi": ("rmi_features", "beta", "delta")}


class PruneConfig(AllocatorParams, CalibrationConfig):
    """One-shot pruning recipe.

    ``sparsity`` is a float (all layers) or a list with one value per decoder layer. ``nm`` ("2:4")
    selects semi-structured pruning; with ``nm_n`` (one N per layer) and the M of ``nm`` it is mixed N:M.

    Args:
        sparsity: unstructured sparsity in ``[0, 1)``, one value or one per decoder layer.
        nm_n: mixed N:M, one N per decoder layer (M from ``nm``), averaging the N of ``nm`` (so the model is as
            sparse as ``nm``).
        sequential: calibration pass order, ``auto``, ``layer`` or ``module``.
        offload: keep the model on the CPU and move one decoder layer at a time to the device
            (None: when the model does not fit).
        verify: verify every module's sparsity / N:M pattern after pruning.
        allocator: layer-wise sparsity of an unstructured float target, with the parameter-weighted mean kept
            at ``sparsity``: "uniform"; "atp" (ATP, Huang et al. ICML 2025: sparsity rising linearly with
            depth); "owl" (OWL, Yin et al. ICML 2024: layers with more outlier Wanda scores pruned less, within
            ``±owl_lambda``); "rmi" (LoSA's Representation Mutual Information, Huang et al. ICLR 2025 Eq. 4-5:
            layers whose inputs the others share least, by linear CKA, pruned less, within ``±delta``). OWL and
            RMI score the dense model in one calibration pass before pruning.
        atp_beta: ATP's sparsity step between consecutive layers (None: grid search on the calibration loss).
        atp_grid_points: beta values the ATP grid search tries (>= 2).
        rmi_features, beta, delta, owl_m, owl_lambda: the RMI and OWL parameters of :class:`AllocatorParams`.
        method, options, nm, ignore, calib, nsamples, seqlen, seed, data_dir, calib_batch_size,
            stats_precision, device: the calibration fields of :class:`CalibrationConfig` (``ignore``: glob
            patterns of linears left dense, so the model as a whole is less sparse than ``sparsity``).
    Returns:
        The validated config (on construction).
    Raises:
        LosaError: an unknown key or out-of-range value, a sparsity outside ``[0, 1)``, an unknown
            method or pruner option, an invalid ``nm``, a missing calibration file, ``nm_n`` without
            ``nm``, with an N invalid for its M or
            with a mean N other than ``nm``'s, ``stats_precision`` other than ``model`` with
            ``sequential="module"``, an allocator's parameter set with another allocator (``atp_beta`` without
            ``allocator="atp"``, ``owl_lambda`` without ``"owl"``, …), ``atp_beta`` with ``atp_grid_points``, an empty
            ``ignore`` pattern.
    """

    sparsity: float | list[float] = Field(0.5, description="unstructured sparsity in [0, 1): one value, or one "
                                                           "per decoder layer (comma-separated)")
    nm_n: list[int] | None = Field(None, description="mixed N:M: one N per decoder layer, averaging the N of --nm "
                                                     "(M from --nm)")
    sequential: Literal["auto", "layer", "module"] = Field(
        "auto", description="layer: statistics from the unpruned layer, then a second pass to propagate (as "
                            "llm-compressor); module: one pass, each linear pruned at its first call (true "
                            "sequential, all samples in one batch); auto: module when the pruner prefers it "
                            "(SparseGPT) and the batch fits in memory")
    offload: bool | None = Field(None, description="keep the model on the CPU and move one decoder layer at a time "
                                                   "to the device (default: when the model does not fit)")
    verify: bool = Field(True, description="verify every module's sparsity / N:M pattern after pruning")
    allocator: Literal["uniform", "atp", "owl", "rmi"] = Field(
        "uniform", description="layer-wise sparsity of an unstructured target: uniform, atp (sparsity rising "
                               "linearly with depth, ATP), owl (outlier-weighted, OWL) or rmi (Representation "
                               "Mutual Information by linear CKA, LoSA)")
    atp_beta: float | None = Field(None, ge=0, description="ATP: the sparsity step between consecutive layers "
                                                           "(default: grid search on the calibration loss)")
    atp_grid_points: int = Field(8, ge=2, description="ATP: beta values tried by the grid search, from 0 to the "
                                                      "largest that leaves the most pruned layer one weight in K "
                                                      "(K: the narrowest pruned linear's inputs)")

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
            n, m = parse_nm(self.nm)
            for k in self.nm_n:
                validate_nm(k, m)
            mean = sum(self.nm_n) / max(len(self.nm_n), 1)
            if sum(self.nm_n) != n * len(self.nm_n):  # the run would be labelled {nm} but be more or less sparse
                other = f" or {option('nm')} {int(mean)}:{m}" if mean.is_integer() else ""
                raise ValueError(f"{option('nm_n')} averages N={mean:g} over its {len(self.nm_n)} layers, but "
                                 f"{option('nm')} {self.nm} has N={n}: mixed N:M keeps the mean N of its pattern "
                                 f"(its sparsity, for layers of one size); give N values averaging {n}{other}")
        if self.nm is not None and "sparsity" in self.non_default_fields():
            raise ValueError(f"{option('sparsity')} has no effect with {option('nm')}: the {self.nm} pattern sets "
                             "it; drop one of them")
        if self.allocator != "uniform" and (self.nm is not None or isinstance(self.sparsity, list)):
            raise ValueError(f"allocator={self.allocator} spreads one unstructured sparsity over the layers; it "
                             "cannot be combined with nm or a per-layer sparsity list")
        for owner, params in ALLOCATOR_PARAMS.items():
            given = [f for f in params if f in self.non_default_fields()]
            if self.allocator != owner and given:
                chosen = option(f"allocator='{owner}'", f"--allocator {owner}")
                atp = (f" (ATP's step is {option('atp_beta')})" if self.allocator == "atp" and "beta" in given
                       else "")
                raise ValueError(f"{' and '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} to allocator "
                                 f"{owner}; add {chosen} or drop {' and '.join(option(f) for f in given)}{atp}")
        if isinstance(self.sparsity, float) and self.nm is None:
            check_band(self.allocator, self.sparsity, self.delta, self.owl_lambda)
        if self.allocator == "rmi" and self.nsamples < 2:
            raise ValueError(f"allocator rmi compares the layers by linear CKA across calibration windows, which needs "
                             f"{option('nsamples')} 2 or more, got {self.nsamples}")
        if self.atp_beta is not None and "atp_grid_points" in self.non_default_fields():
            raise ValueError("atp_grid_points sets the grid search, which a fixed atp_beta skips; drop one of them")
        return self

    def layer_targets(self, num_layers: int) -> list[Target]:
        """One :class:`Target` per decoder layer."""
        if self.nm is not None:
            n, m = parse_nm(self.nm)
            ns = self.nm_n if self.nm_n is not None else [n] * num_layers
            if len(ns) != num_layers:
                raise LosaError(f"{option('nm_n')} has {len(ns)} entries but the model has {num_layers} decoder "
                                "layers; give one N per layer")
            return [Target(n=int(k), m=m) for k in ns]
        if isinstance(self.sparsity, list):
            if len(self.sparsity) != num_layers:
                raise LosaError(f"sparsity list has {len(self.sparsity)} entries but the model has "
                                f"{num_layers} decoder layers; give one per layer or a single float")
            return [Target(sparsity=float(s)) for s in self.sparsity]
        return [Target(sparsity=float(self.sparsity))] * num_layers

    def describe(self) -> str:
        """A one-line label of the recipe, e.g. ``wanda 50% (owl layer-wise)``, ``sparsegpt 2:4``."""
        dense = f", {','.join(self.ignore)} left dense" if self.ignore else ""
        if self.nm is not None:
            return f"{self.method} {'mixed ' if self.nm_n else ''}{self.nm}{dense}"
        s = self.sparsity
        alloc = f" ({self.allocator} layer-wise)" if self.allocator != "uniform" else ""
        return (f"{self.method} {100 * s:.4g}%{alloc}" if isinstance(s, float) else f"{self.method} per-layer") + dense


@dataclass
class PruneVisitor(LayerVisitor):
    """Prunes every linear module of each visited layer to that layer's target."""

    pruner: Pruner
    targets: list[Target]
    keep_masks: bool = False
    masks: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    #: prune each module at its first call in one forward per layer (see :mod:`losa.calib.engine`)
    single_pass: bool = False
    #: ``ctx.outputs`` is not read (the layer is recomputed after pruning), so statistics passes stop early
    needs_outputs: bool = False
    #: glob patterns of linears left dense (:mod:`losa.pruning.ignore`), and the decoder layers' path for full names
    ignore: tuple[str, ...] = ()
    layers_path: str = ""

    def ignored(self, index: int, name: str) -> bool:
        return is_ignored(self.ignore, index, name, self.layers_path)

    def stats_for(self, index: int, linears: dict[str, nn.Module]) -> dict[str, InputStat]:
        if self.pruner.stat is None:
            return {}
        return {name: self.pruner.stat(in_features(mod), device=mod.weight.device) for name, mod in linears.items()
                if not self.ignored(index, name)}  # no statistic (a SparseGPT Hessian) for a linear left dense

    def visit(self, ctx: LayerContext) -> None:
        idle = []
        for name, mod in ctx.linears.items():
            if name not in ctx.seen:  # in single-pass mode: modules the forward never called (e.g. idle experts)
                if self.prune_module(ctx.index, name, mod, ctx.stats.get(name)):
                    idle.append(name)
        warn_idle(ctx.index, idle, self.pruner.name)
        ctx.modified = not ctx.single_pass

    def visit_module(self, index: int, name: str, mod: nn.Module, stat: InputStat) -> None:
        self.prune_module(index, name, mod, stat)

    def prune_module(self, index: int, name: str, mod: nn.Module, stat: InputStat | None) -> bool:
        """Prune one module to layer ``index``'s target (unless ``ignore`` leaves it dense); returns whether it had
        no tokens (pruned by magnitude)."""
        if self.ignored(index, name):
            return False
        res, idle = prune_weight(self.pruner, get_weight(mod).detach(), stat, self.targets[index],
                                 label=f"layer {index} {name}")
        set_weight(mod, res.weight)
        if self.keep_masks:
            self.masks[(index, name)] = res.mask.cpu()
        return idle


def _use_single_pass(config: PruneConfig, pruner: Pruner, model: nn.Module, layers: nn.ModuleList,
                     calib_ids: torch.Tensor) -> bool:
    """``sequential: module`` always, ``layer`` never; ``auto``: when the pruner prefers it
    (:attr:`Pruner.single_pass_default`) and one batch of all samples fits memory."""
    if config.sequential != "auto":
        return config.sequential == "module"
    if not pruner.single_pass_default or config.stats_precision != "model":
        return False
    if config.calib_batch_size is not None and config.calib_batch_size < len(calib_ids):
        return False
    widths = [max(get_weight(m).shape) for m in linear_modules(layers[0], get_arch(model)).values()]
    itemsize = next(model.parameters()).element_size()
    # the widest activation, a few of them alive at once, plus the kept layer inputs and outputs
    need = calib_ids.numel() * (6 * max(widths, default=1) + 2 * model.config.get_text_config().hidden_size) * max(itemsize, 4)
    return need <= activation_budget(resolve_device(config.device))


def _calibration(model: nn.Module, tokenizer, config: PruneConfig, calib_ids: torch.Tensor | None,
                 timings: dict[str, float], progress: bool) -> torch.Tensor:
    """``calib_ids`` or, when None, the config's calibration windows ``[nsamples, seqlen]``."""
    if calib_ids is not None:
        return calib_ids
    check_window(model, config.seqlen, "calibration window", option("seqlen"))
    t = time.perf_counter()
    ids = get_calibration(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed, config.data_dir,
                          model=model, progress=progress)
    timings["calibration_data_s"] = time.perf_counter() - t
    return ids


class PruneReport(BaseModel):
    """What :func:`prune` did: the recipe, per-layer targets, the verified sparsity and timings.

    Args:
        recipe: the :class:`PruneConfig` as a mapping.
        targets: target sparsity per decoder layer.
        nm: ``(N, M)`` of an N:M recipe's ``nm``, else None (with ``nm_n``, each layer's N is in ``targets``
            as ``1 - N/M``).
        sparsity: measured sparsity per module (with layer index and name), per layer and overall.
        sequential: the calibration pass order used (``none`` for data-free pruners).
        timings: seconds per phase (``calibration_data_s``, ``prune_s``, ``total_s``).
        allocation: the layer-wise allocator's choice (ATP: ``beta`` and the calibration loss of every beta
            tried; empty for uniform targets).
    Returns:
        The report (on construction).
    Raises:
        pydantic.ValidationError: a missing or ill-typed field (a plain pydantic model, not a
            :class:`LosaConfig`, so no :class:`LosaError`).
    """

    recipe: dict[str, Any] = Field(description="the PruneConfig as a mapping")
    allocation: dict[str, Any] = Field(default_factory=dict, description="the allocator's choice (ATP: beta and the "
                                                                         "calibration loss of every beta tried)")
    targets: list[float] = Field(description="target sparsity per decoder layer")
    nm: tuple[int, int] | None = Field(None, description="(N, M) of an N:M recipe's nm (with nm_n, each layer's N "
                                                           "is in targets)")
    sparsity: SparsityReport = Field(description="per-module (with layer index and name), per-layer, overall")
    sequential: Literal["none", "layer", "module"] = Field(description="the calibration pass order used")
    timings: dict[str, float] = Field(description="seconds per phase (calibration_data_s, prune_s, total_s)")


#: the start of the warning for hand-written per-layer targets of layers that ``ignore`` leaves dense
UNUSED_LAYER_TARGETS = "ignore leaves"


def _warn_unused_layer_targets(model: nn.Module, config: PruneConfig, ignore: tuple[str, ...]) -> None:
    """Warn when a hand-written per-layer target (a ``sparsity`` list or ``nm_n``) belongs to a decoder layer that
    ``ignore`` leaves dense entirely: that target is not applied, and the mean the user computed includes it."""
    per_layer = config.nm_n if config.nm is not None else config.sparsity
    if not ignore or not isinstance(per_layer, list):
        return
    dense = [i for i, size in enumerate(layer_sizes(model, ignore)) if size == 0]
    if dense and len(per_layer) == len(get_decoder_layers(model)):  # a wrong length is refused later, in one line
        what = "nm_n" if config.nm is not None else "sparsity"
        shown = ", ".join(f"layer {i}: {per_layer[i]}" for i in dense[:8]) + (", ..." if len(dense) > 8 else "")
        warnings.warn(f"{UNUSED_LAYER_TARGETS} {len(dense)} decoder layer(s) dense entirely, so their {what} entries are not "
                      f"applied ({shown})", stacklevel=3)


def prune(model: nn.Module, tokenizer=None, config: PruneConfig | dict | None = None,
          calib_ids: torch.Tensor | None = None, progress: bool = True,
          visitor: PruneVisitor | None = None) -> PruneReport:
    """Prune ``model`` in place (one-shot) and verify the result.

    Magnitude, Wanda (Sun et al., 2024: |W|·‖X_j‖₂ per output row) or SparseGPT (Frantar & Alistarh,
    2023: OBS with lazy block updates), unstructured, N:M or mixed N:M, layer by layer over the
    calibration windows with the outputs of the already-pruned layers as the next layer's inputs.
    Fused mixture-of-experts weights are pruned per expert matrix from the tokens routed to that expert
    (:func:`losa.models.unfused_experts`; an expert that gets no token is pruned by magnitude, with a
    warning); the model is fused back before this returns.

    A model loaded with accelerate offloading (``from_pretrained(..., device_map=..., max_memory=...,
    offload_folder=...)``) is pruned one decoder layer at a time on its execution device; the pruned
    weights are written back into its offload (CPU or disk, :mod:`losa.models.offload`).

    Args:
        model: a causal LM of a registered architecture.
        tokenizer: its tokenizer (to tokenise calibration text; unused with ``calib_ids``).
        config: :class:`PruneConfig` or a mapping of its fields (default: Wanda 50 %).
        calib_ids: ``[nsamples, seqlen]`` token ids overriding the calibration source of the config.
        progress: progress bars.
        visitor: a custom :class:`PruneVisitor` (e.g. one that keeps the masks); its ``ignore`` patterns are
            added to the config's.
    Returns:
        the typed :class:`PruneReport`.
    Raises:
        LosaError: invalid config (or not a PruneConfig or mapping), unsupported model (or MoE family whose
            experts cannot be pruned, or an offloaded MoE model), calibration data missing, ``calib_ids`` not
            a 2-D integer tensor of ids in the model's vocabulary, a model dispatched across several
            compute devices or to another device than ``config.device``, an ``ignore`` pattern that matches no
            linear or patterns that leave nothing to prune.
        SparsityVerificationError: a module misses its target (with ``verify``).
    """
    if config is None:
        config = PruneConfig()
    elif isinstance(config, dict):
        config = build_config(PruneConfig, config)
    elif not isinstance(config, PruneConfig):
        raise LosaError(f"prune takes a PruneConfig or a dict of its fields, not {type(config).__name__}"
                        + ("; a LoSAConfig is run by losa.run" if type(config).__name__ == "LoSAConfig" else ""))
    from losa.lora.model import sparse_lora_modules

    if sparse_lora_modules(model):  # e.g. left by a LoSA run of an older version, or added by hand
        raise LosaError("the model holds sparse LoRA adapters; merge them with losa.lora.merge_and_unload(model) "
                        "before pruning")
    t0 = time.perf_counter()
    if get_arch(model).experts is not None and is_offloaded(model):
        raise LosaError("pruning a mixture-of-experts model whose weights accelerate offloads is not supported; "
                        "load it without CPU/disk offloading (no device_map with max_memory/offload_folder)")
    calib_ids = check_calib_ids(model, calib_ids)  # before any work: 2-D integer ids within the vocabulary
    own = visitor.ignore if visitor is not None else ()
    ignore = tuple(dict.fromkeys((*own, *config.ignore)))  # a custom visitor's patterns and the config's
    check_ignore(model, ignore)
    _warn_unused_layer_targets(model, config, ignore)
    try:  # the visitor runs with the merged patterns; the caller's keeps its own
        with unfused_experts(model):
            targets, sequential, timings, allocation = _prune(model, tokenizer, config, calib_ids, progress, visitor,
                                                              ignore)
    finally:
        if visitor is not None:
            visitor.ignore = own
    report = sparsity_report(model, [t.pattern for t in targets])  # on the fused model: every expert matrix counts
    if config.verify:
        verify_targets(report, targets, ignore=ignore)
    target = config.sparsity if config.nm is None and isinstance(config.sparsity, float) else None
    if target is not None and config.allocator == "uniform" and report.overall > target + 0.01:
        warnings.warn(f"the model came out {report.overall:.2%} sparse, above the {target:.2%} target: it was "
                      "already sparser (pruning only removes weights); prune the dense checkpoint for this target",
                      stacklevel=2)
    timings["total_s"] = time.perf_counter() - t0
    recipe = record_calib_ids(config.model_dump(), calib_ids) | {"ignore": list(ignore)}  # a visitor's own too
    return PruneReport(recipe=recipe, allocation=allocation, targets=[t.sparsity for t in targets],
                       nm=parse_nm(config.nm) if config.nm else None, sparsity=report, sequential=sequential,
                       timings=timings)


def _scored_sparsities(model: nn.Module, config: PruneConfig, calib_ids: torch.Tensor, progress: bool
                       ) -> tuple[list[float], dict[str, Any]]:
    """Per-layer sparsities from the dense model's OWL outlier ratios or RMI (linear CKA between the layers'
    inputs or outputs), measured in one calibration pass; returns them and the allocator's record (its
    scores)."""
    from losa.allocation.allocators import allocate_live
    from losa.allocation.cka import GramAccumulator
    from losa.pipelines.losa.visitors import RMIVisitor

    owl = config.allocator == "owl"
    n_layers = len(get_decoder_layers(model))
    visitor = RMIVisitor(GramAccumulator(n_layers, len(calib_ids)), config.rmi_features,
                         owl_m=config.owl_m if owl else None, grams=not owl)
    LayerwiseEngine(model, calib_ids, device=config.device, batch_size=config.calib_batch(calib_ids.shape[1]),
                    offload=config.offload, progress=progress, desc=f"{config.allocator.upper()} scores").run(visitor)
    target, sizes = float(config.sparsity), layer_sizes(model, config.ignore)  # type: ignore[arg-type]
    if owl:
        ratios = [visitor.outlier_ratios[i] for i in range(n_layers)]
        s = allocate_live("owl", target, sizes, outlier_ratios=ratios, lam=config.owl_lambda)
        return [float(x) for x in s], {"method": "owl", "outlier_ratios": ratios}
    cka = visitor.acc.cka().numpy()
    s = allocate_live("rmi", target, sizes, cka=cka, beta=config.beta, delta=config.delta)
    return [float(x) for x in s], {"method": "rmi", "cka": cka.tolist()}


def _prune(model: nn.Module, tokenizer, config: PruneConfig, calib_ids: torch.Tensor | None, progress: bool,
           visitor: PruneVisitor | None, ignore: tuple[str, ...] = ()
           ) -> tuple[list[Target], Literal["none", "layer", "module"], dict[str, float], dict[str, Any]]:
    """The pruning passes of :func:`prune` (on a model whose experts are unfused), leaving the linears that
    ``ignore`` names dense: returns the per-layer targets, the pass order used, the timings and the allocator's
    choice."""
    spec = get_arch(model)
    layers = get_decoder_layers(model, spec)
    pruner = config.pruner()
    timings: dict[str, float] = {}
    allocation: dict[str, Any] = {}
    if config.allocator == "atp":
        calib_ids = _calibration(model, tokenizer, config, calib_ids, timings, progress)
        from losa.pipelines.atp import atp_sparsities

        t = time.perf_counter()
        sparsities, allocation = atp_sparsities(model, tokenizer, config, calib_ids, progress)
        timings["allocation_s"] = time.perf_counter() - t
        targets = [Target(sparsity=x) for x in sparsities]
    elif config.allocator in ("owl", "rmi"):
        calib_ids = _calibration(model, tokenizer, config, calib_ids, timings, progress)
        t = time.perf_counter()
        sparsities, allocation = _scored_sparsities(model, config, calib_ids, progress)
        timings["allocation_s"] = time.perf_counter() - t
        targets = [Target(sparsity=x) for x in sparsities]
    else:
        targets = config.layer_targets(len(layers))
    visitor = visitor or PruneVisitor(pruner, targets)
    visitor.ignore, visitor.layers_path = ignore, spec.layers_path
    sequential: Literal["none", "layer", "module"] = "none"  # data-free pruners need no calibration pass
    if pruner.stat is None:  # data-free: no calibration pass needed
        for i, layer in enumerate(tqdm(layers, desc=f"pruning ({config.method})", unit="layer", disable=not progress)):
            with onloaded(layer):  # weights offloaded by accelerate: pruned values written back
                for name, mod in linear_modules(layer, spec).items():
                    visitor.prune_module(i, name, mod, None)
    else:
        calib_ids = _calibration(model, tokenizer, config, calib_ids, timings, progress)
        single = _use_single_pass(config, pruner, model, layers, calib_ids)
        visitor.single_pass = single
        if single:
            batch = len(calib_ids)
        else:
            batch = config.calib_batch(calib_ids.shape[1])
        engine = LayerwiseEngine(model, calib_ids, device=config.device, batch_size=batch,
                                 offload=config.offload, progress=progress, desc=f"pruning ({config.method})",
                                 stats_autocast=config.stats_autocast())
        t = time.perf_counter()
        engine.run(visitor)
        timings["prune_s"] = time.perf_counter() - t
        sequential = "module" if single else "layer"
    return targets, sequential, timings, allocation
