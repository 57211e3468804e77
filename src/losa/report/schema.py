"""The schema of a run's ``report.json`` and how to read a run directory into it.

A LoSA run writes ``report.json`` (a :class:`RunReport`): run metadata, one :class:`StepRecord` per
prune / fine-tune step ``t`` and the final results. A one-shot prune checkpoint (``losa prune``)
has only ``losa.json`` (recipe, per-layer sparsity, perplexity); :func:`load_run` turns it into the
same model, adding zero-shot scores from ``zeroshot.json`` (``losa eval zeroshot --out``) if present.

Conventions: sparsities are fractions in [0, 1]; accuracies are fractions in [0, 1]; layer lists
are indexed by decoder layer; ``cka`` is the L x L linear-CKA (RMI) similarity matrix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from losa.errors import LosaError
from losa.utils.io import atomic_write_json

REPORT_FILE = "report.json"
MANIFEST_FILE = "losa.json"
ZEROSHOT_FILE = "zeroshot.json"

Fraction = float


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskScore(_Model):
    """One zero-shot task: lm-eval's acc, acc_norm (None where undefined) and the items scored."""

    acc: Fraction | None = None
    acc_norm: Fraction | None = None
    n: int | None = None

    @field_validator("acc", "acc_norm")
    @classmethod
    def _in_unit(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"accuracy {v} is not a fraction in [0, 1]")
        return v


class RunMeta(_Model):
    """What was run. ``method`` is the one-shot pruner (or "dense"); ``finetune`` what followed it."""

    model: str
    method: str = "dense"
    finetune: Literal["none", "lora", "losa"] = "none"
    sparsity: Fraction = 0.0
    pattern: str = "unstructured"  # "unstructured", "2:4", "mixed 4:8", ...
    config: dict[str, Any] = Field(default_factory=dict)
    created: str | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)  # what the run warned about, e.g. that nothing was fine-tuned

    @property
    def fine_tuned(self) -> bool:
        """Whether the run fine-tuned its adapters.

        Returns:
            False for a LoSA run without fine-tuning data and without distillation (read from the recipe, so
            reports written before ``notes`` existed count too); for other runs, whether they have adapters.
        """
        if self.finetune != "losa" or "finetune" not in self.config:
            return self.finetune != "none"
        return bool(self.config.get("finetune_data")) or bool((self.config.get("finetune") or {}).get("distill"))

    @property
    def finetune_label(self) -> str:
        """What follows the method's name in tables and reports: ``""``, ``" + LoRA"``, ``" + LoSA"``, with
        ``" (no fine-tuning)"`` for a LoSA run that fine-tuned nothing (:attr:`fine_tuned`)."""
        label = {"none": "", "lora": " + LoRA", "losa": " + LoSA"}[self.finetune]
        return label if self.finetune == "none" or self.fine_tuned else f"{label} (no fine-tuning)"


class StepRecord(_Model):
    """One LoSA step t: prune to ``target_sparsity`` S_t, allocate ranks, fine-tune."""

    step: int
    target_sparsity: Fraction
    layer_target_sparsity: list[Fraction] = Field(default_factory=list)
    layer_achieved_sparsity: list[Fraction] = Field(default_factory=list)
    cka: list[list[float]] | None = None
    recon_error_before: list[float] | None = None  # per layer, before this step's fine-tuning
    recon_error_after: list[float] | None = None   # per layer, after it
    ranks: list[int] | None = None
    train_loss: list[float] = Field(default_factory=list)  # one value per optimiser step
    wall_time_s: float | None = None
    ppl: dict[str, float] = Field(default_factory=dict)  # dataset -> perplexity after the step

    @model_validator(mode="after")
    def _consistent(self) -> StepRecord:
        n = len(self.layer_target_sparsity)
        if self.layer_achieved_sparsity and n and len(self.layer_achieved_sparsity) != n:
            raise ValueError(f"step {self.step}: {n} layer targets but {len(self.layer_achieved_sparsity)} achieved")
        if self.cka is not None and any(len(row) != len(self.cka) for row in self.cka):
            raise ValueError(f"step {self.step}: cka is not a square matrix")
        for name in ("recon_error_before", "recon_error_after", "ranks"):
            v = getattr(self, name)
            if v is not None and n and len(v) != n:
                raise ValueError(f"step {self.step}: {name} has {len(v)} layers, expected {n}")
        return self


