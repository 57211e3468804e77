"""Zero-shot accuracy of SmolLM2-135M, dense and after 50 % Wanda, through lm-eval on the offline tasks.

Usage (from the repository root, with LOSA_DATA_DIR or --data-dir pointing at the offline data)::

    python benchmarks/bench_zeroshot.py --limit 500 --out benchmarks/results/zeroshot

``--limit N`` evaluates a fixed seeded random subset of N documents per task (all documents for
tasks with fewer, e.g. RTE 277); leave it out to evaluate every document. Writes ``<out>.json``
(all numbers, subset indices, timings) and ``<out>.md`` (table, command, settings, machine, date).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

import losa
from losa.eval.zeroshot import DEFAULT_TASKS, run_zeroshot
from losa.utils.io import atomic_write_json, atomic_write_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--limit", type=int, default=None, help="seeded random subset per task (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--data-dir", default=os.environ.get("LOSA_DATA_DIR"))
    p.add_argument("--out", default="benchmarks/results/zeroshot", help="output path without extension")
    p.add_argument("--eval-dtype", default="bfloat16", choices=("float32", "bfloat16"),
                   help="weights dtype during evaluation (log-softmax stays float32; pruning is always float32)")
    p.add_argument("--note", default="", help="a remark printed under the table (e.g. why a limit was used)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def table(runs: dict[str, dict], tasks: list[str]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    head = "| model | " + " | ".join(tasks) + " | mean |"
    rows = [head, "|---|" + "---:|" * (len(tasks) + 1)]
    for metric in ("acc", "acc_norm"):
        for name, r in runs.items():
            cells = [pct(r["tasks"][t][metric]) for t in tasks]
            rows.append(f"| {name} ({metric}) | " + " | ".join(cells) + f" | {pct(r['mean'][metric])} |")
    ns = [str(runs[next(iter(runs))]["tasks"][t]["n"]) for t in tasks]
    rows.append("| items evaluated | " + " | ".join(ns) + " | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    t_all = time.perf_counter()
    model, tok = losa.load_model(args.model)
    common = dict(tasks=tasks, limit=args.limit, data_dir=args.data_dir, batch_size=args.batch_size,
                  seed=args.seed, offline=True, quiet=args.quiet)
    eval_dtype = getattr(torch, args.eval_dtype)
    out = Path(args.out)

    def evaluate() -> dict:
        copy_ = copy.deepcopy(model).to(eval_dtype) if eval_dtype != torch.float32 else model
        return run_zeroshot(copy_, tok, **common)

    runs: dict[str, dict] = {}
    runs["dense"] = evaluate()
    atomic_write_json(out.with_suffix(".partial.json"), {"runs": runs, "command": command})
    print(f"dense: mean acc {runs['dense']['mean']['acc']:.4f} in {runs['dense']['config']['wall_time_s']:.0f}s",
          flush=True)
    t = time.perf_counter()
    cfg = losa.PruneConfig(method="wanda", sparsity=args.sparsity, calib="c4", nsamples=args.nsamples,
                           seqlen=args.seqlen, data_dir=args.data_dir)
    prune_report = losa.prune(model, tok, cfg, progress=not args.quiet)
    prune_s = time.perf_counter() - t
    name = f"wanda {round(100 * args.sparsity)}%"
    runs[name] = evaluate()
    print(f"{name}: mean acc {runs[name]['mean']['acc']:.4f} in {runs[name]['config']['wall_time_s']:.0f}s", flush=True)
    total_s = time.perf_counter() - t_all

    out.with_suffix(".partial.json").unlink(missing_ok=True)
    meta = {
        "command": command, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
                   f"{torch.get_num_threads()}, {platform.platform()}",
        "model": args.model, "eval_dtype": args.eval_dtype, "tasks": tasks, "limit": args.limit, "seed": args.seed,
        "batch_size": args.batch_size, "data_dir": args.data_dir,
        "prune": {"recipe": prune_report.recipe, "overall_sparsity": prune_report.sparsity.overall,
                  "prune_s": round(prune_s, 1)},
        "wall_time_s": {"total": round(total_s, 1), **{k: r["config"]["wall_time_s"] for k, r in runs.items()}},
    }
    atomic_write_json(out.with_suffix(".json"), {"meta": meta, "runs": runs})
    subset = (f"a fixed seeded random subset of {args.limit} documents per task (all documents where a task has "
              f"fewer), drawn with `random.Random(f'{args.seed}:<task>')`; the indices are in the JSON file"
              if args.limit else "every document of each task")
    md = f"""# Zero-shot accuracy: {args.model}, dense vs {name} (lm-eval {runs['dense']['config']['lm_eval_version']})

Accuracy in %, 0-shot, lm-evaluation-harness scoring through `losa eval zeroshot`'s offline tasks
(prompts identical to lm-eval's tasks of the same names; data from the offline files described in
`shared/data/README.md`: BoolQ/RTE/WinoGrande/PIQA/HellaSwag validation, ARC/OpenBookQA test).
Items: {subset}.

{table(runs, tasks)}
{chr(10) + args.note + chr(10) if args.note else ""}
"mean" averages acc over the tasks; the acc_norm row's mean uses acc_norm where lm-eval defines it
and acc elsewhere (BoolQ, RTE, WinoGrande have no acc_norm).

- Pruning: Wanda, unstructured {args.sparsity:.0%} per linear layer, calibration C4 train
  {args.nsamples} x {args.seqlen} tokens (seed 0); verified overall sparsity
  {prune_report['sparsity']['overall']:.4f}; pruning took {prune_s:.0f} s.
- Wall time: dense eval {runs['dense']['config']['wall_time_s']:.0f} s, pruned eval
  {runs[name]['config']['wall_time_s']:.0f} s, whole script {total_s:.0f} s.
- Settings: evaluation with {args.eval_dtype} weights (log-softmax in float32; pruning in float32),
  batch size {args.batch_size}, seed {args.seed}.
- Machine: {meta['machine']} (CPU shared with other jobs while this ran).
- Date: {meta['date']}
- Command: `{command}`
"""
    atomic_write_text(out.with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
