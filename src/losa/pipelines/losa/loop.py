"""``losa.run(model, tokenizer, LoSAConfig(...))``: the LoSA dynamic prune / fine-tune schedule.

For t = 1..T: compute the RMI Grams of the (adapter-merged) model in one sequential calibration
pass → per-layer sparsities at S_t → prune the merged weights layer by layer and unmerge with the
new masks → reconstruction error of every layer against the stored dense outputs → ranks from the
Ω_t budget → fine-tune the adapters on this step's data slice. After step T the adapters are merged
for good and the sparsity is verified. Every step is checkpointed atomically (``--resume``) and
appended to ``report.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from losa.allocation.allocators import allocate, default_delta, rmi_importance
from losa.allocation.cka import GramAccumulator
from losa.allocation.mixed_nm import allocate_mixed_nm, pairs_for_delta
from losa.allocation.schedule import rank_budget_at, sparsity_at
from losa.calib.engine import LayerwiseEngine
from losa.data.calibration import get_calibration
from losa.errors import LosaError
from losa.export.verify import sparsity_report, verify_targets
from losa.finetune.data import load_records, split_for_steps, tokenize_records
from losa.lora.config import SparseLoRAConfig
from losa.lora.layer import SparseLoRALinear
from losa.lora.model import add_sparse_lora, merge_and_unload, set_layer_ranks, sparse_lora_modules
from losa.lora.ranks import allocate_ranks
from losa.models.linear import get_weight
from losa.models.registry import get_arch, get_decoder_layers, linear_modules
from losa.pipelines.losa.config import LoSAConfig, check_finetune_size
from losa.pipelines.losa.recon import DenseTargets, reconstruction_errors
from losa.pipelines.losa.state import load_state, save_state, seed_everything
from losa.pipelines.losa.visitors import AdapterPruneVisitor, RMIVisitor
from losa.pruning.masks import parse_nm
from losa.pruning.target import Target
from losa.report.schema import FinalResults, RunMeta, RunReport, StepRecord, save_report
from losa.utils.config import build_config
from losa.utils.io import atomic_write_json
from losa.utils.versions import versions


def layer_sizes(model: nn.Module) -> list[int]:
    spec = get_arch(model)
    return [sum(get_weight(m).numel() for m in linear_modules(layer, spec).values())
            for layer in get_decoder_layers(model, spec)]


def prepare_finetune_examples(tokenizer, cfg: LoSAConfig, calib_source_seed: int) -> list[dict[str, list[int]]]:
    ft = cfg.finetune
    if cfg.finetune_data is not None:
        examples = tokenize_records(load_records(cfg.finetune_data), tokenizer, ft.max_length, ft.prompt_format)
    elif ft.distill:  # label-free distillation on fresh calibration-source windows
        n = cfg.max_examples or 16 * cfg.steps * ft.batch_size
        ids = get_calibration(tokenizer, cfg.calib, n, ft.max_length, calib_source_seed, cfg.data_dir, progress=False)
        examples = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
    else:
        return []
    if cfg.max_examples is not None:
        examples = split_for_steps(examples, 1, seed=cfg.seed)[0][: cfg.max_examples]
    check_finetune_size(len(examples), cfg)
    return examples


def _step_targets(cfg: LoSAConfig, step: int, sizes: list[int], cka: np.ndarray | None,
                  outliers: list[float] | None) -> tuple[list[Target], list[float], list[int] | None]:
    """Per-layer targets at ``step``: unstructured s_l at S_t, or (N:M runs) the (mixed) N:M pattern.

    An N:M pattern has one sparsity, so the cubic ramp does not apply: every step prunes the merged
    weights to the pattern (mixed N:M re-allocates N per layer from the current RMI / OWL scores).
    Pruning to intermediate unstructured sparsities first would leave groups with fewer than N
    non-zeros, i.e. a model sparser than the pattern needs.
    """
    alloc = cfg.effective_allocator
    s_t = sparsity_at(step, cfg.steps, cfg.target_sparsity)
    if cfg.nm is not None:
        n, m = parse_nm(cfg.nm)
        if cfg.mixed_nm and alloc != "uniform":
            imp = rmi_importance(cka, cfg.beta) if cka is not None else np.asarray(outliers)
            pairs = cfg.nm_max_pairs
            if pairs is None and len(set(sizes)) > 1:
                warnings.warn("mixed N:M over decoder layers of different sizes: the default cap on moved layers "
                              "needs equal sizes, so every layer may move N by up to nm_max_dev", stacklevel=2)
                pairs = -1
            elif pairs is None:
                delta = cfg.delta if cfg.delta is not None else default_delta(1.0 - n / m)
                pairs = pairs_for_delta(delta, m, len(sizes))
            ns = allocate_mixed_nm(n, m, imp, sizes, cfg.nm_max_dev, max_pairs=None if pairs < 0 else pairs)
        else:
            ns = [n] * len(sizes)
        return [Target(n=k, m=m) for k in ns], [1.0 - k / m for k in ns], ns
    kw: dict[str, Any] = {}
    if alloc == "rmi":
        kw = {"cka": cka, "beta": cfg.beta, "delta": cfg.delta}
    elif alloc == "owl":
        kw = {"outlier_ratios": outliers, "lam": cfg.owl_lambda}
    s = [float(x) for x in allocate(alloc, s_t, sizes, **kw)]
    return [Target(sparsity=x) for x in s], s, None


def _rmi_pass(model: nn.Module, calib_ids: torch.Tensor, cfg: LoSAConfig, progress: bool,
              wrappers: dict[int, SparseLoRALinear]) -> tuple[np.ndarray | None, list[float] | None]:
    alloc = cfg.effective_allocator
    need_cka = alloc == "rmi" or (cfg.mixed_nm and alloc != "uniform")
    need_owl = alloc == "owl"
    if not (need_cka or need_owl):
        return None, None
    n_layers = len(get_decoder_layers(model))
    visitor = RMIVisitor(GramAccumulator(n_layers, len(calib_ids)), cfg.rmi_features,
                         owl_m=cfg.owl_m if need_owl else None, wrappers=wrappers)
    LayerwiseEngine(model, calib_ids, device=cfg.device, batch_size=cfg.calib_batch(), progress=progress,
                    desc="RMI grams").run(visitor)
    cka = visitor.acc.cka().numpy() if need_cka else None
    outliers = [visitor.outlier_ratios[i] for i in range(n_layers)] if need_owl else None
    return cka, outliers


@dataclass
class StepResult:
    """What one LoSA step did (also a row of ``details.json`` and the resume state)."""

    step: int
    sparsity_target: float  #: S_t
    layer_sparsity: list[float]  #: per-layer target s_l at this step
    layer_achieved: list[float]  #: per-layer fraction outside the masks after pruning
    nm_n: list[int] | None  #: per-layer N (N:M runs)
    cka: list[list[float]] | None  #: L x L linear CKA of the layers (RMI)
    outlier_ratios: list[float] | None  #: OWL outlier ratio per layer
    recon_errors: list[float]  #: reconstruction error per layer before fine-tuning
    recon_errors_after: list[float]  #: ... and after
    omega: float  #: mean rank budget Ω_t
    ranks: list[int]  #: allocated LoRA rank per layer
    train_losses: list[float]
    train_loss: float | None
    finetune_steps: int
    finetune_tokens: int
    times: dict[str, float]  #: seconds per phase

    def to_row(self) -> dict[str, Any]:
        """The JSON row (``details.json``, ``state.json``)."""
        return dataclasses.asdict(self)


class LoSARun:
    """One LoSA run on ``model`` (in place): :meth:`setup`, then :meth:`step` for t = 1..T, then :meth:`finish`.

    Args:
        model: a causal LM of a registered architecture (ends merged and sparse).
        tokenizer: its tokenizer (fine-tuning data, self-generated calibration text).
        config: the recipe.
        out: run directory (state, report.json, details.json), or None for a temporary one.
        resume: continue from the last finished step in ``out``.
        progress: progress bars.
        calib_ids: ``[n, seqlen]`` calibration windows overriding the config's source.
        model_name: recorded in the report.
    Raises:
        LosaError: ``resume`` without ``out``; ``out`` already holds a run and ``resume`` is not set.
    """

    def __init__(self, model: nn.Module, tokenizer, config: LoSAConfig, out: Path | None, resume: bool = False,
                 progress: bool = True, calib_ids: torch.Tensor | None = None, model_name: str = "") -> None:
        if resume and out is None:
            raise LosaError("--resume needs the --out directory of the run to continue")
        if out is not None and out.exists() and not resume and (out / "state").exists():
            raise LosaError(f"{out} already holds a LoSA run; pass --resume to continue it or choose another --out")
        self.model, self.tokenizer, self.cfg = model, tokenizer, config
        self.write = out is not None  # a run without out_dir cannot be resumed, so it skips the checkpoint
        self.tmp_root = None if out is not None else Path(tempfile.mkdtemp(prefix="losa-run-"))
        self.out: Path = out if out is not None else self.tmp_root  # type: ignore[assignment]
        self.out.mkdir(parents=True, exist_ok=True)
        self.resume, self.progress, self.calib_ids, self.model_name = resume, progress, calib_ids, model_name
        self.recipe = config.model_dump()
        self.t_start = time.perf_counter()
        self.rows: list[dict] = []
        self.first_step = 1
        self.final_targets: list[Target] | None = None

    # ------------------------------------------------------------------ phases
    def setup(self) -> None:
        """Calibration windows, fine-tuning slices, dense targets, adapters; restores state on resume."""
        cfg, model = self.cfg, self.model
        seed_everything(cfg.seed)
        if self.calib_ids is None:
            self.calib_ids = get_calibration(self.tokenizer, cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed,
                                             cfg.data_dir, model=model, progress=self.progress)
        self.recon_ids = self.calib_ids[: cfg.recon_nsamples]
        examples = prepare_finetune_examples(self.tokenizer, cfg, cfg.seed + 1)
        self.slices = split_for_steps(examples, cfg.steps, seed=cfg.seed) if examples else [[] for _ in range(cfg.steps)]
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        self.pad_id = pad_id if pad_id is not None else (getattr(self.tokenizer, "eos_token_id", None) or 0)
        self.teacher = None
        if cfg.finetune.distill and examples:
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self.sizes = layer_sizes(model)
        targets_path = self.out / "dense_targets.npy"
        t = time.perf_counter()
        if not (self.resume and targets_path.is_file()):
            DenseTargets.compute(model, self.recon_ids, targets_path, cfg.calib_batch(), cfg.device, self.progress)
        self.dense_s = time.perf_counter() - t
        self.dense = DenseTargets(targets_path)
        init_rank = int(round(min(max(cfg.omega_first, cfg.r_min), cfg.r_max)))
        add_sparse_lora(model, SparseLoRAConfig(r_max=cfg.r_max, rank=init_rank, alpha=cfg.lora_alpha,
                                                init_seed=cfg.seed))
        self.wrappers = {id(m.base): m for m in sparse_lora_modules(model).values()}
        if self.resume:
            state = load_state(self.out, model, self.recipe)
            if state is not None:
                self.first_step, self.rows = state[0] + 1, state[1]
        self.pruner = cfg.pruner()
        if self.rows:
            last = self.rows[-1]
            self.final_targets = ([Target(n=k, m=parse_nm(cfg.nm)[1]) for k in last["nm_n"]] if last.get("nm_n")
                                  else [Target(sparsity=s) for s in last["layer_sparsity"]])

    def step(self, step: int) -> StepResult:
        """One LoSA step: RMI -> per-layer targets at S_t -> prune merged weights -> ranks from the
        reconstruction errors and Ω_t -> fine-tune this step's slice; then checkpoint and report."""
        cfg, model = self.cfg, self.model
        seed_everything(cfg.seed * 1000 + step)
        times: dict[str, float] = {}
        s_t = cfg.target_sparsity if cfg.nm else sparsity_at(step, cfg.steps, cfg.target_sparsity)
        omega = rank_budget_at(step, cfg.steps, cfg.omega_first, cfg.omega_last)

        t = time.perf_counter()
        cka, outliers = _rmi_pass(model, self.calib_ids, cfg, self.progress, self.wrappers)
        times["rmi_s"] = time.perf_counter() - t
        targets, layer_s, nm_n = _step_targets(cfg, step, self.sizes, cka, outliers)
        self.final_targets = targets

        t = time.perf_counter()
        LayerwiseEngine(model, self.calib_ids, device=cfg.device, batch_size=cfg.calib_batch(), progress=self.progress,
                        desc=f"step {step}/{cfg.steps}: pruning ({cfg.method})",
                        stats_autocast=cfg.stats_autocast()).run(
            AdapterPruneVisitor(self.pruner, targets, self.wrappers))
        times["prune_s"] = time.perf_counter() - t
        achieved = _mask_sparsity(model)

        t = time.perf_counter()
        errors = self._errors()
        times["recon_s"] = time.perf_counter() - t
        ranks = (allocate_ranks(errors, omega, cfg.r_min, cfg.r_max) if cfg.rank_allocation
                 else [int(round(omega))] * len(self.sizes))
        set_layer_ranks(model, ranks)

        t = time.perf_counter()
        ft: dict[str, Any] = {"losses": [], "steps": 0, "tokens": 0, "optimizer_state": None, "train_loss": None}
        if self.slices[step - 1]:
            ftc = cfg.finetune.model_copy(update={"seed": cfg.finetune.seed + cfg.seed * 1000 + step})
            ft = finetune(model, self.slices[step - 1], ftc, self.pad_id, teacher=self.teacher)
        times["finetune_s"] = time.perf_counter() - t
        t = time.perf_counter()
        errors_after = self._errors() if ft["steps"] else errors
        times["recon_after_s"] = time.perf_counter() - t
        times["total_s"] = sum(times.values())

        result = StepResult(step=step, sparsity_target=s_t, layer_sparsity=layer_s, layer_achieved=achieved,
                            nm_n=nm_n, cka=None if cka is None else cka.tolist(), outlier_ratios=outliers,
                            recon_errors=errors, recon_errors_after=errors_after, omega=omega, ranks=ranks,
                            train_losses=ft["losses"], train_loss=ft["train_loss"], finetune_steps=ft["steps"],
                            finetune_tokens=ft["tokens"], times=times)
        self.rows.append(result.to_row())
        if self.write:
            save_state(self.out, model, step, self.recipe, self.rows, ft["optimizer_state"])
            _write(self.out, _report(cfg, self.rows, None, self.model_name), self.rows, self.sizes, self.dense_s)
        return result

    def finish(self) -> RunReport:
        """Merge the adapters for good, verify the sparsity, write the final report, drop the dense targets."""
        t = time.perf_counter()
        merge_and_unload(self.model)
        final_targets = self.final_targets
        assert final_targets is not None
        nm_list = [(tg.n, tg.m) if tg.is_nm else None for tg in final_targets]
        rep = sparsity_report(self.model, nm_list)
        verify_targets(rep, final_targets)
        final = FinalResults(sparsity=rep.overall, layer_target_sparsity=[tg.sparsity for tg in final_targets],
                             layer_achieved_sparsity=[r.sparsity for r in rep.layers])
        report = _report(self.cfg, self.rows, final, self.model_name)
        if self.write:
            _write(self.out, report, self.rows, self.sizes, self.dense_s,
                   {"merge_verify_s": time.perf_counter() - t, "wall_s": time.perf_counter() - self.t_start})
        self.close()
        return report

    def close(self) -> None:
        """Remove what only a running (resumable) run needs: the dense targets, a temporary run directory."""
        if hasattr(self, "dense"):
            del self.dense  # drops the memory map before the file goes
        if self.tmp_root is not None:
            shutil.rmtree(self.tmp_root, ignore_errors=True)
        else:
            (self.out / "dense_targets.npy").unlink(missing_ok=True)

    def _errors(self) -> list[float]:
        return reconstruction_errors(self.model, self.recon_ids, self.dense, self.cfg.calib_batch(), self.cfg.device)


