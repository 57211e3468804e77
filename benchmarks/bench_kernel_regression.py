"""Is the sparse kernel slower than it was? The current build against an earlier commit's, in one process.

Issue 18 asks that CPUs with AVX512-BF16 see no regression from the committed numbers while the AVX2 path
changes. Results files from different days (and VMs) cannot tell a 5 % change from machine drift, so this
compiles the kernel sources of ``--base`` (``git show BASE:src/losa/inference/csrc/...``) as a
second extension next to the current one and times both on the same packed layers, interleaved, at batch 1
(decode): LLaMA-7B shapes (or SmolLM2-135M's, ``--shapes smollm2``), 70 % / 50 % unstructured and 2:4, bf16 values with bf16 and float32 inputs, 1 and 2
threads. The packed format must be the same in both commits (it is checked: both must give the same outputs).
A single layer stays in the CPU's caches when it is timed over and over (a 11008x4096 layer at 70 % is 32 MB);
``--copies N`` makes each timed call run N packed copies of the layer one after another, in memory of their own,
so that the call streams N times the layer's bytes from memory, as a decode step streams the model::

    python benchmarks/bench_kernel_regression.py --base f6ee79c       # results/kernel_regression.{jsonl,md}
    LOSA_SPARSE_ISA=avx2 python benchmarks/bench_kernel_regression.py --base f6ee79c   # the AVX2 path of both
    python benchmarks/bench_kernel_regression.py --base f6ee79c --copies 10   # beyond the caches

Each row: shape, pattern, input dtype, threads, base and current median ms, and ``speed`` = base ms / current ms
(above 1: the current kernel is faster), with the provenance fields (date, commit, command, CPU, ISA).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _provenance import provenance
from _rows import read_jsonl, run_sections, save_rows
from bench_inference import interleaved, keep_mask

from losa.inference import kernel as kmod
from losa.inference.formats import FORMAT_CODES, pack
from losa.utils.cpp import build_extension
from losa.utils.io import atomic_write_text

HERE = Path(__file__).resolve().parent
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
PATTERNS = ("70%", "50%", "2:4")
CSRC = "src/losa/inference/csrc"
#: ``--shapes``: LLaMA-7B's layers, or SmolLM2-135M's (hidden 576, MLP 1536, 3 KV heads of 64: short rows, where
#: the per-row cost of the loop shows)
SHAPE_SETS = {"llama7b": SHAPES, "smollm2": ((576, 576), (192, 576), (1536, 576), (576, 1536))}


def base_kernel(rev: str):
    """Compile ``rev``'s kernel sources as their own extension (cached by torch per name); raises SystemExit.

    Every file of ``rev``'s ``csrc`` directory is written to a temporary directory (later commits split the
    extension into several sources and a shared header); all its ``.cpp`` files are compiled together.
    """
    git = ["git", "-C", str(HERE)]
    try:
        full = subprocess.run([*git, "rev-parse", "--short", rev], capture_output=True, text=True,
                              check=True).stdout.strip()
        names = [Path(p).name for p in subprocess.run([*git, "ls-tree", "--name-only", "--full-tree", full, f"{CSRC}/"],
                                                       capture_output=True, text=True, check=True).stdout.split()]
        tmp = Path(tempfile.mkdtemp(prefix=f"losa-base-kernel-{full}-"))
        for name in names:
            src = subprocess.run([*git, "show", f"{full}:{CSRC}/{name}"], capture_output=True, text=True, check=True)
            (tmp / name).write_text(src.stdout)
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"--base {rev}: git cannot show {CSRC} there ({exc.stderr.strip()}); give a commit of "
                         "this repository") from None
    sources = sorted(tmp.glob("*.cpp"))
    if not (tmp / "sparse_linear.cpp").exists():
        raise SystemExit(f"--base {rev}: {CSRC}/sparse_linear.cpp does not exist there; give a later commit")
    return full, build_extension(f"losa_kernel_{full}", sources, headers=sorted(tmp.glob("*.h")))


def render(src: Path, dst: Path) -> None:
    rows = read_jsonl(src)
    out = ["# Sparse kernel: current build vs an earlier commit's, same process (issue 18: no regression)", "",
           "Written by `benchmarks/bench_kernel_regression.py`. Batch 1 (decode), bf16 values, LLaMA-7B shapes "
           "(SmolLM2-135M's in runs with `--shapes smollm2`), "
           "medians of interleaved calls on the same packed buffers; `speed` = base ms / current ms (above 1: "
           "the current kernel is faster).", ""]
    for title, where, rs in run_sections(rows, with_base=True):
        speeds = [r["speed"] for r in rs]
        out += [title, "",
                f"{where}, kernel ISA {rs[0]['kernel_isa']}; "
                + (f"each timed call runs {rs[0]['copies']} copies of the layer (ms are per call); "
                   if rs[0].get("copies", 1) > 1 else "")
                + f"{len(rs)} cases, speed {min(speeds):.3f}-{max(speeds):.3f}, median {statistics.median(speeds):.3f}."
                + (f" Note: {rs[0]['note']}" if rs[0].get("note") else ""),
                "", "| threads | shape | pattern | inputs | base ms | current ms | speed |", "|---|---|---|---|---|---|---|"]
        out += [f"| {r['threads']} | {r['shape']} | {r['pattern']} | {r['inputs']} | {r['base_ms']:.3f} | "
                f"{r['current_ms']:.3f} | {r['speed']:.3f} |" for r in rs]
        out.append("")
    atomic_write_text(dst, "\n".join(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="commit whose kernel source is the baseline, e.g. f6ee79c")
    ap.add_argument("--reps", type=int, default=40, help="interleaved calls per case (default 40)")
    ap.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="llama7b", help="layer shapes (default llama7b)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--copies", type=int, default=1,
                    help="packed copies of each layer run one after another per timed call (default 1; 10 puts a "
                         "LLaMA-7B layer's stream beyond the caches)")
    ap.add_argument("--note", default="", help="what the current build changes, for the report (e.g. a trial not kept)")
    ap.add_argument("--out", default=str(HERE / "results" / "kernel_regression.jsonl"))
    args = ap.parse_args(argv)
    if args.copies < 1:
        ap.error(f"--copies must be at least 1, got {args.copies}")
    current = kmod.load_kernel()
    if current is None:
        raise SystemExit("the sparse kernel does not build here; install a C++ compiler")
    base, old = base_kernel(args.base)
    isa = kmod.best_isa()
    gen = torch.Generator().manual_seed(0)
    rows, started = [], time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for n, k in SHAPE_SETS[args.shapes]:
            w = torch.randn(n, k, generator=gen)
            for pat in PATTERNS:
                p = pack(w * keep_mask(w, pat), torch.bfloat16, "auto")
                copies = [(current.hugepage_copy(p.meta), current.hugepage_copy(p.values), p.row_ptr, None, n, k,
                           FORMAT_CODES[p.fmt], isa) for _ in range(args.copies)]
                spmm_args = copies[0]
                for x_dtype in (torch.bfloat16, torch.float32):
                    x = torch.randn(1, k, generator=gen).to(x_dtype)
                    y_old, y_new = old.spmm(x, *spmm_args), current.spmm(x, *spmm_args)
                    if not torch.allclose(y_old.float(), y_new.float(), rtol=1e-3, atol=1e-3):
                        raise SystemExit(f"{base}'s kernel and the current one disagree on {n}x{k} {pat}: the packed "
                                         "format changed between them; pick a later --base")
                    def run_all(ext, x=x, copies=copies):  # every copy once: [1, n] outputs, the last returned
                        return [ext.spmm(x, *a) for a in copies][-1]

                    ms = {k: t * 1e3 for k, t in interleaved({"base": lambda: run_all(old),
                                                              "current": lambda: run_all(current)},
                                                             args.reps).items()}
                    model = "random LLaMA-7B-shaped layer" if args.shapes == "llama7b" else "random SmolLM2-shaped layer"
                    row = {**provenance(threads, model=model), "run": started, "base": base,
                           "LOSA_SPARSE_ISA": os.environ.get("LOSA_SPARSE_ISA", ""),
                           "kernel_isa": kmod.ISA_NAMES[isa], "copies": args.copies, "note": args.note,
                           "shape": f"{n}x{k}", "pattern": pat,
                           "inputs": str(x_dtype).replace("torch.", ""), "base_ms": ms["base"],
                           "current_ms": ms["current"], "speed": ms["base"] / ms["current"]}
                    rows.append(row)
                    print(f"{threads} thr {n}x{k} {pat} {row['inputs']}: speed {row['speed']:.3f}", flush=True)
    save_rows(Path(args.out), rows, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