class PplSettings(_Model):
    """How perplexities were measured (``losa.eval.ppl.perplexity``): values measured with other settings are not
    comparable."""

    seqlen: int  # window length in tokens
    max_windows: int | None = None  # only the first N windows; None: every window of the test set

    def label(self) -> str:
        """E.g. ``"512 tokens, all windows"`` or ``"512 tokens, first 40 windows"``."""
        return f"{self.seqlen} tokens, " + ("all windows" if self.max_windows is None
                                             else f"first {self.max_windows} windows")


class FinalResults(_Model):
    """Results of the finished model."""

    ppl: dict[str, float] = Field(default_factory=dict)  # dataset (e.g. "wikitext2") -> perplexity
    ppl_settings: PplSettings | None = None  # how ``ppl`` (and ``dense_ppl``) were measured; None: not recorded
    dense_ppl: dict[str, float] = Field(default_factory=dict)  # the unpruned model's (losa prune --compare-dense)
    zeroshot_items: str | None = None  # "all items" or "N items per task" (--limit); None: not recorded
    zeroshot: dict[str, TaskScore] = Field(default_factory=dict)
    sparsity: Fraction | None = None  # verified overall sparsity of the prunable linear layers
    layer_target_sparsity: list[Fraction] = Field(default_factory=list)
    layer_achieved_sparsity: list[Fraction] = Field(default_factory=list)

    def zeroshot_mean(self, metric: Literal["acc", "acc_norm"] = "acc") -> float | None:
        """Mean over tasks of ``metric`` (``acc_norm`` falls back to acc where a task has none)."""
        vals = [(s.acc_norm if metric == "acc_norm" and s.acc_norm is not None else s.acc)
                for s in self.zeroshot.values()]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None


class RunReport(_Model):
    """The whole ``report.json``."""

    schema_version: Literal[1] = 1
    meta: RunMeta
    steps: list[StepRecord] = Field(default_factory=list)
    results: FinalResults = Field(default_factory=FinalResults)

    def unfinished(self) -> str | None:
        """``"k/T steps"`` for a losa run that has not reached its end (no verified final sparsity), else None."""
        total = self.meta.config.get("steps")
        # a run writes report.json after each step; a merged model's losa.json (no steps) exists only at the end
        if (self.meta.finetune != "losa" or self.results.sparsity is not None or not isinstance(total, int)
                or not self.steps):
            return None
        return f"{len(self.steps)}/{total} steps"

    def layer_sparsity(self) -> tuple[list[float], list[float]]:
        """(target, achieved) per layer of the final model: the results, else the last step's."""
        r = self.results
        if r.layer_target_sparsity or r.layer_achieved_sparsity:
            return r.layer_target_sparsity, r.layer_achieved_sparsity
        for s in reversed(self.steps):
            if s.layer_target_sparsity or s.layer_achieved_sparsity:
                return s.layer_target_sparsity, s.layer_achieved_sparsity
        return [], []