def run(model: nn.Module, tokenizer, config: LoSAConfig | dict | None = None, out_dir: str | Path | None = None,
        resume: bool = False, progress: bool = True, calib_ids: torch.Tensor | None = None,
        model_name: str | None = None) -> RunReport:
    """Run LoSA on ``model`` in place (it ends merged and sparse).

    LoSA (Huang et al., ICLR 2025, Algorithm 1): for t = 1..T prune to S_t = S − S(1 − t/T)³ with
    per-layer sparsity from RMI (linear CKA), give each layer a LoRA rank proportional to its
    reconstruction error (Σ r_l = L·Ω_t), fine-tune the masked adapters ΔW = (B·A) ⊙ M; finally merge.

    Args:
        model: a causal LM of a registered architecture.
        tokenizer: its tokenizer.
        config: :class:`LoSAConfig` or a mapping of its fields.
        out_dir: run directory: ``state/`` (resume), ``report.json`` after every step, ``details.json``
            (per-step extras: Ω_t, N per layer, OWL ratios, timings). None: a temporary directory.
        resume: continue the run in ``out_dir`` from its last finished step.
        progress: progress bars.
        calib_ids: ``[n, seqlen]`` token ids overriding the calibration source of the config.
        model_name: recorded in the report (default: the model's ``_name_or_path``).
    Returns:
        the :class:`~losa.report.schema.RunReport`.
    Raises:
        LosaError: invalid config, ``resume`` without ``out_dir``, an existing run in ``out_dir``, too
            little fine-tuning data, or a recipe that differs from the one being resumed.
        SparsityVerificationError: the merged model misses a layer's target.
    """
    cfg = build_config(LoSAConfig, config) if isinstance(config, dict) else (config or LoSAConfig())
    name = model_name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    job = LoSARun(model, tokenizer, cfg, Path(out_dir) if out_dir is not None else None, resume, progress,
                  calib_ids, name)
    try:
        job.setup()
        for step in range(job.first_step, cfg.steps + 1):
            job.step(step)
        return job.finish()
    finally:
        if job.tmp_root is not None:
            shutil.rmtree(job.tmp_root, ignore_errors=True)


