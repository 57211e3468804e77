"""The decode engine on the real SmolLM2 with the current kernels against an earlier commit's, in one process.

``bench_kernel_regression.py`` times single layers over and over; SmolLM2's layers then stay in the CPU's
caches, while a decode step streams every layer from memory once. A kernel change can win there and lose in
the model (the row pairs of 8f777cb did: see results/engine_regression.md). This builds ``--base``'s extension
(every source of its ``csrc``) next to the current one, builds one decode engine per extension on the same
pruned model (magnitude per output row, timing only; bf16 values; a bf16 model, or a float32 model with a bf16
LM head copy), and times 64 greedy steps after the same prompt with each, interleaved, best of ``--reps``::

    python benchmarks/bench_engine_regression.py --base 8f777cb --dtype bfloat16

Rows (results/engine_regression.jsonl, rendered to engine_regression.md): sparsity, threads, model dtype,
base and current ms per step, ``speed`` = base ms / current ms (above 1: the current build is faster), with
the provenance fields. The base commit must have the decode engine (7de7042 or later).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from _provenance import provenance
from _rows import read_jsonl, run_sections, save_rows
from bench_decode import PROMPT, prune_magnitude
from bench_kernel_regression import base_kernel

from losa.inference import kernel as kmod
from losa.inference import sparsify_for_inference
from losa.inference.decode import set_lm_head_dtype
from losa.inference.engine import DecodeEngine
from losa.utils.io import atomic_write_text

HERE = Path(__file__).resolve().parent
STEPS = 64


def engine_with(module, model: torch.nn.Module, max_len: int) -> DecodeEngine:
    """A decode engine of ``model`` built by the extension ``module`` (the loader is swapped while it builds)."""
    real = kmod.load_kernel
    kmod.load_kernel = lambda: module
    try:
        return DecodeEngine(model, max_len)
    finally:
        kmod.load_kernel = real


def step_ms(engine: DecodeEngine, cache, first: int) -> float:
    """ms per step of ``STEPS`` greedy steps after loading the prompt's ``cache``."""
    engine.load_prompt_cache(cache)
    token = first
    t = time.perf_counter()
    for _ in range(STEPS):
        token = int(engine.step(token).argmax())
    return (time.perf_counter() - t) / STEPS * 1e3


def render(src: Path, dst: Path) -> None:
    rows = read_jsonl(src)
    out = ["# Decode engine on SmolLM2: current kernels vs an earlier commit's, same process", "",
           "Written by `benchmarks/bench_engine_regression.py`: one engine per extension on the same pruned "
           "SmolLM2-135M-Instruct (dequantised from Q4_1), 64 greedy steps after the same prompt (`cached positions`: "
           "its length; blank in rows before the column existed: the 7-token prompt), interleaved, "
           "best of the repetitions; `speed` = base ms / current ms (above 1: the current build is faster).", ""]
    for title, where, rs in run_sections(rows, with_base=True):
        out += [title, "", f"{where}.", "",
                "| threads | model | sparsity | cached positions | base ms | current ms | speed |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['threads']} | {r['model_dtype']} | {r['sparsity']:.0%} | {r.get('context', '')} | "
                f"{r['base_ms']:.2f} | "
                f"{r['current_ms']:.2f} | {r['speed']:.3f} |" for r in rs]
        out.append("")
    atomic_write_text(dst, "\n".join(out))


def main(argv: list[str] | None = None) -> int:
    import losa

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="commit whose kernels are the baseline (7de7042 or later)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="model dtype")
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--context", type=int, default=0,
                    help="cached positions before the timed steps: the prompt's tokens repeated to this length "
                         "(default: the prompt alone); long contexts time the attention too")
    ap.add_argument("--out", default=str(HERE / "results" / "engine_regression.jsonl"))
    args = ap.parse_args(argv)
    if kmod.load_kernel() is None:
        raise SystemExit("the sparse kernel does not build here; install a C++ compiler")
    base, old = base_kernel(args.base)
    if not hasattr(old, "DecodeEngine"):
        raise SystemExit(f"--base {args.base} has no decode engine; give 7de7042 or a later commit")
    dense, tok = losa.load_model("smollm2-135m")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    if args.context > ids.shape[1]:
        ids = ids.repeat(1, -(-args.context // ids.shape[1]))[:, :args.context]
    max_len = ids.shape[1] + STEPS + 1
    rows, started = [], time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for sp in (float(s) for s in args.sparsities.split(",")):
        model = copy.deepcopy(dense).eval()
        if args.dtype == "bfloat16":
            model = model.to(torch.bfloat16)
        prune_magnitude(model, sp)
        sparsify_for_inference(model, value_dtype="bfloat16")
        if args.dtype == "float32":
            set_lm_head_dtype(model, "bfloat16")
        engines = {"base": engine_with(old, model, max_len), "current": DecodeEngine(model, max_len)}
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            best = {k: float("inf") for k in engines}
            with torch.inference_mode():
                out = model(ids, use_cache=True)
                first = int(out.logits[0, -1].argmax())
                for _ in range(args.reps):
                    for name, engine in engines.items():
                        best[name] = min(best[name], step_ms(engine, out.cache, first))
            row = {**provenance(threads, argv=[sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
                   "run": started, "base": base, "model_dtype": args.dtype, "sparsity": sp, "context": ids.shape[1],
                   "base_ms": round(best["base"], 3), "current_ms": round(best["current"], 3),
                   "speed": round(best["base"] / best["current"], 3)}
            rows.append(row)
            print(f"{args.dtype} {sp:.0%} {threads} thr, {ids.shape[1]} cached: base {row['base_ms']:.2f} ms, current "
                  f"{row['current_ms']:.2f} ms, speed {row['speed']:.3f}", flush=True)
    save_rows(Path(args.out), rows, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
