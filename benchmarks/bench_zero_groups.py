"""All-zero groups of 8 inputs in a pruned real model's linears, against random masks of the same sparsity.

    python benchmarks/bench_zero_groups.py --data-dir ../shared/data          # Wanda 50 % and 70 %, SmolLM2

The AVX2 row loop spends the same vector work on every group of 8 inputs of a weight row, zero or not
(results/avx2_variants.md). A loop or layout that skipped all-zero groups could only help if pruned models had
many more of them than the fraction ``s^8`` that random masks at sparsity ``s`` have. This counts them in the
decoder-layer linears of SmolLM2 pruned by Wanda (calibration windows from C4). Rows go to
benchmarks/results/zero_groups.jsonl with the provenance fields; zero_groups.md is rendered from all rows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import torch
from _provenance import provenance
from _rows import read_jsonl, run_sections, save_rows

import losa
from losa.models.registry import pruned_weights

OUT = Path(__file__).parent / "results" / "zero_groups.jsonl"


def zero_group_fraction(model: torch.nn.Module, group: int = 8) -> tuple[float, int]:
    """The fraction of all-zero runs of ``group`` consecutive inputs over every pruned weight row, and their count."""
    zero = total = 0
    for _, _, w in pruned_weights(model):
        g = (w != 0).reshape(w.shape[0], -1, group).any(-1)  # [out, in / group]: True where a weight is kept
        zero, total = zero + int((~g).sum()), total + g.numel()
    return zero / total, total


def render(jsonl: Path, md: Path) -> None:
    lines = ["# All-zero groups of 8 inputs in pruned SmolLM2 linears (benchmarks/bench_zero_groups.py)", "",
             "`random s^8` = the fraction a random mask at the same sparsity has; `x random` = measured / that.", ""]
    for title, where, rows in run_sections(read_jsonl(jsonl)):
        lines += [title, "", where + ", model " + rows[0]["model"] + ".", "",
                  "| method | sparsity | calibration | threads | groups | all-zero | random s^8 | x random |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['method']} | {r['sparsity']:.0%} | {r['calibration']} | {r['threads']} | {r['groups']:,} | "
                         f"{r['zero_fraction']:.4f} | {r['random_fraction']:.4f} | {r['ratio']:.2f}x |")
        lines.append("")
    md.write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    run = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for s in (float(x) for x in args.sparsities.split(",")):
        model, tok = losa.load_model("smollm2-135m")
        losa.prune(model, tok, losa.PruneConfig(method="wanda", sparsity=s, calib="c4", nsamples=args.nsamples,
                                                seqlen=args.seqlen, data_dir=args.data_dir))
        frac, groups = zero_group_fraction(model)
        rows.append({"run": run, **provenance(torch.get_num_threads(), argv=sys.argv), "method": "wanda",
                     "sparsity": s, "calibration": f"c4 {args.nsamples}x{args.seqlen}", "groups": groups,
                     "zero_fraction": frac, "random_fraction": s ** 8, "ratio": frac / s ** 8})
        print(f"wanda {s:.0%}: {frac:.4f} of {groups:,} groups all zero (random masks: {s ** 8:.4f})")
    save_rows(OUT, rows, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