def finetune(*args: Any, **kwargs: Any) -> dict:
    """:func:`losa.finetune.train.finetune`, imported on first use (it pulls in transformers' Trainer)."""
    from losa.finetune.train import finetune as _finetune

    return _finetune(*args, **kwargs)


def _mask_sparsity(model: nn.Module) -> list[float]:
    """Per decoder layer: fraction of adapted weights outside the current masks."""
    out = []
    for layer in get_decoder_layers(model):
        mods = [m for m in layer.modules() if isinstance(m, SparseLoRALinear)]
        total = sum(m.mask.numel() for m in mods)
        out.append(1.0 - sum(int(m.mask.sum()) for m in mods) / max(total, 1))
    return out


def _pattern(cfg: LoSAConfig) -> str:
    if cfg.nm is None:
        return "unstructured"
    return f"mixed {cfg.nm}" if cfg.mixed_nm else cfg.nm


def _report(cfg: LoSAConfig, rows: list[dict], final: FinalResults | None, model_name: str) -> RunReport:


    steps = [StepRecord(step=r["step"], target_sparsity=r["sparsity_target"], layer_target_sparsity=r["layer_sparsity"],
                        layer_achieved_sparsity=r["layer_achieved"], cka=r["cka"], recon_error_before=r["recon_errors"],
                        recon_error_after=r["recon_errors_after"], ranks=r["ranks"], train_loss=r["train_losses"],
                        wall_time_s=r["times"]["total_s"]) for r in rows]
    meta = RunMeta(model=model_name, method=cfg.method, finetune="losa", sparsity=cfg.target_sparsity,
                   pattern=_pattern(cfg), config=cfg.model_dump(mode="json"),
                   created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   versions=versions())
    return RunReport(meta=meta, steps=steps, results=final or FinalResults())


def _write(out: Path, report: RunReport, rows: list[dict], sizes: list[int], dense_s: float,
           final_extra: dict | None = None) -> None:
    save_report(report, out)
    atomic_write_json(out / "details.json", {"layer_sizes": sizes, "dense_targets_s": dense_s, "steps": rows,
                                             "final": final_extra})
