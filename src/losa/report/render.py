"""``write_report(run_dir)``: ``report.md`` (PNG files beside it) and a self-contained ``report.html``.

The document is built once as a list of blocks (heading, paragraph, table, image) and rendered to
both formats, so the markdown and the HTML always show the same numbers. HTML images are embedded
as base64 data URIs; the markdown links the PNGs in ``report_files/``.
"""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

from losa.report.plots import PLOTS
from losa.report.schema import RunReport, load_run
from losa.utils.io import atomic_write_text

ASSETS_DIR = "report_files"

#: display names of datasets and tasks, in the papers' column order
PPL_NAMES = {"wikitext2": "WikiText-2", "c4": "C4", "ptb": "PTB"}
TASK_NAMES = {"boolq": "BoolQ", "rte": "RTE", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
              "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA", "piqa": "PIQA"}


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    title: str
    path: Path


Block = Heading | Para | Table | Image


def fmt_ppl(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def fmt_pct(x: float | None) -> str:
    """A fraction as a percentage with two decimals (the unit of the papers' tables)."""
    return "-" if x is None else f"{100 * x:.2f}"


def ordered(names: list[str], order: dict[str, str]) -> list[str]:
    known = [n for n in order if n in names]
    return known + sorted(n for n in names if n not in order)


def results_table(report: RunReport, metric: str = "acc") -> Table | None:
    """One row: perplexity per dataset, zero-shot ``metric`` per task (in %), their mean, sparsity."""
    r = report.results
    ppl_keys = ordered(list(r.ppl), PPL_NAMES)
    tasks = ordered(list(r.zeroshot), TASK_NAMES)
    if not ppl_keys and not tasks:
        return None
    header = [f"{PPL_NAMES.get(d, d)} ppl" for d in ppl_keys] + [TASK_NAMES.get(t, t) for t in tasks]
    row = [fmt_ppl(r.ppl[d]) for d in ppl_keys]
    row += [fmt_pct(getattr(r.zeroshot[t], metric) if getattr(r.zeroshot[t], metric) is not None
                    else r.zeroshot[t].acc) for t in tasks]
    if tasks:
        header.append("Mean")
        row.append(fmt_pct(r.zeroshot_mean(metric)))  # type: ignore[arg-type]
    header.append("Sparsity (%)")
    row.append(fmt_pct(r.sparsity))
    if not r.dense_ppl:
        return Table(header, [row])
    # losa prune --compare-dense: the unpruned model's perplexity, measured the same way, in a row above
    dense = [fmt_ppl(r.dense_ppl.get(d)) for d in ppl_keys] + ["-"] * (len(header) - len(ppl_keys) - 1) + ["0.00"]
    return Table(["Model", *header], [["dense", *dense], ["pruned", *row]])


def _config_value(v: object) -> str:
    """A recipe value as the report shows it: "-" for unset, nested settings as compact JSON."""
    if v is None:
        return "-"
    return json.dumps(v, separators=(", ", ": ")) if isinstance(v, (dict, list)) else str(v)


def _results_caption(report: RunReport) -> str:
    """What the results table shows: only the kinds of result it has, and how the perplexity was measured."""
    r = report.results
    parts = []
    if r.ppl:
        how = f", {r.ppl_settings.label()}" if r.ppl_settings is not None else ""
        parts.append(f"Perplexity (lower is better{how})")
    if r.zeroshot:
        items = f", {r.zeroshot_items}" if r.zeroshot_items else ""
        parts += [f"zero-shot accuracy in % (lm-eval acc{items})", "Mean is the average over the listed tasks"]
    parts.append("Sparsity is the verified overall sparsity")
    return "; ".join(parts) + "."


def steps_table(report: RunReport) -> Table | None:
    if not report.steps:
        return None
    datasets = ordered(sorted({d for s in report.steps for d in s.ppl}), PPL_NAMES)
    header = ["step", "target S_t (%)", "achieved, layer mean (%)", *[f"{PPL_NAMES.get(d, d)} ppl" for d in datasets],
              "mean rank", "final train loss", "wall time (s)"]
    rows = []
    for s in report.steps:
        ach = s.layer_achieved_sparsity
        rows.append([str(s.step), fmt_pct(s.target_sparsity), fmt_pct(sum(ach) / len(ach) if ach else None),
                     *[fmt_ppl(s.ppl.get(d)) for d in datasets],
                     f"{sum(s.ranks) / len(s.ranks):.2f}" if s.ranks else "-",
                     f"{s.train_loss[-1]:.4f}" if s.train_loss else "-",
                     f"{s.wall_time_s:.1f}" if s.wall_time_s is not None else "-"])
    return Table(header, rows)


def build_blocks(report: RunReport, assets: Path) -> list[Block]:
    m = report.meta
    label = m.finetune_label
    kind = "run" if report.steps or m.finetune != "none" else "prune" if m.method != "dense" else "evaluation"
    blocks: list[Block] = [
        Heading(f"losa {kind} report: {m.model}", 1),
        Para(f"Method: {m.method}{label}; target sparsity {fmt_pct(m.sparsity)}% ({m.pattern})"
             + (f"; created {m.created}" if m.created else "") + "."),
        *[Para(f"Warning: {note}.") for note in m.notes],
    ]
    if ignore := m.config.get("ignore"):
        achieved = report.results.sparsity
        blocks.append(Para(f"Linears left dense (ignore {', '.join(map(str, ignore))}): the targets apply to the "
                           "pruned linears, the achieved sparsities count every linear"
                           + (f" (the whole model: {fmt_pct(achieved)}%)" if achieved is not None else "") + "."))
    part = report.unfinished()
    if part:
        blocks.append(Para(f"Unfinished: {part} are saved; run the same `losa run` command with --resume to "
                           "continue (the model is merged, verified and evaluated at the end)."))
    table = results_table(report)
    blocks.append(Heading("Results"))
    if table:
        blocks += [table, Para(_results_caption(report))]
    else:
        blocks.append(Para("No perplexity or zero-shot results recorded."))
    st = steps_table(report)
    if st:
        blocks += [Heading("Steps"), st]
    for stem, (title, fn) in PLOTS.items():
        path = fn(report, assets / f"{stem}.png")
        if path is not None:
            blocks += [Heading(title), Image(title, path)]
    if m.config:
        rows = [[str(k), _config_value(v)] for k, v in sorted(m.config.items())]
        blocks += [Heading("Configuration"), Table(["key", "value"], rows)]
    return blocks


def to_markdown(blocks: list[Block], base: Path) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Table):
            out.append("| " + " | ".join(b.header) + " |")
            out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(b.header))) + "|")
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in b.rows]
        else:
            out.append(f"![{b.title}]({Path(os.path.relpath(b.path, base)).as_posix()})")
        out.append("")
    return "\n".join(out)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#111}"
        "table{border-collapse:collapse;margin:0.5rem 0}th,td{border:1px solid #bbb;padding:0.25rem 0.6rem}"
        "td{text-align:right}td:first-child{text-align:left}th{background:#eee}img{max-width:100%}")


def to_html(blocks: list[Block]) -> str:
    body: list[str] = []
    title = "losa run report"
    for b in blocks:
        if isinstance(b, Heading):
            if b.level == 1:
                title = b.text
            body.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{html.escape(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        else:
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(b.title)}" src="data:image/png;base64,{data}"></figure>')
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Render ``run_dir``'s report.json / losa.json into ``report.md`` and ``report.html`` (in ``out_dir``,
    default ``run_dir``); figures without data are left out. Returns (md_path, html_path)."""
    report = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    blocks = build_blocks(report, out / ASSETS_DIR)
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_text(md_path, to_markdown(blocks, out))
    atomic_write_text(html_path, to_html(blocks))
    return md_path, html_path
