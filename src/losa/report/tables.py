"""``compare(run_dirs)``: several runs side by side in the layout of pruning papers.

Rows: Dense first, then for each (sparsity, pattern) the one-shot method, "+LoRA" and "+LoSA";
columns: WikiText-2 perplexity, each zero-shot task's accuracy (%) and their mean.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from losa.errors import LosaError
from losa.report.render import PPL_NAMES, TASK_NAMES, fmt_pct, fmt_ppl, ordered
from losa.report.schema import FinalResults, RunMeta, RunReport, load_run

_FT_ORDER = {"none": 0, "lora": 1, "losa": 2}
_METHOD_NAMES = {"magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT", "dense": "Dense"}


def row_label(report: RunReport) -> str:
    m = report.meta
    if _is_dense(report):
        return "Dense"
    base = _METHOD_NAMES.get(m.method, m.method)
    alloc = m.config.get("allocator")
    if m.finetune == "none" and alloc in ("atp", "owl", "rmi"):  # a one-shot prune's layer-wise sparsity
        base += f" + {alloc.upper()}"
    if ignore := m.config.get("ignore"):  # linears the prune or the LoSA run left dense: the model is less sparse
        base += f" ({','.join(map(str, ignore))} dense)"
    label, part = base + m.finetune_label, report.unfinished()
    if part is None:
        return label
    return label[:-1] + f"; unfinished: {part})" if label.endswith(")") else f"{label} (unfinished: {part})"


def sparsity_label(report: RunReport) -> str:
    m = report.meta
    if _is_dense(report):
        return "0%"
    label = m.pattern if m.pattern != "unstructured" else f"{100 * m.sparsity:.0f}%"
    if m.config.get("ignore") and report.results.sparsity is not None:  # the model is less sparse than its target
        return f"{100 * report.results.sparsity:.0f}% ({label} of the pruned linears)"
    return label


def _sort_key(report: RunReport) -> tuple:
    m = report.meta
    return (not _is_dense(report), m.sparsity, m.pattern, m.method, _FT_ORDER[m.finetune], m.model)


def _score(report: RunReport, task: str, metric: str) -> float | None:
    s = report.results.zeroshot.get(task)
    if s is None:
        return None
    return s.acc_norm if metric == "acc_norm" and s.acc_norm is not None else s.acc


def _is_dense(report: RunReport) -> bool:
    return report.meta.method == "dense" or report.meta.sparsity == 0


def _with_dense_rows(entries: list[tuple[Path, RunReport]]) -> list[tuple[Path | str, RunReport]]:
    """``entries`` plus a Dense row from each run's ``dense_ppl`` (``losa prune --compare-dense``) for a model
    and perplexity setting that no dense run among ``entries`` covers (one row per model and setting)."""
    def key(r: RunReport) -> tuple[str, str | None]:
        return r.meta.model, None if r.results.ppl_settings is None else r.results.ppl_settings.label()

    covered = {key(r) for _, r in entries if _is_dense(r)}
    out: list[tuple[Path | str, RunReport]] = list(entries)
    for d, r in entries:
        if r.results.dense_ppl and key(r) not in covered:
            covered.add(key(r))
            dense = RunReport(meta=RunMeta(model=r.meta.model, method="dense"),
                              results=FinalResults(ppl=dict(r.results.dense_ppl),
                                                   ppl_settings=r.results.ppl_settings))
            out.append((f"{d.name} (--compare-dense)", dense))
    return out


def compare(run_dirs: Sequence[str | os.PathLike], metric: str = "acc") -> tuple[str, str]:
    """Markdown and CSV tables of ``run_dirs`` in the layout of pruning papers.

    Rows: Dense first (a dense run, else the dense perplexity a run recorded with ``--compare-dense``), then by
    sparsity and pattern the one-shot method, "+ LoRA" and "+ LoSA". Columns: WikiText-2 perplexity (else the
    first dataset measured), each zero-shot task's accuracy (%) and their mean. A "Model" column is added when the
    runs are of different models, a "Run" column (the directory's name) when two rows would read the same, a
    "ppl windows" column when the perplexities were measured with different windows and a "zero-shot items" column
    when the accuracies were measured on different items (``--limit``; a warning then says that they are not
    comparable).

    Args:
        run_dirs: directories written by ``losa run`` (report.json) or ``losa prune`` (losa.json).
        metric: zero-shot metric: ``acc``, or ``acc_norm`` (acc where a task has none).
    Returns:
        (markdown table, CSV text) with the same cells.
    Raises:
        LosaError: no directory, an unknown metric, a directory that is not a run.
    Warns:
        UserWarning: a directory given twice (compared once), ``acc_norm`` without zero-shot results, accuracies
            measured on different items.
    """
    if not run_dirs:
        raise LosaError("compare needs at least one run directory")
    if metric not in ("acc", "acc_norm"):
        raise LosaError(f"unknown metric {metric!r}; use acc or acc_norm")
    resolved = [Path(d).resolve() for d in run_dirs]
    unique = list(dict.fromkeys(resolved))
    if len(unique) < len(run_dirs):  # a shell glob and a name, or a typo: one row per run
        twice = sum(resolved.count(u) > 1 for u in unique)
        warnings.warn(f"{twice} run director{'y' if twice == 1 else 'ies'} given more than once; each run is one "
                      "row", stacklevel=2)
        run_dirs = [next(d for d in run_dirs if Path(d).resolve() == u) for u in unique]
    entries = _with_dense_rows([(Path(d), load_run(d)) for d in run_dirs])
    entries.sort(key=lambda e: _sort_key(e[1]))
    reports = [r for _, r in entries]
    ppl_keys = ordered(sorted({d for r in reports for d in r.results.ppl}), PPL_NAMES)
    ppl_keys = [d for d in ppl_keys if d == "wikitext2"] or ppl_keys[:1]
    tasks = ordered(sorted({t for r in reports for t in r.results.zeroshot}), TASK_NAMES)
    if metric != "acc" and not tasks:
        warnings.warn(f"metric {metric} chooses the zero-shot accuracy, and no run has zero-shot results "
                      "(losa eval zeroshot RUN_DIR adds them)", stacklevel=2)
    models = {r.meta.model for r in reports}
    labels = [(r.meta.model, sparsity_label(r), row_label(r)) for r in reports]
    # settings that are not recorded (reports from before they were) are unknown, not different
    windows = {r.results.ppl_settings.label() for r in reports
               if r.results.ppl_settings is not None and any(d in r.results.ppl for d in ppl_keys)}
    items = {r.results.zeroshot_items for r in reports if r.results.zeroshot and r.results.zeroshot_items}
    extra = [("Model", len(models) > 1), ("Run", len(set(labels)) < len(labels)), ("ppl windows", len(windows) > 1),
             ("zero-shot items", len(items) > 1)]
    if len(items) > 1:
        warnings.warn(f"the zero-shot accuracies were measured on different items ({'; '.join(sorted(items))}): "
                      "they are not comparable; rerun losa eval zeroshot with the same --limit (none: all items)",
                      stacklevel=2)
    if len(windows) > 1:
        warnings.warn(f"the perplexities were measured with different windows ({'; '.join(sorted(windows))}): "
                      "they are not comparable; rerun losa prune / losa run with the same --eval-seqlen and "
                      "--max-windows", stacklevel=2)
    header = [name for name, shown in extra[:2] if shown] + ["Sparsity", "Method"]
    header += [f"{PPL_NAMES.get(d, d)} ppl" for d in ppl_keys] + ["ppl windows"] * extra[2][1]
    header += [*[TASK_NAMES.get(t, t) for t in tasks], *["Mean"] * bool(tasks)] + ["zero-shot items"] * extra[3][1]
    rows: list[list[str]] = []
    for d, r in entries:
        # the mean covers only the columns shown, and only when the run has all of them
        vals = [_score(r, t, metric) for t in tasks]
        mean = sum(vals) / len(vals) if vals and all(v is not None for v in vals) else None  # type: ignore[arg-type]
        settings = r.results.ppl_settings
        row = [r.meta.model] * extra[0][1] + [d.name if isinstance(d, Path) else d] * extra[1][1]
        row += [sparsity_label(r), row_label(r), *[fmt_ppl(r.results.ppl.get(k)) for k in ppl_keys]]
        if extra[2][1]:
            row.append("-" if not any(k in r.results.ppl for k in ppl_keys)
                       else "not recorded" if settings is None else settings.label())
        row += [*[fmt_pct(v) for v in vals], *[fmt_pct(mean)] * bool(tasks)]  # no Mean without zero-shot tasks
        if extra[3][1]:
            row.append(r.results.zeroshot_items or ("-" if not r.results.zeroshot else "not recorded"))
        rows.append(row)
    numeric = {*(f"{PPL_NAMES.get(d, d)} ppl" for d in ppl_keys), *(TASK_NAMES.get(t, t) for t in tasks), "Mean"}
    md = ["| " + " | ".join(header) + " |", "|" + "".join("---:|" if h in numeric else "---|" for h in header)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return "\n".join(md) + "\n", buf.getvalue()