def save_report(report: RunReport, run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/report.json`` atomically (for the LoSA runner)."""
    path = Path(run_dir) / REPORT_FILE
    atomic_write_json(path, report.model_dump(mode="json"))
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LosaError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); regenerate it") from None


def _validation_message(path: Path, err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(x) for x in first["loc"]) or "(top level)"
    return f"{path} does not match the report schema: {where}: {first['msg']}; regenerate it with this losa version"


def zeroshot_from_result(data: dict[str, Any]) -> dict[str, TaskScore]:
    """Task scores from a :func:`losa.eval.zeroshot.run_zeroshot` result (``zeroshot.json``)."""
    return {t: TaskScore(acc=v.get("acc"), acc_norm=v.get("acc_norm"), n=v.get("n"))
            for t, v in data.get("tasks", {}).items()}


def zeroshot_items(data: dict[str, Any]) -> str | None:
    """How many items per task a ``zeroshot.json`` scored: ``"all items"``, ``"N items per task"`` (``--limit``),
    or None when its config does not say."""
    config = data.get("config")
    if not isinstance(config, dict) or "limit" not in config:
        return None
    return "all items" if config["limit"] is None else f"{config['limit']} items per task"


def report_from_manifest(manifest: dict[str, Any], zeroshot: dict[str, Any] | None = None) -> RunReport:
    """A :class:`RunReport` from a checkpoint's ``losa.json``: a one-shot prune, or the merged model of a losa run."""
    recipe = manifest.get("recipe", {})
    sp = manifest.get("sparsity", {})
    nm = manifest.get("nm")
    if not nm and isinstance(recipe.get("nm"), str):  # the merged model of a losa run records the recipe's nm only
        from losa.pruning.masks import parse_nm

        try:
            nm = list(parse_nm(recipe["nm"]))
        except LosaError:
            nm = None
    mixed = recipe.get("nm_n") or recipe.get("mixed_nm")
    pattern = (f"{'mixed ' if mixed else ''}{nm[0]}:{nm[1]}" if nm
               else ("mixed N:M" if recipe.get("nm_n") else "unstructured"))
    # an N:M pattern sets the sparsity (the recipe's sparsity field then holds its unused default)
    target = (1 - nm[0] / nm[1] if nm
              else recipe.get("sparsity") if isinstance(recipe.get("sparsity"), (int, float)) else None)
    results = manifest.get("results", {})
    seqlen = results.get("eval_seqlen")
    final = FinalResults(
        ppl={k: float(v) for k, v in (results.get("ppl") or {}).items()},
        ppl_settings=(PplSettings(seqlen=seqlen, max_windows=results.get("max_windows"))
                      if isinstance(seqlen, int) and (results.get("ppl") or results.get("dense_ppl")) else None),
        dense_ppl={k: float(v) for k, v in (results.get("dense_ppl") or {}).items()},
        zeroshot_items=zeroshot_items(zeroshot) if zeroshot else None,
        zeroshot=zeroshot_from_result(zeroshot) if zeroshot else {
            t: TaskScore(**v) for t, v in (results.get("zeroshot") or {}).items()},
        sparsity=sp.get("overall"),
        layer_target_sparsity=list(manifest.get("layer_targets") or []),
        layer_achieved_sparsity=[row["sparsity"] for row in sp.get("layers", [])],
    )
    # the merged model of a losa run (its losa.json says so; older ones: a recipe with LoSA's schedule fields)
    losa_run = manifest.get("finetune") == "losa" or {"steps", "omega_first"} <= recipe.keys()
    meta = RunMeta(model=str(manifest.get("source_model", "unknown")), method=str(recipe.get("method", "unknown")),
                   finetune="losa" if losa_run else "none",
                   sparsity=target if target is not None else (sp.get("overall") or 0.0),
                   pattern=pattern, config=recipe, created=manifest.get("created"),
                   versions=manifest.get("versions", {}))
    return RunReport(meta=meta, results=final)


def load_run(run_dir: str | os.PathLike) -> RunReport:
    """Read a run directory: ``report.json`` if present, else ``losa.json`` (+ ``zeroshot.json``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        why = "is not a directory" if run_dir.exists() else "does not exist"
        raise LosaError(f"run directory {run_dir} {why}; pass the directory a losa run or prune wrote")
    zs_path = run_dir / ZEROSHOT_FILE
    zeroshot = _read_json(zs_path) if zs_path.is_file() else None
    report_path, manifest_path = run_dir / REPORT_FILE, run_dir / MANIFEST_FILE
    try:
        if report_path.is_file():
            report = RunReport.model_validate(_read_json(report_path))
            if zeroshot and not report.results.zeroshot:
                report.results.zeroshot = zeroshot_from_result(zeroshot)
                report.results.zeroshot_items = zeroshot_items(zeroshot)
            return report
        if manifest_path.is_file():
            return report_from_manifest(_read_json(manifest_path), zeroshot)
    except ValidationError as e:
        path = report_path if report_path.is_file() else manifest_path
        raise LosaError(_validation_message(path, e)) from None
    raise LosaError(f"{run_dir} has neither {REPORT_FILE} nor {MANIFEST_FILE}; pass the directory a losa run "
                    "or losa prune wrote")
