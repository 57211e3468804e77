"""Batch-1 sparse decode: one fixed slice of output rows per thread (shipped) vs chunks from a shared counter.

    python benchmarks/bench_work_stealing.py                 # LLaMA-7B and SmolLM2 layer shapes, 1 and 2 threads
    python benchmarks/bench_work_stealing.py --quick         # smoke run, nothing written

The kernel's row loop gives each thread one fixed slice of the output rows (``at::parallel_for``), so a call
lasts as long as its slowest thread. The alternative measured here hands out chunks of about 1/8 of a thread's
share from an atomic counter, so that a thread on a slower core (a hybrid CPU's efficiency core, a VM's busy
vCPU) takes fewer: the kernel source at ``--chunked-rev`` (built once as its own extension, like
bench_avx2_decode.py's baseline). Per shape and thread count, timed interleaved round-robin in one process
(medians): ``static`` (shipped), ``chunked``, and dense ``F.linear`` in float32 and bf16 for scale. Every path is
checked against a float64 ``F.linear`` first. Decision: the chunked schedule was not adopted (results file).

Before that, a core probe pins the process to each CPU in turn (1 thread) and times the same 1-thread call:
their ratio shows whether the cores run at the same speed here (a VM's vCPUs may not; hybrid CPUs' cores do
not), which is the case the chunked schedule is for. Appends rows to ``results/work_stealing.jsonl`` (per-row
date, commit, command, threads, CPU model and ISA) and renders ``work_stealing.md`` from all rows.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from _rows import append_jsonl, read_jsonl

from losa.utils.io import atomic_write_text

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "work_stealing.jsonl"
#: the commit whose kernel takes rows in chunks from a shared counter (not adopted)
CHUNKED_REV = "bb52674"
SHAPES = ("11008x4096", "4096x11008", "4096x4096", "1536x576", "576x1536")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), help="out x in")
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.7, 0.5])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--chunked-rev", default=CHUNKED_REV, help=f"git revision of the chunked kernel ({CHUNKED_REV})")
    ap.add_argument("--note", default="", help="a remark stored with the rows and shown in the markdown")
    ap.add_argument("--quick", action="store_true", help="smoke run: few repeats, results not written")
    args = ap.parse_args(argv)

    import subprocess

    rev = subprocess.run(["git", "rev-parse", "--verify", "--short", f"{args.chunked_rev}^{{commit}}"], cwd=HERE,
                         capture_output=True, text=True)
    if rev.returncode != 0:
        sys.exit(f"--chunked-rev {args.chunked_rev}: not a commit of this git checkout (the chunked kernel is built "
                 f"from its source); run from a clone of the repository, or pass a commit that exists here")
    args.chunked_rev = rev.stdout.strip()

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(HERE))
    from _provenance import provenance
    from bench_avx2_decode import build_baseline
    from bench_inference import interleaved, keep_mask

    from losa.inference import SparseLinear
    from losa.inference import kernel as kmod

    kern, isa = kmod.load_kernel(), kmod.best_isa()
    chunked = build_baseline(args.chunked_rev)
    reps = 5 if args.quick else args.reps
    base = {"run": provenance(0)["date"], "kernel_isa": kmod.ISA_NAMES[isa], "note": args.note, "chunked_rev": args.chunked_rev, "shipped": "static",
            "model": "random weights, per-row magnitude mask"}
    rows: list[dict] = []

    def layer(shape: str, sparsity: float):
        n, k = map(int, shape.split("x"))
        torch.manual_seed(0)
        w = torch.randn(n, k) / k**0.5
        w = w * keep_mask(w, f"{sparsity * 100:g}")
        sl = SparseLinear.from_dense(w, None, "bfloat16", "bitmask")
        x = torch.randn(1, k)
        a = (x, sl.meta, sl.values, sl.row_ptr, None, n, k, 0, isa)
        exact = F.linear(x.double(), sl.to_dense().double())
        return w, x, a, exact

    # core probe: the same 1-thread call pinned to each CPU
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) > 1:
        _, _, a, _ = layer(SHAPES[0], 0.7)
        torch.set_num_threads(1)
        times = {}
        try:
            for _ in range(3):  # alternate the CPUs a few times: a neighbour's load can move
                for c in cpus:
                    os.sched_setaffinity(0, {c})
                    t = interleaved({"x": lambda: kern.spmm(*a)}, max(3, reps // 3), warmup=2)["x"]
                    times.setdefault(c, []).append(t)
        finally:
            os.sched_setaffinity(0, set(cpus))
        fastest = min(min(v) for v in times.values())
        for c, v in times.items():
            rows.append({**provenance(1, base["model"], sys.argv), **base, "section": "core probe", "cpu_index": c,
                         "shape": SHAPES[0], "sparsity": 0.7, "median_ms": [round(t * 1e3, 3) for t in v],
                         "slowdown_vs_fastest": round(min(v) / fastest, 3)})
            print(f"cpu {c}: {' '.join(f'{t * 1e3:.2f}' for t in v)} ms (1 thread, {SHAPES[0]} at 70 %)", flush=True)

    for th in args.threads:
        torch.set_num_threads(th)
        for shape in args.shapes:
            for sp in args.sparsities:
                w, x, a, exact = layer(shape, sp)
                wb, xb = w.bfloat16(), x.bfloat16()  # what a bf16 model's dense layer multiplies
                fns = {"chunked": lambda a=a: chunked.spmm(*a), "static": lambda a=a: kern.spmm(*a),
                       "dense_fp32": lambda x=x, w=w: F.linear(x, w), "dense_bf16": lambda x=xb, w=wb: F.linear(x, w)}
                for name in ("chunked", "static"):
                    err = float((fns[name]().double() - exact).abs().max() / exact.abs().max())
                    if err > 1e-5:
                        sys.exit(f"{name} {shape} {sp}: max relative error {err:.1e} against float64 F.linear")
                with torch.inference_mode():
                    med = interleaved(fns, reps, warmup=3)
                dense = min(med["dense_fp32"], med["dense_bf16"])
                rows.append({**provenance(th, base["model"], sys.argv), **base, "section": "layer", "shape": shape,
                             "sparsity": sp, "loadavg": os.getloadavg(),
                             **{f"{k}_ms": round(v * 1e3, 4) for k, v in med.items()},
                             "chunked_vs_static": round(med["static"] / med["chunked"], 3),
                             "chunked_vs_dense": round(dense / med["chunked"], 3),
                             "static_vs_dense": round(dense / med["static"], 3)})
                r = rows[-1]
                print(f"{th} thr {shape:>10} {sp:.0%}: chunked {r['chunked_ms']:.3f} ms, static {r['static_ms']:.3f} ms "
                      f"({r['chunked_vs_static']:.2f}x); vs faster dense {r['chunked_vs_dense']:.2f}x "
                      f"(static {r['static_vs_dense']:.2f}x)", flush=True)
    if args.quick:
        return
    append_jsonl(OUT, rows)
    render(read_jsonl(OUT), OUT.with_suffix(".md"))
    print(f"wrote {OUT.with_suffix('.md')}")


def render(rows: list[dict], path: Path) -> None:
    """The Markdown page: per run (date + commit), the core probe, then the layer table."""
    runs: dict[str, list[dict]] = {}
    for r in rows:  # one run: one invocation (its start time; rows before that field: commit + note)
        runs.setdefault(r.get("run") or f"{r['commit']} {r['note']}", []).append(r)
    lines = ["# Chunked (work-stealing) vs fixed row split in the sparse decode kernel "
             "(benchmarks/bench_work_stealing.py)", "",
             "Batch 1, float32 input, bf16 stored values, bitmask format, random weights with a per-row magnitude "
             "mask. Within a run, the four paths are timed interleaved round-robin (medians). `static`: one fixed slice "
             "of rows per thread (shipped); `chunked`: rows taken in chunks from a shared counter (the kernel of the "
             "commit named in each run, where it was briefly the default; not adopted: it was no faster, see the "
             "runs). "
             "`vs dense`: the faster of dense float32 / bf16 `F.linear` divided by the sparse time. Core probe: the "
             "same 1-thread call pinned to each CPU, three rounds.", ""]
    for rs in runs.values():
        r0 = rs[0]
        lines += [f"## {r0['date'][:16]} UTC, {r0['commit']}", "", f"- command: `{r0['command']}`",
                  f"- CPU: {r0['cpu']} ({r0['isa']}), kernel ISA {r0['kernel_isa']}; chunked kernel: "
                  + (f"commit {r0['chunked_rev']}" if r0.get("chunked_rev") else "this commit's (its default then)")]
        if r0.get("note"):
            lines.append(f"- note: {r0['note']}")
        probe = [r for r in rs if r["section"] == "core probe"]
        if probe:
            lines += ["", "| CPU | 1-thread ms (3 rounds) | slowdown vs fastest |", "|---|---|---:|"]
            lines += [f"| {r['cpu_index']} | {', '.join(f'{t:.2f}' for t in r['median_ms'])} | "
                      f"{r['slowdown_vs_fastest']:.2f}x |" for r in probe]
        lines += ["", "| threads | shape | sparsity | chunked ms | static ms | chunked vs static | chunked vs dense "
                  "| static vs dense | dense fp32 ms | dense bf16 ms |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['threads']} | {r['shape']} | {r['sparsity']:.0%} | {r['chunked_ms']:.3f} | {r['static_ms']:.3f} | "
                  f"{r['chunked_vs_static']:.2f}x | {r['chunked_vs_dense']:.2f}x | {r['static_vs_dense']:.2f}x | "
                  f"{r['dense_fp32_ms']:.3f} | {r['dense_bf16_ms']:.3f} |" for r in rs if r["section"] == "layer"]
        gm = []
        for th in sorted({r["threads"] for r in rs if r["section"] == "layer"}):
            v = [r["chunked_vs_static"] for r in rs if r["section"] == "layer" and r["threads"] == th]
            gm.append(f"{th} thread(s) {math.exp(sum(map(math.log, v)) / len(v)):.2f}x ({min(v):.2f}-{max(v):.2f}x)")
        lines += ["", "Chunked vs static, geometric mean over the shapes (range): " + "; ".join(gm) + ".", ""]
    atomic_write_text(path, "\n".join(lines))


if __name__ == "__main__":
    main()
