"""Prefill (large bf16 batches) of the sparse runtime: per-layer kernel choice and the decoder stack.

    python benchmarks/bench_prefill.py            # ~10 min on 2 idle cores
    python benchmarks/bench_prefill.py --quick    # smoke run

Writes benchmarks/results/prefill_kernel.json and .md. Two sections, both against dense bf16 ``F.linear``
(torch's fastest dense path for bf16 batches here) measured in the same interleaved loop, medians:

1. Per layer (LLaMA-7B shapes, bf16 inputs and bf16 values, 128 tokens, 1 and 2 threads, 50-80 % and 2:4):
   the two large-batch paths of ``SparseLinear`` -- decompress tiles + dense bf16 GEMM (``dense_mm``) and
   the zero-skipping sparse GEMM (``sparse_mm_bf16``). This is the measurement behind
   ``SPARSE_PREFILL_MAX_DENSITY``.
2. Small bf16 batches (8-32 rows) on 70/80 % layers: the row loop vs the sparse GEMM (behind
   ``SPARSE_GEMM_BATCH_THRESHOLD``).
3. The decoder-stack prefill of the random LLaMA-7B-shaped 2-layer stack, exactly as in
   ``bench_inference.py`` (same models, timer and target definition), with the layers choosing their path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import LLAMA_SHAPES, interleaved, keep_mask, machine_info, stack_bench  # noqa: E402

from losa.inference import kernel as kmod  # noqa: E402
from losa.inference import pack  # noqa: E402
from losa.inference.formats import FORMAT_CODES  # noqa: E402
from losa.inference.sparse_linear import (  # noqa: E402
    DENSE_TILE_ROWS,
    SPARSE_GEMM_BATCH_THRESHOLD,
    SPARSE_PREFILL_MAX_DENSITY,
)

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "prefill_kernel"
PATTERNS = ["50%", "60%", "70%", "80%", "2:4"]


def layer_rows(threads, reps: int, tokens: int) -> list[dict]:
    k = kmod.load_kernel()
    rows = []
    for th in threads:
        torch.set_num_threads(th)
        for n, kk in LLAMA_SHAPES:
            torch.manual_seed(n + kk)
            w = torch.randn(n, kk)
            x = torch.randn(tokens, kk).bfloat16()
            for pat in PATTERNS:
                wm = (w * keep_mask(w, pat)).bfloat16()
                fmt = "nm24" if pat == "2:4" else "bitmask"
                p = pack(wm.float(), torch.bfloat16, fmt)
                args = (p.meta, p.values, p.row_ptr, None, n, kk, FORMAT_CODES[fmt])
                t = interleaved({
                    "dense": partial(F.linear, x, wm),
                    "tiles": partial(k.dense_mm, x, *args, kmod.best_isa(), DENSE_TILE_ROWS, True),
                    "sparse": partial(k.sparse_mm_bf16, x, *args),
                }, reps)
                rows.append({"threads": th, "shape": [n, kk], "pattern": pat, "tokens": tokens,
                             "density": p.row_ptr[-1].item() / (n * kk),
                             **{f"{key}_ms": v * 1e3 for key, v in t.items()}})
                r = rows[-1]
                print(f"{th}t {n}x{kk} {pat}: tiles {r['dense_ms'] / r['tiles_ms']:.2f}x "
                      f"sparse {r['dense_ms'] / r['sparse_ms']:.2f}x", flush=True)
    return rows


def small_batch_rows(threads, reps: int) -> list[dict]:
    """bf16 batches of 8-32 rows on 70/80 % layers: the row loop (spmm) vs the sparse GEMM vs dense bf16."""
    k = kmod.load_kernel()
    rows = []
    for th in threads:
        torch.set_num_threads(th)
        for n, kk in LLAMA_SHAPES[:2]:
            torch.manual_seed(n + kk)
            w = torch.randn(n, kk)
            for pat in ("70%", "80%"):
                wm = (w * keep_mask(w, pat)).bfloat16()
                p = pack(wm.float(), torch.bfloat16, "bitmask")
                args = (p.meta, p.values, p.row_ptr, None, n, kk, FORMAT_CODES["bitmask"])
                for batch in (8, 16, 24, 32):
                    x = torch.randn(batch, kk).bfloat16()
                    t = interleaved({"dense": partial(F.linear, x, wm),
                                     "rowloop": partial(k.spmm, x, *args, kmod.best_isa()),
                                     "sparse": partial(k.sparse_mm_bf16, x, *args)}, reps)
                    rows.append({"threads": th, "shape": [n, kk], "pattern": pat, "rows": batch,
                                 **{f"{key}_ms": v * 1e3 for key, v in t.items()}})
    return rows


def quality(data_dir: str) -> dict:
    """SmolLM2-135M, Wanda 70 % (8 x 256 C4), as a bf16 model: WikiText-2 perplexity (4 x 512, prompts of
    512 rows, so every sparse layer runs its prefill path) with the layers' zero-skipping GEMM, with the
    decompress + GEMM path (SPARSE_PREFILL_MAX_DENSITY forced to -1) and with dense bf16 pruned weights."""
    import copy

    import losa
    import losa.inference.sparse_linear as sl
    from losa.eval.ppl import perplexity
    from losa.inference import sparsify_for_inference

    torch.set_num_threads(2)
    base, tok = losa.load_model("smollm2-135m")
    losa.prune(base, tok, losa.PruneConfig(method="wanda", sparsity=0.7, nsamples=8, seqlen=256, data_dir=data_dir),
               progress=False)

    def wt2(m) -> float:
        return perplexity(m, tok, "wikitext2", seqlen=512, max_windows=4, data_dir=data_dir, progress=False)

    out = {"dense bf16 model, pruned weights": wt2(copy.deepcopy(base).to(torch.bfloat16))}
    for name, limit in (("sparse layers, zero-skipping prefill", sl.SPARSE_PREFILL_MAX_DENSITY),
                        ("sparse layers, decompress + GEMM prefill", -1.0)):
        saved, sl.SPARSE_PREFILL_MAX_DENSITY = sl.SPARSE_PREFILL_MAX_DENSITY, limit
        try:
            m = copy.deepcopy(base).to(torch.bfloat16)
            summary = sparsify_for_inference(m, value_dtype="bfloat16")
            out[name] = wt2(m)
            out[name + " (layers)"] = summary["sparse_prefill_layers"]
        finally:
            sl.SPARSE_PREFILL_MAX_DENSITY = saved
    return out


def write_markdown(res: dict, path: Path) -> None:
    lines = ["# Prefill: decompress + GEMM vs the zero-skipping sparse GEMM (bf16)", "",
             f"Command: `{res['command']}` (git {res.get('git', '?')}, {res['duration_s'] / 60:.1f} min). "
             f"CPU: {res['machine'].get('cpu', '?')}; load average at start {res['loadavg_start']}, "
             f"end {res['loadavg_end']}.", "",
             "Ratios are dense bf16 `F.linear` time / path time (> 1 = faster than dense), medians of "
             "interleaved calls in one run. bf16 inputs, bf16 values, "
             f"{res['layers'][0]['tokens']} tokens. `tiles` = decompress {DENSE_TILE_ROWS}-row tiles + torch bf16 GEMM; "
             "`sparse` = `sparse_mm_bf16` (skips the zeros). The layer uses `sparse` when its density is "
             f"<= {SPARSE_PREFILL_MAX_DENSITY} (SPARSE_PREFILL_MAX_DENSITY).", "",
             "## Per layer (LLaMA-7B shapes)", "",
             "| threads | shape | pattern | dense ms | tiles | sparse | chosen |", "|---|---|---|---|---|---|---|"]
    for r in res["layers"]:
        chosen = "sparse" if r["density"] <= SPARSE_PREFILL_MAX_DENSITY else "tiles"
        lines.append(f"| {r['threads']} | {r['shape'][0]}x{r['shape'][1]} | {r['pattern']} | {r['dense_ms']:.1f} | "
                     f"{r['dense_ms'] / r['tiles_ms']:.2f}x | {r['dense_ms'] / r['sparse_ms']:.2f}x | {chosen} |")
    st = res["stack"]
    lines += ["", f"## Decoder-stack prefill ({st['layers']}-layer LLaMA-7B-shaped stack, {st['prompt_len']}-token "
              "prompt, bf16 models, time inside the decoder layers)", "",
              "| threads | model | stack prefill ms | vs dense bf16 |", "|---|---|---|---|"]
    for th in sorted({r["threads"] for r in st["runs"]}):
        rr = {r["model"]: r for r in st["runs"] if r["threads"] == th}
        base = rr["dense_bf16"]["stack_prefill_ms"]
        for name in ("dense_bf16", "70% bfloat16", "50% bfloat16", "2:4 bfloat16"):
            lines.append(f"| {th} | {name} | {rr[name]['stack_prefill_ms']:.0f} | "
                         f"{base / rr[name]['stack_prefill_ms']:.2f}x |")
    if res.get("small"):
        lines += ["", "## Small bf16 batches on sparse-GEMM layers (row loop vs sparse GEMM, ratio to dense bf16)", "",
                  f"The layer uses the row loop up to {SPARSE_GEMM_BATCH_THRESHOLD} rows "
                  "(SPARSE_GEMM_BATCH_THRESHOLD), the sparse GEMM above.", "",
                  "| threads | shape | pattern | rows | dense ms | row loop | sparse GEMM |", "|---|---|---|---|---|---|---|"]
        for r in res["small"]:
            lines.append(f"| {r['threads']} | {r['shape'][0]}x{r['shape'][1]} | {r['pattern']} | {r['rows']} | "
                         f"{r['dense_ms']:.2f} | {r['dense_ms'] / r['rowloop_ms']:.2f}x | "
                         f"{r['dense_ms'] / r['sparse_ms']:.2f}x |")
    if res.get("quality"):
        q = res["quality"]
        ref = q["dense bf16 model, pruned weights"]
        lines += ["", "## Quality (SmolLM2-135M, Wanda 70 %, bf16 model, WikiText-2 4 x 512 windows)", "",
                  "| layers | perplexity | vs dense bf16 pruned weights | layers skipping zeros |", "|---|---|---|---|"]
        for k, v in q.items():
            if not k.endswith("(layers)"):
                lines.append(f"| {k} | {v:.3f} | {100 * (v / ref - 1):+.3f} % | {q.get(k + ' (layers)', '-')} |")
    lines += ["", "## Targets (prefill no slower than dense; MET at >= 0.97x, i.e. within the noise)", ""]
    lines += [f"- {t}" for t in res["targets"]]
    lines += ["", "## Why 50 % and 2:4 stay on decompress + GEMM (kernel lab in benchmarks/prefill_lab/, one run, printed only)", "",
              "Dense bf16 GEMM here runs at ~200 GFLOP/s per core (~0.9 `vdpbf16ps` per cycle: every loaded input "
              "vector is reused across several weight rows). A zero-skipping kernel cannot reuse inputs across rows "
              "(each row keeps different inputs), so it pays one input load per `vdpbf16ps` and reached ~0.4-0.45 per "
              "cycle from L2 in every variant tried at 128 tokens, 1 thread, 4096x4096:",
              "- kept weights in pairs + `vpunpck` (shipped): 1.23-1.36x at 70 %, 0.77-0.86x at 50 %/2:4; with the "
              "inputs forced L1-resident (wrong results, ceiling only) 1.78x at 70 % and 1.16x at 50 %;",
              "- adjacent input pairs (skip a pair only when both weights are zero, no shuffles): 0.82x at 70 %;",
              "- all 6 pairs of each group of 4 pre-interleaved (no shuffles, 62 %/50 % of the dense work at 50 %/2:4): "
              "0.64-0.73x at 50 %/2:4, 0.81-1.03x at 70 %.",
              "The decompress + GEMM path is a dense GEMM plus the decompression (~3-5 %), so it sits at 0.95-1.0x "
              "of dense; its per-tile GEMMs alone measured 1.05x.", "",
              "The kernel-lab scripts are in benchmarks/prefill_lab/ (they print, they do not write results)."]
    path.write_text("\n".join(lines) + "\n")


def stack_targets(st: dict) -> list[str]:
    out = []
    for th in sorted({r["threads"] for r in st["runs"]}):
        rr = {r["model"]: r for r in st["runs"] if r["threads"] == th}
        base = min(rr["dense_bf16"]["stack_prefill_ms"], rr["dense_fp32"]["stack_prefill_ms"])
        for name in ("70% bfloat16", "50% bfloat16", "2:4 bfloat16"):
            got = base / rr[name]["stack_prefill_ms"]
            out.append(f"{name} prefill (decoder stack), {th} thread(s): {got:.2f}x of dense "
                       f"- {'MET' if got >= 0.97 else 'MISSED'}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--data-dir", default=os.environ.get("LOSA_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--quality-only", action="store_true",
                    help="only the SmolLM2 perplexity check, added to an existing <out>.json")
    a = ap.parse_args()
    if not kmod.bf16_dot_available():
        print("this CPU (or build) has no AVX512-BF16 loop; the sparse prefill GEMM is not used here", file=sys.stderr)
        return 1
    out = Path(a.out)
    if a.quality_only:
        res = json.loads(out.with_suffix(".json").read_text())
        res["quality"] = quality(a.data_dir)
        res["command"] += " ; then: python " + " ".join(sys.argv)
        _write(res, out)
        return 0
    t0 = time.time()
    reps = 3 if a.quick else 9
    res: dict = {"command": "python " + " ".join(sys.argv), "machine": machine_info(),
                 "loadavg_start": os.getloadavg()}
    res["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=REPO).stdout.strip()
    res["layers"] = layer_rows((1, 2), reps, 128)
    res["small"] = small_batch_rows((1, 2), reps)
    res["stack"] = stack_bench(2, (1, 2), 3 if a.quick else 5, 2, 128)
    res["targets"] = stack_targets(res["stack"])
    res["loadavg_end"] = os.getloadavg()
    res["quality"] = quality(a.data_dir)
    res["duration_s"] = time.time() - t0
    _write(res, out)
    print("\n".join(res["targets"]))
    return 0


def _write(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out.with_suffix(".json"))
    write_markdown(res, out.with_suffix(".md"))


if __name__ == "__main__":
    raise SystemExit(main())
