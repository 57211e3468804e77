"""Batch-1 decode: one row-loop call per linear (shipped) vs one call per group of linears that share an input.

    python benchmarks/bench_sibling_fusion.py                # SmolLM2-135M and LLaMA-7B layer shapes, 1 and 2 threads
    python benchmarks/bench_sibling_fusion.py --quick        # smoke run, nothing written

In a decoder layer q/k/v read the same normalised hidden state, and so do gate/up. losa calls the kernel's row
loop once per linear (7 calls per LLaMA-style layer); fusing each group into one weight of stacked rows would
make 4 calls (qkv, o, gate_up, down). This measures the kernel side of that saving, before anything is built: the
same random sparse weights (bitmask, bf16 values, fp32 inputs) packed per linear (``separate``) and packed with
the group's rows stacked (``fused``), a whole stack of decoder layers' linears called in order through the
extension's direct ``spmm`` binding, timed interleaved round-robin in one process (medians, the order alternating
per repetition). No LM head, attention or norms, and none of the per-layer Python or dispatcher cost a model's step
also pays per call (``SparseLinear.forward``, the compiled graph's op call): it isolates the kernel calls (fork/join,
the small layers' load balance). Every fused output is checked bit-for-bit against the separate calls first, at each
thread count (each row's dot product runs the same code either way).

Appends rows to ``results/sibling_fusion.jsonl`` (per-row date, commit, command, threads, CPU model and ISA)
and renders ``sibling_fusion.md`` from all rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _rows import read_jsonl, save_rows  # noqa: E402

from losa.utils.io import atomic_write_text  # noqa: E402

OUT = HERE / "results" / "sibling_fusion.jsonl"
#: name -> (layers, hidden, kv rows, intermediate): SmolLM2-135M (all 30 layers), 4 LLaMA-7B layers, and a tiny
#: stack for the tests (not timed by default)
SHAPES = {"smollm2-135m": (30, 576, 192, 1536), "llama-7b": (4, 4096, 4096, 11008), "tiny": (2, 64, 32, 160)}
DEFAULT_SHAPES = ("smollm2-135m", "llama-7b")
#: untimed repetitions before the timed ones
WARMUP = 3


def _sparse(n: int, k: int, sparsity: float, gen):
    import torch

    w = torch.randn(n, k, generator=gen)
    w[torch.rand(n, k, generator=gen) < sparsity] = 0
    return w


def build(shape: str, sparsity: float, seed: int = 0) -> list[dict]:
    """Per decoder layer: ``separate`` = packed q, k, v, o, gate, up, down; ``fused`` = qkv, o, gate_up, down."""
    import torch

    from losa.inference.formats import pack

    layers, h, kv, inter = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        q, k, v, o = _sparse(h, h, sparsity, gen), _sparse(kv, h, sparsity, gen), _sparse(kv, h, sparsity, gen), \
            _sparse(h, h, sparsity, gen)
        gate, up, down = _sparse(inter, h, sparsity, gen), _sparse(inter, h, sparsity, gen), _sparse(h, inter, sparsity, gen)
        p = lambda w: pack(w, torch.bfloat16, "bitmask")  # noqa: E731
        out.append({"separate": [[p(q), p(k), p(v)], [p(o)], [p(gate), p(up)], [p(down)]],
                    "fused": [[p(torch.cat([q, k, v]))], [p(o)], [p(torch.cat([gate, up]))], [p(down)]]})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), choices=list(SHAPES))
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.7, 0.5])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--note", default="", help="a remark stored with the rows and shown in the markdown")
    ap.add_argument("--quick", action="store_true", help="smoke run: few repeats, results not written")
    args = ap.parse_args(argv)
    if args.reps < 1:
        sys.exit(f"--reps {args.reps}: at least 1 timed repetition is needed")
    if args.quick:
        args.reps, args.sparsities, args.threads = 3, args.sparsities[:1], args.threads[:1]
    for t in args.threads:
        if not 1 <= t <= (os.cpu_count() or 1):
            sys.exit(f"--threads {t}: this machine has {os.cpu_count()} CPUs; pick 1..{os.cpu_count()}")
    for s in args.sparsities:
        if not 0.0 <= s < 1.0:
            sys.exit(f"--sparsities {s}: a sparsity is a fraction in [0, 1), e.g. 0.7")

    import torch
    from _provenance import provenance

    from losa.inference import kernel as K
    from losa.inference.formats import FORMAT_CODES

    mod = K.load_kernel()
    if mod is None:
        sys.exit("the losa sparse kernel could not be built here (needs a C++ compiler and ninja); nothing to time")
    isa, fmt = K.best_isa(), FORMAT_CODES["bitmask"]

    def run(layers: list[dict], kind: str, xs: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        ys = []
        for layer in layers:
            for group in layer[kind]:
                for p in group:
                    n, k = p.shape
                    ys.append(mod.spmm(xs[k], p.meta, p.values, p.row_ptr, None, n, k, fmt, isa))
        return ys

    rows = []
    for shape in args.shapes:
        for sp in args.sparsities:
            layers = build(shape, sp)
            _, h, _, inter = SHAPES[shape]
            xs = {h: torch.randn(1, h), inter: torch.randn(1, inter)}
            calls = {kind: sum(len(g) for layer in layers for g in layer[kind]) for kind in ("separate", "fused")}
            for threads in args.threads:
                torch.set_num_threads(threads)
                sep, fus = run(layers, "separate", xs), run(layers, "fused", xs)
                if not torch.equal(torch.cat(sep, 1), torch.cat(fus, 1)):
                    sys.exit(f"{shape} at {sp}, {threads} threads: the fused calls do not reproduce the separate "
                             "ones bit for bit")
                ts: dict[str, list[float]] = {"separate": [], "fused": []}
                for r in range(args.reps + WARMUP):
                    for kind in (("separate", "fused") if r % 2 else ("fused", "separate")):
                        t0 = time.perf_counter()
                        run(layers, kind, xs)
                        if r >= WARMUP:
                            ts[kind].append(time.perf_counter() - t0)
                med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in ts.items()}
                row = {"shape": shape, "layers": len(layers), "sparsity": sp, "calls_separate": calls["separate"],
                       "calls_fused": calls["fused"], "separate_ms": round(med["separate"], 3),
                       "fused_ms": round(med["fused"], 3), "saved_ms": round(med["separate"] - med["fused"], 3),
                       "ratio": round(med["separate"] / med["fused"], 3), "reps": args.reps, "note": args.note,
                       "kernel_isa": K.ISA_NAMES[isa], "torch": torch.__version__,
                       "loadavg": [round(v, 2) for v in os.getloadavg()],
                       **provenance(threads, model=f"random weights, {shape} layer shapes",
                                    argv=None if argv is None else ["benchmarks/bench_sibling_fusion.py", *argv])}
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.quick:
        return
    save_rows(OUT, rows, render)


def render(jsonl: Path, md: Path) -> None:
    """The markdown table of every row in ``jsonl``, written atomically to ``md``."""
    rows = read_jsonl(jsonl)
    lines = ["# Batch-1 decode: one row-loop call per linear vs one per group sharing an input (q/k/v, gate/up)", "",
             "Written by `benchmarks/bench_sibling_fusion.py` (its docstring says what is timed). `separate` = the "
             "shipped calls (7 per decoder layer), `fused` = q/k/v and gate/up each packed as one weight of stacked "
             "rows (4 calls per layer), both over the stack of layers named, bitmask + bf16 values, fp32 input, "
             "batch 1, medians of interleaved repetitions; `saved` = what fusing saves per token in these kernel "
             "calls alone (the extension's direct binding: no LM head, attention or norms, and none of the "
             "per-layer Python or dispatcher cost a model's step also pays per call). Fused outputs equal the "
             "separate ones bit for bit. Rows before the `kernel`/`load` fields existed leave them blank.",
             "", "| date | commit | CPU (ISA) | kernel | threads | load | shape | layers | sparsity | calls "
             "| separate ms | fused ms | saved ms | separate / fused | command | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        load = "" if r.get("loadavg") is None else "/".join(f"{v:g}" for v in r["loadavg"])
        lines.append(f"| {r['date'][:16]} | {r['commit']} | {r['cpu']} ({r['isa']}) | {r.get('kernel_isa', '')} "
                     f"| {r['threads']} | {load} | {r['shape']} | {r['layers']} | {r['sparsity']:g} "
                     f"| {r['calls_separate']} -> {r['calls_fused']} | {r['separate_ms']:.3f} | {r['fused_ms']:.3f} "
                     f"| {r['saved_ms']:.3f} | {r['ratio']:.3f} | `{r['command']}` | {r.get('note', '')} |")
    atomic_write_text(md, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
