"""`losa run` on SmolLM2-135M in one process vs two (torchrun, gloo): same result, honest wall time.

Both runs see the same global batch: two processes with ``--batch-size B`` each against one process with
``--batch-size B --grad-accum 2``. On this 2-core CPU the comparison is a correctness check (same masks,
same ranks, merged weights within a tolerance), not a speed claim; the wall times are reported as measured.
Every process uses ``--threads-1proc`` threads in the one-process run and one thread in the two-process
run: with one thread each (the default), the calibration arithmetic is the same in both runs, so any
difference comes from data-parallel training (gradients all-reduced instead of accumulated); with more
threads, a different summation order can already move weights at the pruning threshold.

    python benchmarks/bench_multiprocess.py --data-dir ../shared/data

Rows go to ``benchmarks/results/multiprocess.jsonl`` (with provenance) and the table to the ``.md`` next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _provenance import SMOLLM2, provenance
from _rows import append_jsonl, read_jsonl

from losa.utils.io import atomic_write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BIN = Path(sys.executable).parent


def _losa_args(args, out: Path) -> list[str]:
    data = Path(args.data_dir)
    return ["run", "smollm2-135m", "--method", "wanda", "--sparsity", str(args.sparsity), "--steps", str(args.steps),
            "--calib", "c4", "--data-dir", str(data), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
            "--recon-nsamples", "2", "--finetune-data", str(data / "alpaca" / "alpaca_data_random_9k.json"),
            "--max-examples", str(args.ft_examples), "--max-length", "128", "--batch-size", str(args.batch_size),
            "--eval", "none", "--quiet", "--out", str(out)]


def _timed(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} … failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def compare(one: Path, two: Path) -> dict:
    """Masks (zero patterns), ranks and merged weights of two run directories."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(one / "model" / "model.safetensors")), load_file(str(two / "model" / "model.safetensors"))
    mask_diff = sum(int(((a[k] == 0) != (b[k] == 0)).sum()) for k in a if a[k].ndim == 2)
    max_abs = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (one, two))
    ranks = [s.get("ranks") for s in ra.get("steps", [])] == [s.get("ranks") for s in rb.get("steps", [])]
    return {"mask_entries_differing": mask_diff, "max_abs_weight_diff": max_abs, "same_ranks": ranks,
            "torch": torch.__version__}


def render(out: Path) -> None:
    """Rewrite the Markdown table next to the JSONL ``out`` from all its rows."""
    rows = read_jsonl(out)
    lines = [f"# `losa run` in 1 process vs 2 processes (torchrun, gloo), {SMOLLM2}, CPU", "",
             "Same global batch (2 processes × batch B against 1 process × batch B × 2 accumulation steps). A "
             "correctness check on a 2-core machine, not a speed claim. Each process of the 2-process run has 1 "
             "thread. A 1-process run with more threads sums in another order (calibration statistics, GEMMs), so "
             "weights at the pruning threshold can flip between the runs; with one thread per process the "
             "arithmetic is the same and only data-parallel training differs.", "",
             "| sparsity | steps | FT examples | global batch | threads of the 1-proc run | wall 1 proc s | wall 2 proc s | mask entries differing "
             "| max abs weight diff | same ranks |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['sparsity']} | {r['steps']} | {r['ft_examples']} | {r['global_batch']} | "
              f"{r.get('threads_1proc', 2)} | {r.get('wall_1proc_s', r.get('wall_1proc_2threads_s'))} | {r['wall_2proc_1thread_s']} | {r['mask_entries_differing']} | "
              f"{r['max_abs_weight_diff']:.2e} | {r['same_ranks']} |" for r in rows]
    lines += ["", "Provenance per row:", ""]
    lines += [f"- {r['date']}, {r['commit']}, {r['cpu']} ({r['isa']}), {r['model']}; `{r['command']}`" for r in rows]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--data-dir", default=os.environ.get("LOSA_DATA_DIR") or str(HERE.parent.parent / "shared" / "data"))
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--ft-examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4, help="per process")
    ap.add_argument("--threads-1proc", type=int, default=1, help="threads of the one-process run")
    ap.add_argument("--out", default=str(RESULTS / "multiprocess.jsonl"))
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from the .jsonl and exit")
    args = ap.parse_args()
    if args.render_only:
        render(Path(args.out))
        return
    losa = shutil.which("losa", path=str(BIN)) or "losa"
    torchrun = shutil.which("torchrun", path=str(BIN)) or "torchrun"
    prov = provenance(args.threads_1proc, SMOLLM2, sys.argv)  # at the start: the code the runs import
    with tempfile.TemporaryDirectory(prefix="bench-mp-") as tmp:
        one, two = Path(tmp) / "one", Path(tmp) / "two"
        wall_one = _timed([losa, *_losa_args(args, one), "--grad-accum", "2"], threads=args.threads_1proc)
        wall_two = _timed([torchrun, "--standalone", "--nproc_per_node", "2", "--no-python", losa,
                           *_losa_args(args, two)], threads=1)
        row = {"sparsity": args.sparsity, "steps": args.steps, "ft_examples": args.ft_examples,
               "global_batch": 2 * args.batch_size, "threads_1proc": args.threads_1proc, "wall_1proc_s": round(wall_one, 1),
               "wall_2proc_1thread_s": round(wall_two, 1), **compare(one, two),
               **prov}
    print(json.dumps(row))
    out = Path(args.out)
    append_jsonl(out, [row])
    render(out)


if __name__ == "__main__":
    main()
