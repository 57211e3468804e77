"""WikiText-2 perplexity on the FULL test set (seqlen 512) for the dense model, one-shot pruned and saved models.

The prune grid (bench_prune.py) evaluates the first 40 windows; this script evaluates every window once,
with the same calibration (16 x 512 C4-train windows, seed 0) and the same pruning code. One evaluation
pass yields both numbers: the first-40-window perplexity and the full-set perplexity (the windows of the
full set are the same windows, continued). Each spec runs in this process; run several processes side by
side to use more cores.

    python benchmarks/bench_full_ppl.py dense wanda:0.5 sparsegpt:0.5 --out benchmarks/results/full_ppl.jsonl
    python benchmarks/bench_full_ppl.py saved:/work/models17/losa-wanda@0.7   # a bench_losa.py --save-dir model
    python benchmarks/bench_full_ppl.py --render-only --out benchmarks/results/full_ppl.jsonl

Rows from 2026-12-01 on carry per-row provenance (date, commit, command, threads, CPU model and ISA, model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PREFIX = 40
sys.path.insert(0, str(HERE))
from _provenance import SMOLLM2, provenance  # noqa: E402
from _rows import append_jsonl, read_jsonl  # noqa: E402

from losa.utils.io import atomic_write_text  # noqa: E402


def run_spec(spec: str, args) -> dict:
    import losa
    from losa.data.sources import eval_text
    from losa.eval.ppl import perplexity_from_ids

    saved = spec.startswith("saved:")
    model, tok = losa.load_model(spec.partition(":")[2] if saved else args.model)
    row: dict = {"spec": spec, "threads": torch.get_num_threads()}
    if saved:
        from losa.export.verify import sparsity_report

        row["sparsity"] = round(sparsity_report(model).overall, 6)
    elif spec != "dense":
        method, _, target = spec.partition(":")
        calib = losa.data.get_calibration(tok, "c4", args.nsamples, args.seqlen, seed=0, data_dir=args.data_dir)
        cfg = {"method": method, "nsamples": args.nsamples, "seqlen": args.seqlen}
        cfg.update({"nm": target} if ":" in target else {"sparsity": float(target)})
        t = time.perf_counter()
        losa.prune(model, tok, losa.PruneConfig(**cfg), calib_ids=calib, progress=False)
        row["prune_s"] = round(time.perf_counter() - t, 1)
    ids = tok(eval_text("wikitext2", args.data_dir), return_tensors="pt").input_ids[0]
    t = time.perf_counter()
    head = perplexity_from_ids(model, ids[: PREFIX * 512], 512, desc=f"{spec} first {PREFIX}")
    rest = perplexity_from_ids(model, ids[PREFIX * 512:], 512, desc=f"{spec} rest")
    tokens = head.tokens + rest.tokens
    nll = (head.nll * head.tokens + rest.nll * rest.tokens) / tokens
    row.update({"ppl_first40": head.ppl, "ppl_full": math.exp(nll), "windows": head.windows + rest.windows,
                "tokens": tokens, "eval_s": round(time.perf_counter() - t, 1)})
    return row


def render(rows: list[dict], out: Path) -> None:
    lines = [
        "# WikiText-2 perplexity on the full test set (SmolLM2-135M, seqlen 512)",
        "",
        f"Command: `{' '.join(['python', *rows[0].get('argv', ['benchmarks/bench_full_ppl.py'])])}` "
        "(one process per spec, run side by side)  ",
        f"Date: {rows[0].get('date', '?')}. Machine: {rows[0].get('machine', '?')}. float32 weights and activations.",
        "",
        "- Pruning: losa one-shot, calibration 16 x 512 C4-train windows, seed 0 (as bench_prune.py).",
        f"- Evaluation: the joined WikiText-2 raw test split, non-overlapping 512-token windows, every window; "
        f"'first {PREFIX}' is the prefix the prune grid (prune*.md) reports, from the same pass.",
        "",
        f"| model | ppl first {PREFIX} windows | ppl full test set | windows | predicted tokens | eval s | threads |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['spec']} | {r['ppl_first40']:.2f} | {r['ppl_full']:.2f} | {r['windows']} | "
                     f"{r['tokens']} | {r['eval_s']:.0f} | {r['threads']} |")
    prov = [r for r in rows if "provenance" in r]
    if prov:
        lines += ["", "Provenance of the rows that carry it (date, commit, threads, CPU / ISA, model, command):", ""]
        for r in prov:
            v = r["provenance"]
            lines.append(f"- {r['spec']}: {v['date']}, {v['commit']}, {v['threads']} threads, {v['cpu']} ({v['isa']}), "
                         f"{v['model']}; `{v['command']}`")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="*", help="dense, METHOD:TARGET such as wanda:0.5, sparsegpt:0.7, wanda:2:4, or saved:DIR (a saved model, "
                         "evaluated as it is)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=os.environ.get("LOSA_DATA_DIR", "../shared/data"))
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default=str(HERE / "results" / "full_ppl.jsonl"))
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.render_only:
        for spec in args.specs:
            row = run_spec(spec, args)
            row.update({"date": time.strftime("%Y-%m-%d"), "argv": sys.argv,
                        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"})
            row["provenance"] = provenance(torch.get_num_threads(), SMOLLM2 if not spec.startswith("saved:") else
                                           f"{SMOLLM2}, as saved at {spec.partition(':')[2]}")
            print(json.dumps(row), flush=True)
            append_jsonl(out, [row])  # one line per spec; side-by-side processes append whole lines
    rows = read_jsonl(out)
    render(rows, out)


if __name__ == "__main__":
    main()
