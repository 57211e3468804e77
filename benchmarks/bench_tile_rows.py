"""Prompt GEMM of one sparse layer: decompressed tiles of 256 / 512 / 1024 weight rows vs dense ``F.linear``.

    python benchmarks/bench_tile_rows.py                   # 11008x4096 and 4096x4096, 50 % and 70 %, 1 and 2 threads
    python benchmarks/bench_tile_rows.py --stack           # the prompt of a 2-layer LLaMA-7B-shaped bf16 stack

A bf16 model's prompt (bf16 inputs, bf16 values) on a native-bf16 CPU, or float32 inputs elsewhere (with
``LOSA_SPARSE_ISA=avx2``: the float32 tiles). Each layer decompresses ``tile`` rows at a time and multiplies them
with torch's GEMM (``dense_mm``, the prompt path of ``SparseLinear``); the dense layer is ``F.linear`` on the same
(rounded) weights. Medians of calls interleaved round-robin; ``x dense`` = dense ms / tiles ms (above 1: faster).
Rows are appended to benchmarks/results/tile_rows.jsonl with the provenance fields and tile_rows.md is rendered
from all rows. The choice it informs: ``DENSE_TILE_ROWS`` / ``DENSE_TILE_ROWS_AMX`` in
``losa/inference/sparse_linear.py`` (and the height ``losa bench-runtime`` caches per CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _provenance import provenance
from _rows import read_jsonl, run_sections, save_rows
from bench_inference import interleaved, keep_mask

from losa.inference import kernel as kmod
from losa.inference import sparsify_for_inference, thresholds
from losa.inference.formats import FORMAT_CODES, pack
from losa.utils.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
TILES = (256, 512, 1024)


def measure(shapes: list[tuple[int, int]], patterns: list[str], threads: list[int], rows: int, reps: int) -> list[dict]:
    """Time the tile heights and the dense layer per shape, pattern and thread count; one result row each."""
    k = kmod.load_kernel()
    isa = kmod.best_isa()
    native = kmod.native_bf16(isa)
    dtype = torch.bfloat16 if native else torch.float32
    run = time.strftime("%Y-%m-%dT%H:%M UTC", time.gmtime())
    out = []
    gen = torch.Generator().manual_seed(0)
    for n, kk in shapes:
        for pattern in patterns:
            w = torch.randn(n, kk, generator=gen)
            w = (w * keep_mask(w, pattern)).bfloat16()
            p = pack(w.float(), torch.bfloat16, "bitmask")
            args = (p.meta, p.values, p.row_ptr, None, n, kk, FORMAT_CODES["bitmask"], isa)
            x = torch.randn(rows, kk, generator=gen).to(dtype)
            wd = w.to(dtype)
            fns = {"dense": lambda x=x, wd=wd: F.linear(x, wd)}
            fns |= {f"tiles {t}": (lambda t=t, x=x, a=args: k.dense_mm(x, *a, t, native)) for t in TILES}
            for th in threads:
                torch.set_num_threads(th)
                with torch.inference_mode():
                    t_ms = {name: v * 1e3 for name, v in interleaved(fns, reps).items()}
                best = min(TILES, key=lambda t: t_ms[f"tiles {t}"])
                out.append({**provenance(th), "model": "random weights", "run": run, "kernel_isa": kmod.ISA_NAMES[isa],
                            "shape": f"{n}x{kk}", "pattern": pattern, "rows": rows, "gemm": str(dtype).split(".")[-1],
                            "dense_ms": round(t_ms["dense"], 3),
                            **{f"tiles_{t}_ms": round(t_ms[f"tiles {t}"], 3) for t in TILES}, "fastest_tile": best})
                print(f"{th} thr {n}x{kk} {pattern}: dense {t_ms['dense']:.1f} ms, "
                      + ", ".join(f"{t}: {t_ms[f'tiles {t}']:.1f}" for t in TILES), flush=True)
    return out


def measure_stack(threads: list[int], rows: int, reps: int, tiles: tuple[int, ...] = (256, 512)) -> list[dict]:
    """The whole prompt forward of a 2-layer LLaMA-7B-shaped bf16 model at 50 % and 70 %, per tile height.

    The height reaches the layers through the threshold cache (``dense_tile_rows``, as ``losa bench-runtime``
    writes it), in a temporary ``LOSA_CACHE_DIR``; heights alternate within each repetition.
    """
    import copy
    import os
    import tempfile

    from bench_inference import llama_stack, prune_model

    os.environ["LOSA_CACHE_DIR"] = tempfile.mkdtemp(prefix="losa-tiles-")
    thresholds.clear()
    isa = kmod.ISA_NAMES[kmod.best_isa()]
    base = llama_stack(2, 32000)
    models = {}
    for pattern in ("70%", "50%"):
        m = copy.deepcopy(base)
        prune_model(m, pattern)
        m.to(torch.bfloat16)
        sparsify_for_inference(m, value_dtype="bfloat16")
        models[pattern] = m
    del base
    ids = torch.randint(5, 1000, (1, rows))
    run = time.strftime("%Y-%m-%dT%H:%M UTC", time.gmtime())
    out = []
    for th in threads:
        torch.set_num_threads(th)
        times: dict[tuple[str, int], list[float]] = {}
        with torch.inference_mode():
            for rep_ in range(reps + 1):  # the first round warms up
                for tile in tiles:
                    thresholds.save({"dense_tile_rows": tile}, isa)
                    for pattern, m in models.items():
                        t0 = time.perf_counter()
                        m(ids, use_cache=True, logits_to_keep=1)
                        if rep_:
                            times.setdefault((pattern, tile), []).append((time.perf_counter() - t0) * 1e3)
        for pattern in models:
            ms = {t: statistics.median(times[(pattern, t)]) for t in tiles}
            out.append({**provenance(th), "model": "random LLaMA-7B-shaped stack, 2 layers, bf16", "run": run,
                        "kernel_isa": kmod.ISA_NAMES[kmod.best_isa()], "shape": "2-layer stack", "pattern": pattern,
                        "rows": rows, "gemm": "bfloat16", "dense_ms": None,
                        **{f"tiles_{t}_ms": round(v, 3) for t, v in ms.items()}, "fastest_tile": min(ms, key=ms.get)})
            print(f"{th} thr stack {pattern}: " + ", ".join(f"{t}: {v:.0f} ms" for t, v in ms.items()), flush=True)
    return out


def render(src: Path, dst: Path) -> None:
    rows = read_jsonl(src)
    out = ["# Prompt GEMM of a sparse layer: tile height (benchmarks/bench_tile_rows.py)", "",
           "Decompress `tile` weight rows at a time and multiply them with torch's GEMM (the prompt path of "
           "`SparseLinear`), against dense `F.linear` on the same weights; medians of interleaved calls. "
           "`x dense` = dense ms / tiles ms (above 1: faster than dense).", ""]
    for title, where, rs in run_sections(rows):
        out += [title, "", f"{where}, kernel ISA {rs[0]['kernel_isa']}, {rs[0]['rows']}-row prompt, "
                f"{rs[0]['gemm']} GEMM.", "",
                "| threads | shape | pattern | dense ms | "
                + " | ".join(f"tiles {t} ms (x {'256' if rs[0]['dense_ms'] is None else 'dense'})" for t in TILES)
                + " | fastest |", "|---|---|---|---|" + "---|" * len(TILES) + "---|"]
        for r in rs:
            if r["dense_ms"] is None:  # --stack: the whole prompt forward, per height (no dense layer timed)
                cells = [f"{r[f'tiles_{t}_ms']:.1f} ({r['tiles_256_ms'] / r[f'tiles_{t}_ms']:.2f}x of 256)"
                         if f"tiles_{t}_ms" in r else "-" for t in TILES]
                out.append(f"| {r['threads']} | {r['shape']} | {r['pattern']} | - | " + " | ".join(cells)
                           + f" | {r['fastest_tile']} |")
                continue
            cells = [f"{r[f'tiles_{t}_ms']:.2f} ({r['dense_ms'] / r[f'tiles_{t}_ms']:.2f}x)" for t in TILES]
            out.append(f"| {r['threads']} | {r['shape']} | {r['pattern']} | {r['dense_ms']:.2f} | " + " | ".join(cells)
                       + f" | {r['fastest_tile']} |")
        out.append("")
    atomic_write_text(dst, "\n".join(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=128, help="prompt rows (tokens)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", default=str(RESULTS / "tile_rows.jsonl"))
    ap.add_argument("--stack", action="store_true", help="time the prompt of a 2-layer LLaMA-7B-shaped bf16 stack "
                                                         "at 256 and 512 rows instead of single layers")
    a = ap.parse_args(argv)
    if kmod.load_kernel() is None:
        print("the sparse kernel could not be built; nothing to benchmark", file=sys.stderr)
        return 1
    threads = [int(t) for t in a.threads.split(",")]
    if a.stack:
        rows = measure_stack(threads, a.rows, min(a.reps, 5))
    else:
        rows = measure([(11008, 4096), (4096, 4096)], ["70%", "50%"], threads, a.rows, a.reps)
    save_rows(Path(a.out), rows, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
