"""Issue 17's comparison in one table, with its targets checked from the measured rows.

Joins the rows the quality benchmarks wrote (it measures nothing itself):

* perplexity on the first 40 WikiText-2 windows: ``bench_losa.py`` JSONL files (training-free rows in
  ``quality70.jsonl``, fine-tuned rows at the 1024-example budget in ``quality70_ft1024.jsonl`` /
  ``quality50_ft1024.jsonl``, reruns of a variant (to save its model, on whatever CPU) in ``quality*_rerun.jsonl``);
* the full test set: ``bench_full_ppl.py`` rows (``full_ppl.jsonl``) of ``saved:DIR/<variant>@<target>`` models
  and ``dense``;
* zero-shot accuracy: ``bench_zeroshot_models.py`` rows (``zeroshot_models.jsonl``) whose path is a saved
  ``<variant>@<target>`` directory, or the ``smollm2-135m`` alias for dense.

A variant measured on several CPUs keeps every row (one table line each); a target compares rows from the same
CPU model where both sides have one, and says so where it cannot. A target is ``met``, ``NOT met`` or ``not measured yet`` (a row it needs is missing); nothing is filled in by
hand. Rerun after every results row that lands::

    python benchmarks/quality_summary.py            # writes benchmarks/results/quality_summary.md
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from _provenance import SMOLLM2
from _rows import read_jsonl

RESULTS = Path(__file__).resolve().parent / "results"
PPL_FILES = ("quality70.jsonl", "quality70_rerun.jsonl", "quality70_ft1024.jsonl", "quality70_ft1024_rerun.jsonl",
             "quality50_ft1024.jsonl", "quality50_ft1024_rerun.jsonl")
#: row order and labels of the table
VARIANTS = {"dense": "dense", "wanda": "Wanda", "sparsegpt": "SparseGPT", "wanda+owl": "Wanda + OWL",
            "wanda+atp": "Wanda + ATP", "wanda+rmi": "Wanda + RMI", "wanda+lora": "Wanda + dense LoRA",
            "wanda+masked-lora": "Wanda + masked LoRA", "losa-wanda": "LoSA(Wanda)",
            "losa-sparsegpt": "LoSA(SparseGPT)", "losa-no-lsr": "LoSA(Wanda) w/o LSR (uniform sparsity)",
            "losa-no-sra": "LoSA(Wanda) w/o SRA (uniform ranks)", "losa-no-dsa": "LoSA(Wanda) w/o DSA (one step)"}
BASELINES_70 = ("wanda+owl", "wanda+atp", "wanda+rmi", "wanda+masked-lora", "wanda+lora")
ABLATIONS = ("losa-no-lsr", "losa-no-sra", "losa-no-dsa")
GAP_TARGETS = {"0.7": 0.6, "0.5": 0.67}


def comparable(row: dict) -> bool:
    """A perplexity row of issue 17's protocol: 40 windows of 512 tokens, and for a fine-tuned variant the
    1024-example budget with the distillation loss (training-free rows have no fine-tuning flags)."""
    if row.get("eval_windows") != 40 or row.get("eval_seqlen") != 512:
        return False
    if not row.get("finetune_tokens"):
        return True
    cmd = row.get("command", "")
    return "--ft-examples 1024" in cmd and "--distill" in cmd and row.get("recon_error", "global") == "global"


def saved_key(path: str) -> tuple[str, str] | None:
    """``DIR/losa-wanda@0.7`` -> ``("losa-wanda", "0.7")``; the dense alias -> ``("dense", "0")``."""
    if path == "smollm2-135m":
        return "dense", "0"
    variant, sep, target = Path(path).name.partition("@")
    return (variant, target) if sep and variant in VARIANTS else None


def load_jsonl(path: Path) -> list[dict]:
    """The rows of ``path`` (:func:`_rows.read_jsonl`), or none when the file does not exist yet."""
    return read_jsonl(path) if path.is_file() else []


def collect(results: Path) -> dict[tuple[str, str], dict]:
    """(variant, target) -> {"ppl": row, "full": row, "zeroshot": row}, the latest row of each kind, and
    ``"ppl_rows"``: every comparable perplexity row of that variant, oldest first (one per CPU it ran on)."""
    table: dict[tuple[str, str], dict] = {}
    for name in PPL_FILES:
        for r in filter(comparable, load_jsonl(results / name)):
            rows = table.setdefault((r["variant"], r["target"]), {}).setdefault("ppl_rows", [])
            if all((o.get("date"), o["ppl"]) != (r.get("date"), r["ppl"]) for o in rows):
                rows.append(r)  # a row copied into two files (the shared dense / Wanda rows) counts once
    for entry in table.values():
        entry["ppl_rows"].sort(key=lambda r: r.get("date", ""))
        entry["ppl"] = entry["ppl_rows"][-1]
    for r in load_jsonl(results / "full_ppl.jsonl"):
        spec = r["spec"]
        key = ("dense", "0") if spec == "dense" else saved_key(spec[len("saved:"):]) if spec.startswith("saved:") else None
        if key:
            table.setdefault(key, {})["full"] = r
    for r in load_jsonl(results / "zeroshot_models.jsonl"):
        key = saved_key(r["path"])
        if key and r.get("limit") == 500:
            table.setdefault(key, {})["zeroshot"] = r
    return table


def gap_closed(ppl: float, wanda: float, dense: float) -> float:
    """Share of the Wanda-to-dense log-perplexity gap closed: (log W − log p) / (log W − log D)."""
    return (math.log(wanda) - math.log(ppl)) / (math.log(wanda) - math.log(dense))


def _row(table: dict, variant: str, target: str, kind: str, cpu: str | None = None) -> dict | None:
    """The latest row of that kind, or for perplexity the latest one measured on ``cpu`` where there is one."""
    entry = table.get((variant, target), {})
    same = [r for r in entry.get("ppl_rows", []) if r.get("cpu") == cpu] if kind == "ppl" and cpu else []
    return same[-1] if same else entry.get(kind)


def _get(table: dict, variant: str, target: str, kind: str, field: str, cpu: str | None = None) -> float | None:
    row = _row(table, variant, target, kind, cpu)
    if row is None:
        return None
    return row["mean"][field] if kind == "zeroshot" else row[field]


def _cpu(table: dict, variant: str, target: str, kind: str) -> str | None:
    row = _row(table, variant, target, kind)
    return row.get("cpu") if row else None


def _cpus(table: dict, kind: str, *keys: tuple[str, str], cpu: str | None = None) -> str:
    """`` (rows from different CPUs: A / B)`` when the rows compared were measured on different CPU models
    (each perplexity row chosen as in :func:`_row` with ``cpu``)."""
    cpus = [(_row(table, *k, kind, cpu) or {}).get("cpu", "?") for k in keys]
    return f" (rows from different CPUs: {' / '.join(cpus)})" if len(set(cpus)) > 1 else ""


def targets(table: dict) -> list[tuple[str, str, str]]:
    """(target, status, evidence) for each of issue 17's targets."""
    out = []
    for t, need in GAP_TARGETS.items():
        cpu = _cpu(table, "wanda", t, "ppl")
        losa, wanda = _get(table, "losa-wanda", t, "ppl", "ppl", cpu), _get(table, "wanda", t, "ppl", "ppl")
        dense = _get(table, "dense", "0", "ppl", "ppl", cpu)
        name = f"LoSA(Wanda) closes >= {need} of the Wanda-to-dense log-perplexity gap at {float(t):.0%}"
        if None in (losa, wanda, dense):
            out.append((name, "not measured yet", "needs dense, Wanda and LoSA(Wanda) rows"))
        else:
            g = gap_closed(losa, wanda, dense)
            out.append((name, "met" if g >= need else "NOT met", f"{g:.2f} (LoSA {losa:.2f}, Wanda {wanda:.2f}, "
                        f"dense {dense:.2f})" + _cpus(table, "ppl", ("losa-wanda", t), ("wanda", t), ("dense", "0"),
                                                       cpu=cpu)))
    for kind, field, better, label in (("ppl", "ppl", min, "perplexity"), ("zeroshot", "acc", max, "mean zero-shot acc"),
                                       ("zeroshot", "acc_norm", max, "mean zero-shot acc_norm")):
        for b in BASELINES_70:
            cpu = _cpu(table, b, "0.7", kind)
            losa, other = _get(table, "losa-wanda", "0.7", kind, field, cpu), _get(table, b, "0.7", kind, field)
            name = f"70 %: LoSA(Wanda) {label} {'below' if better is min else 'above'} {VARIANTS[b]}"
            if losa is None or other is None:
                out.append((name, "not measured yet", "needs both rows"))
                continue
            fmt = (lambda v: f"{v:.2f}") if kind == "ppl" else (lambda v: f"{100 * v:.1f} %")
            won = better(losa, other) == losa and losa != other
            out.append((name, "met" if won else "NOT met", f"{fmt(losa)} vs {fmt(other)}"
                        + _cpus(table, kind, ("losa-wanda", "0.7"), (b, "0.7"), cpu=cpu)))
    for a in ABLATIONS:
        cpu = _cpu(table, a, "0.7", "ppl")
        losa, off = _get(table, "losa-wanda", "0.7", "ppl", "ppl", cpu), _get(table, a, "0.7", "ppl", "ppl")
        name = f"70 %: switching off {a.removeprefix('losa-no-').upper()} costs perplexity"
        if losa is None or off is None:
            out.append((name, "not measured yet", "needs both rows"))
        else:
            out.append((name, "met" if off > losa else "NOT met", f"{off:.2f} without vs {losa:.2f} with"
                        + _cpus(table, "ppl", (a, "0.7"), ("losa-wanda", "0.7"), cpu=cpu)))
    return out


