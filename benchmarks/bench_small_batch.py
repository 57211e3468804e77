"""Small and medium batches (8-128 rows) of the sparse runtime: each path of ``SparseLinear`` vs dense.

    python benchmarks/bench_small_batch.py           # ~15 min on 2 idle cores
    python benchmarks/bench_small_batch.py --quick   # smoke run

Batches of a few to a few dozen rows are short prompts, batched decoding and speculative verification.
For each layer shape (LLaMA-7B and SmolLM2), pattern (50 %, 70 %, 2:4), row count and thread count it
times, interleaved (medians; the caches are overwritten before every timed call, as in a model larger than
them), against torch's dense ``F.linear`` on the same pruned weights:

- ``loop``: the sparse row kernel (``spmm``; decode's path),
- ``tiles_xw``: decompressed tiles multiplied as x · W_tileᵀ (``dense_mm_xw``),
- ``tiles_wx``: decompressed tiles multiplied as W_tile · xᵀ, transposed once (``dense_mm``),
- ``sparse_gemm``: the zero-skipping bf16 GEMM (``sparse_mm_bf16``; layers <= 35 % dense, AVX512-BF16),
- ``amx``: the AMX tiles kernel (``amx_mm_bf16``; bf16, CPUs with AMX-BF16),
- ``layer``: what ``SparseLinear`` itself picks (the thresholds in losa/inference/sparse_linear.py).

bf16 models (bf16 inputs, bf16 values, against dense bf16) are the main section; float32 models (float32
values, against dense float32) follow for 50 % (``--bf16-only`` leaves them out). Every row carries its
provenance (date, commit, command, threads, CPU model and ISA; random weights of the stated shape). Writes
benchmarks/results/small_batch.{json,md} (``--out`` elsewhere, e.g. ``benchmarks/results/amx_batch``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance  # noqa: E402
from bench_inference import LLAMA_SHAPES, SMOL_SHAPES, interleaved, keep_mask, machine_info  # noqa: E402

from losa.inference import kernel as kmod  # noqa: E402
from losa.inference.formats import FORMAT_CODES  # noqa: E402
from losa.inference.sparse_linear import (  # noqa: E402
    AMX_MAX_ROWS,
    AMX_MAX_ROWS_SMALL,
    AMX_ROW_LOOP_ROWS,
    DENSE_BATCH_THRESHOLD_BF16,
    DENSE_BATCH_THRESHOLD_BF16_SMALL,
    DENSE_TILE_ROWS,
    DENSE_XW_MAX_ROWS,
    SMALL_LAYER_WEIGHTS,
    SPARSE_GEMM_BATCH_THRESHOLD,
    SparseLinear,
)
from losa.utils.io import atomic_write_json, atomic_write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "small_batch"
#: the row loop's cost grows with the rows; above this it never won and only slows the run down
LOOP_MAX_ROWS = 64
PATHS = ["loop", "tiles_xw", "tiles_wx", "sparse_gemm", "amx", "layer"]


#: bytes written before every timed call: a model's forward reads each layer's weights from memory (the model is
#: larger than the caches), so no path may find its own or another path's data of the previous call cached
EVICT_BYTES = 64 << 20
_evict_buffer: list[torch.Tensor] = []


def evict() -> None:
    if not _evict_buffer:
        _evict_buffer.append(torch.zeros(EVICT_BYTES // 4))
    _evict_buffer[0].add_(1.0)


def measure(dtype: torch.dtype, shapes, patterns, rows_list, threads, reps: int) -> list[dict]:
    k = kmod.load_kernel()
    isa = kmod.best_isa()
    bf16 = dtype == torch.bfloat16
    out = []
    for th in threads:
        torch.set_num_threads(th)
        for n, kk in shapes:
            torch.manual_seed(n * 7 + kk)
            w = torch.randn(n, kk)
            for pat in patterns:
                wm = w * keep_mask(w, pat)
                layer = SparseLinear.from_dense(wm, None, dtype, "auto")
                wd = wm.to(dtype)
                args = (layer.meta, layer.values, layer.row_ptr, None, n, kk, FORMAT_CODES[layer.fmt], isa)
                for rows in rows_list:
                    x = torch.randn(rows, kk).to(dtype)
                    fns = {"dense": partial(F.linear, x, wd),
                           "tiles_xw": partial(k.dense_mm_xw, x, *args, DENSE_TILE_ROWS, bf16),
                           "tiles_wx": partial(k.dense_mm, x, *args, DENSE_TILE_ROWS, bf16),
                           "layer": partial(layer, x)}
                    if rows <= LOOP_MAX_ROWS:
                        fns["loop"] = partial(k.spmm, x, *args)
                    if bf16 and layer.sparse_prefill and isa == 2:
                        fns["sparse_gemm"] = partial(k.sparse_mm_bf16, x, *args[:-1])
                    if bf16 and kmod.amx_available(isa):
                        fns["amx"] = partial(k.amx_mm_bf16, x, *args[:-1])
                    with torch.inference_mode():
                        t = interleaved(fns, reps, between=evict)
                    row = {**provenance(th, model=f"random weights {n}x{kk}, {pat}"),
                           "dtype": str(dtype).replace("torch.", ""), "threads": th, "shape": f"{n}x{kk}",
                           "pattern": pat, "rows": rows, "dense_ms": t["dense"] * 1e3,
                           **{f"{p}_x": t["dense"] / t[p] for p in PATHS if p in t}}
                    out.append(row)
                    print(json.dumps({a: (round(b, 3) if isinstance(b, float) else b) for a, b in row.items()}),
                          flush=True)
    return out


def previous_rule(r: dict) -> float:
    """The path the thresholds before bench_small_batch.py picked: bf16 row loop up to 24 rows (16 on layers
    with the sparse GEMM, which took over above), W_tile · xᵀ tiles beyond."""
    sparse = "sparse_gemm_x" in r
    if r["rows"] <= (16 if sparse else 24):
        return r["loop_x"]
    return r["sparse_gemm_x"] if sparse else r["tiles_wx_x"]


def chosen_path(r: dict, amx: bool = True) -> float:
    """The path the current thresholds pick (the ``layer`` column without SparseLinear's Python overhead); with
    ``amx=False`` on a row with AMX timings: the path of the same thresholds on a CPU without AMX."""
    n, k = (int(v) for v in r["shape"].split("x"))
    small = n * k <= SMALL_LAYER_WEIGHTS
    if amx and "amx_x" in r:
        if r["rows"] <= AMX_ROW_LOOP_ROWS:
            return r["loop_x"]
        if r["rows"] <= (AMX_MAX_ROWS_SMALL if small else AMX_MAX_ROWS):
            return r["amx_x"]
    elif r["rows"] <= (DENSE_BATCH_THRESHOLD_BF16_SMALL if small else DENSE_BATCH_THRESHOLD_BF16):
        return r["loop_x"]
    if "sparse_gemm_x" in r and r["rows"] > SPARSE_GEMM_BATCH_THRESHOLD:
        return r["sparse_gemm_x"]
    return r["tiles_xw_x"] if r["rows"] <= DENSE_XW_MAX_ROWS else r["tiles_wx_x"]


def render(res: dict) -> str:
    lines = ["# Small and medium batches: each path of SparseLinear vs dense (same run, interleaved medians)", "",
             f"Command: `{res['command']}`; commit {res['machine']['commit']}; machine: {res['machine']['cpu']} "
             f"({res['machine'].get('cpu_generation', '')}), torch {res['machine']['torch']}, "
             f"kernel ISA {res['machine']['kernel_isa']}, {res['machine']['date']}; {res['reps']} repetitions; "
             f"{res['wall_s']:.0f} s.", "",
             "Ratios are dense time / path time (> 1 = faster than dense). `layer` = what `SparseLinear` picks. "
             "bf16 rows: bf16 inputs and values vs dense bf16 `F.linear`; float32 rows: float32 vs float32. "
             "`-` = path not available for that layer (sparse GEMM: <= 35 % dense layers, AVX512-BF16; AMX: CPUs with "
             f"AMX-BF16) or not timed (the row loop above {LOOP_MAX_ROWS} rows). Each JSON row carries its provenance "
             "(date, commit, command, threads, CPU model and ISA).", ""]
    for dtype in ("bfloat16", "float32"):
        rows = [r for r in res["rows"] if r["dtype"] == dtype]
        if not rows:
            continue
        lines += [f"## {dtype} models", "", "| threads | shape | pattern | rows | dense ms | "
                  + " | ".join(PATHS) + " |", "|---" * (5 + len(PATHS)) + "|"]
        for r in rows:
            cells = [f"{r[p + '_x']:.2f}" if p + "_x" in r else "-" for p in PATHS]
            lines.append(f"| {r['threads']} | {r['shape']} | {r['pattern']} | {r['rows']} | {r['dense_ms']:.3f} | "
                         + " | ".join(cells) + " |")
        lines += ["", f"`layer` vs dense by rows ({dtype}; min-max over shapes, patterns and threads):", "",
                  "| rows | LLaMA-7B shapes | SmolLM2 shapes |", "|---|---|---|"]
        llama = {f"{n}x{k}" for n, k in LLAMA_SHAPES}
        for n_rows in sorted({r["rows"] for r in rows}):
            cell = []
            for group in (True, False):
                v = [r["layer_x"] for r in rows if r["rows"] == n_rows and (r["shape"] in llama) == group]
                cell.append(f"{min(v):.2f}-{max(v):.2f}" if v else "-")
            lines.append(f"| {n_rows} | {cell[0]} | {cell[1]} |")
        lines.append("")
        if dtype != "bfloat16":
            continue
        with_amx = any("amx_x" in r for r in rows)
        if with_amx:
            lines += ["The thresholds without the AMX kernel (row loop, then decompressed tiles or the sparse GEMM) vs "
                      "with it, on the paths' own times (medians and min-max over shapes, patterns, threads):", "",
                      "| rows | LLaMA-7B without AMX | LLaMA-7B with AMX | SmolLM2 without AMX | SmolLM2 with AMX |",
                      "|---|---|---|---|---|"]
            rules = (partial(chosen_path, amx=False), chosen_path)
        else:
            lines += ["Thresholds before this benchmark (row loop up to 24 rows, 16 on sparse-GEMM layers; W_tile · "
                      "xᵀ tiles above) vs now, on the paths' own times (medians and min-max over shapes, patterns, "
                      "threads):", "", "| rows | LLaMA-7B before | LLaMA-7B now | SmolLM2 before | SmolLM2 now |",
                      "|---|---|---|---|---|"]
            rules = (previous_rule, chosen_path)
        for n_rows in sorted({r["rows"] for r in rows}):
            cell = []
            for group in (True, False):
                sel = [r for r in rows if r["rows"] == n_rows and (r["shape"] in llama) == group]
                for rule in rules:
                    v = [rule(r) for r in sel]
                    cell.append(f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" if v else "-")
            lines.append(f"| {n_rows} | " + " | ".join(cell) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one shape per family, few rows and repetitions")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--render-only", action="store_true", help="rewrite <out>.md from an existing <out>.json")
    ap.add_argument("--rows", default=None, help="comma-separated batch rows (default 8,12,16,24,32,48,64,128)")
    ap.add_argument("--bf16-only", action="store_true", help="leave out the float32 models")
    a = ap.parse_args()
    out = Path(a.out)
    if a.render_only:
        atomic_write_text(out.with_suffix(".md"), render(json.loads(out.with_suffix(".json").read_text())))
        return 0
    if kmod.load_kernel() is None:
        print("the sparse kernel is not available here; nothing to measure", file=sys.stderr)
        return 1
    threads = [int(t) for t in a.threads.split(",")]
    llama, smol = (LLAMA_SHAPES[:1], SMOL_SHAPES[2:3]) if a.quick else (LLAMA_SHAPES, [SMOL_SHAPES[0], SMOL_SHAPES[3]])
    rows_list = [8, 16, 32] if a.quick else [8, 12, 16, 24, 32, 48, 64, 128]
    if a.rows:
        rows_list = sorted({int(r) for r in a.rows.split(",")})
    reps = 3 if a.quick else a.reps
    t0 = time.time()
    rows = measure(torch.bfloat16, llama + smol, ["50%", "70%", "2:4"], rows_list, threads, reps)
    if not a.bf16_only:
        rows += measure(torch.float32, llama + smol, ["50%"], rows_list, threads, reps)
    res = {"command": "python " + " ".join(sys.argv), "machine": machine_info(), "reps": reps,
           "wall_s": time.time() - t0, "rows": rows}
    atomic_write_json(out.with_suffix(".json"), res)
    atomic_write_text(out.with_suffix(".md"), render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
