"""``losa bench-runtime``: measure the sparse runtime's dispatch thresholds on this CPU and cache them."""

from __future__ import annotations

import argparse

from losa.errors import LosaError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-runtime", help="measure the sparse runtime's batch-size thresholds on this CPU",
                       description="Time the sparse row loop, decompressed tiles + dense GEMM, (on CPUs with "
                                   "AVX512-BF16) the zero-skipping bf16 GEMM and (on CPUs with AMX) the AMX tiles "
                                   "kernel on a random 70 %-sparse layer at 1-64 batch rows (there the bf16 paths "
                                   "also at 128 and 256 rows, prompt sizes), and cache the crossovers for this CPU model, ISA level "
                                   "(LOSA_SPARSE_ISA included) and thread count in $LOSA_CACHE_DIR/runtime_thresholds.json "
                                   "(default ~/.cache/losa). Sparse layers use them from then on. Under a minute.")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads to measure with (default: torch's choice; use what you will run with)")
    p.add_argument("--shape", default="4096x4096", help="out x in of the test layer (default: 4096x4096)")
    p.add_argument("--sparsity", type=float, default=0.7, help="fraction of the test layer pruned (default: 0.7)")
    p.add_argument("--reps", type=int, default=7, help="interleaved repeats per batch size (default: 7)")
    p.add_argument("--rows", default=None,
                   help="comma-separated increasing batch sizes to time (default: 1,2,4,6,8,12,16,24,32,48,64)")
    p.add_argument("--dry-run", action="store_true", help="measure and print, but do not write the cache")
    p.set_defaults(func=run_bench_runtime)


def parse_shape(text: str) -> tuple[int, int]:
    """``"4096x4096"`` -> ``(4096, 4096)``; raises :class:`LosaError` on anything else."""
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise LosaError(f"--shape {text!r} is not OUTxIN; use e.g. 4096x4096") from None
    if n < 1 or k < 32:
        raise LosaError(f"--shape {text!r} is too small; use at least 1x32 (e.g. 4096x4096)")
    return n, k


def run_bench_runtime(args: argparse.Namespace) -> int:
    import torch

    from losa.inference import thresholds
    from losa.inference.arith import detect_isa

    if args.threads is not None:
        if args.threads < 1:
            raise LosaError(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    if not 0.0 < args.sparsity < 1.0:
        raise LosaError(f"--sparsity {args.sparsity} must be between 0 and 1 (exclusive), e.g. 0.7")
    if args.reps < 1:
        raise LosaError(f"--reps {args.reps} must be at least 1")
    shape = parse_shape(args.shape)
    rows = thresholds.ROWS
    if args.rows:
        try:
            rows = tuple(int(r) for r in args.rows.split(","))
        except ValueError:
            raise LosaError(f"--rows {args.rows!r} is not a comma-separated list of integers; use e.g. 1,4,16") from None
        if min(rows) < 1 or list(rows) != sorted(set(rows)):
            raise LosaError(f"--rows {args.rows!r} must be increasing positive integers, e.g. 1,4,16")
    isa = detect_isa()
    threads = torch.get_num_threads()
    print(f"measuring on {isa.cpu} ({isa.name}), {threads} thread{'s' if threads != 1 else ''}, {shape[0]}x{shape[1]} "
          f"at {args.sparsity:.0%}", flush=True)
    entry = thresholds.measure(shape, args.sparsity, rows, reps=args.reps, progress=lambda line: print(line, flush=True))
    found = ", ".join(f"{key}={entry[key]}" for key in thresholds.KEYS if key in entry)
    if args.dry_run:
        print(f"thresholds: {found} (not written: --dry-run)")
        return 0
    path = thresholds.save(entry, isa.level)
    print(f"thresholds: {found}; cached for '{thresholds.cpu_key(isa.level, entry['threads'])}' in {path}")
    return 0
