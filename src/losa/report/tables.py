"""``compare(run_dirs)``: several runs side by side in the layout of pruning papers.

Rows: Dense first, then for each (sparsity, pattern) the one-shot method, "+LoRA" and "+LoSA";
columns: WikiText-2 perplexity, each zero-shot task's accuracy (%) and their mean.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence

from losa.errors import LosaError
from losa.report.render import PPL_NAMES, TASK_NAMES, fmt_pct, fmt_ppl, ordered
from losa.report.schema import RunReport, load_run

_FT_ORDER = {"none": 0, "lora": 1, "losa": 2}
_METHOD_NAMES = {"magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT", "dense": "Dense"}


def row_label(report: RunReport) -> str:
    m = report.meta
    if m.method == "dense" or m.sparsity == 0:
        return "Dense"
    base = _METHOD_NAMES.get(m.method, m.method)
    return base + m.finetune_label


def sparsity_label(report: RunReport) -> str:
    m = report.meta
    if m.method == "dense" or m.sparsity == 0:
        return "0%"
    return m.pattern if m.pattern != "unstructured" else f"{100 * m.sparsity:.0f}%"


def _sort_key(report: RunReport) -> tuple:
    m = report.meta
    dense = m.method == "dense" or m.sparsity == 0
    return (not dense, m.sparsity, m.pattern, m.method, _FT_ORDER[m.finetune])


def _score(report: RunReport, task: str, metric: str) -> float | None:
    s = report.results.zeroshot.get(task)
    if s is None:
        return None
    return s.acc_norm if metric == "acc_norm" and s.acc_norm is not None else s.acc


def compare(run_dirs: Sequence[str | os.PathLike], metric: str = "acc") -> tuple[str, str]:
    """Markdown and CSV tables of ``run_dirs`` (zero-shot ``metric``: acc, or acc_norm where defined)."""
    if not run_dirs:
        raise LosaError("compare needs at least one run directory")
    if metric not in ("acc", "acc_norm"):
        raise LosaError(f"unknown metric {metric!r}; use acc or acc_norm")
    reports = sorted((load_run(d) for d in run_dirs), key=_sort_key)
    ppl_keys = ordered(sorted({d for r in reports for d in r.results.ppl}), PPL_NAMES)
    ppl_keys = [d for d in ppl_keys if d == "wikitext2"] or ppl_keys[:1]
    tasks = ordered(sorted({t for r in reports for t in r.results.zeroshot}), TASK_NAMES)
    header = ["Sparsity", "Method", *[f"{PPL_NAMES.get(d, d)} ppl" for d in ppl_keys],
              *[TASK_NAMES.get(t, t) for t in tasks], "Mean"]
    rows: list[list[str]] = []
    for r in reports:
        # the mean covers only the columns shown, and only when the run has all of them
        vals = [_score(r, t, metric) for t in tasks]
        mean = sum(vals) / len(vals) if vals and all(v is not None for v in vals) else None  # type: ignore[arg-type]
        rows.append([sparsity_label(r), row_label(r), *[fmt_ppl(r.results.ppl.get(d)) for d in ppl_keys],
                     *[fmt_pct(v) for v in vals], fmt_pct(mean)])
    md = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return "\n".join(md) + "\n", buf.getvalue()