def render(table: dict) -> str:
    """The Markdown page: one row per (target, variant), then the target checks, then provenance."""
    lines = [f"# Issue 17: quality at the paper's metrics ({SMOLLM2})", "",
             "Rendered by `benchmarks/quality_summary.py` from the rows of the quality benchmarks (see its docstring); "
             "a blank cell has no row yet. Perplexity: WikiText-2 test, first 40 windows of 512 tokens, and the full "
             "test set where a saved model was evaluated. Fine-tuned variants: the same 1024 Alpaca examples, "
             "distillation loss. Zero-shot: mean over the eight lm-eval tasks, the seeded 500-item subsets of "
             "zeroshot.md. log-gap closed: (log Wanda − log ppl) / (log Wanda − log dense) at the same sparsity.", "",
             "| sparsity | variant | ppl (40 windows) | ppl (full test set) | log-gap closed | mean acc | mean acc_norm "
             "| merged sparsity | FT tokens | wall s | peak RSS MiB | CPU |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    order = {v: i for i, v in enumerate(VARIANTS)}
    keys = sorted(table, key=lambda k: (-float(k[1]) if k[0] != "dense" else -1.0, order.get(k[0], 99)))
    for v, t in keys:
        e = table[(v, t)]
        full, zs = e.get("full"), e.get("zeroshot")
        for p in e.get("ppl_rows") or [None]:
            latest = p is e.get("ppl")  # a saved model's rows (full set, zero-shot) belong to its latest run
            wanda = _get(table, "wanda", t, "ppl", "ppl", p and p.get("cpu"))
            dense = _get(table, "dense", "0", "ppl", "ppl", p and p.get("cpu"))
            gap = (f"{gap_closed(p['ppl'], wanda, dense):.2f}" if p and wanda and dense and v not in ("dense", "wanda")
                   else "")
            cells = ["dense" if v == "dense" else f"{float(t):.0%}", VARIANTS.get(v, v), f"{p['ppl']:.2f}" if p else "",
                     f"{full['ppl_full']:.2f}" if full and latest else "", gap,
                     f"{100 * zs['mean']['acc']:.1f}" if zs and latest else "",
                     f"{100 * zs['mean']['acc_norm']:.1f}" if zs and latest else ""]
            cells += ([f"{p['sparsity']:.4f}", str(p.get("finetune_tokens") or ""), str(p["wall_s"]),
                       str(p.get("peak_rss_mib", "")), p.get("cpu", "")] if p else [""] * 5)
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Targets", "", "| target | status | measured |", "|---|---|---|"]
    lines += [f"| {n} | {s} | {ev} |" for n, s, ev in targets(table)]
    lines += ["", "## Where each number comes from", ""]
    for v, t in keys:
        e = table[(v, t)]
        rows = [("ppl", r) for r in e.get("ppl_rows", [])] + [(k, e[k]) for k in ("full", "zeroshot") if k in e]
        for kind, row in rows:
            prov = row.get("provenance", row)  # bench_full_ppl.py nests it; the other benchmarks do not
            lines.append(f"- {VARIANTS.get(v, v)} @ {t}, {kind}: {prov.get('date', '?')}, {prov.get('commit', '?')}, "
                         f"{prov.get('cpu', row.get('machine', '?'))} ({prov.get('isa', '?')}), "
                         f"{prov.get('threads', '?')} threads; `{prov.get('command', ' '.join(row.get('argv', [])))}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--results", default=str(RESULTS), help="folder of the results JSONL files")
    ap.add_argument("--out", default=str(RESULTS / "quality_summary.md"))
    args = ap.parse_args(argv)
    text = render(collect(Path(args.results)))
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
