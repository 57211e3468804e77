"""The AVX-512 float32-input row loop's two bf16 expansions, interleaved on the same layers.

A float32 model with bf16 values (``--dtype auto`` on AVX-512 CPUs without AVX512-BF16, e.g. Ice Lake; any model
with ``--dtype float32``) multiplies float32 inputs by bf16 weights expanded from the packed values. The kernel has
two ways to do it (``csrc/sparse_linear.cpp``, ``expand32``): widen 16 values to float32, then two ``vexpandps``
(``widen first``: faster on a Zen 4, results/kernel_variants.md), or one ``vpexpandw`` of 32 bf16 lanes, then widen
each half (``vpexpandw first``). It picks by CPU vendor; ``set_bf16_expand`` overrides, which this script uses to
time both in one run on the same packed layers (random weights, magnitude-pruned per row; the speed depends on
the sparsity, not on which weights), batch 1, best of ``--reps``, alternating. Both give the same bits (checked).
Shapes: SmolLM2-135M's MLP and LLaMA-7B's. ``--engine`` adds whole decode steps of SmolLM2-135M-Instruct
(dequantised from Q4_1; a float32 model, magnitude-pruned, bf16 values, the bf16 LM head copy): two decode engines
of the same model, built under either expansion, ``--tokens`` steps each, alternating (every other round in
reverse order since commit cb9d741; the same order every round before), best of ``--reps``.
Rows go to results/bf16_expand.jsonl, rendered to bf16_expand.md.
Needs the AVX-512 level (F/BW/VL/VBMI2). Run: ``python benchmarks/bench_bf16_expand.py``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance  # noqa: E402
from _rows import load_sentence, read_jsonl, run_sections  # noqa: E402
from bench_decode import append_rows  # noqa: E402

from losa.errors import LosaError  # noqa: E402
from losa.inference import SparseLinear  # noqa: E402
from losa.inference import kernel as _kernel  # noqa: E402
from losa.inference.formats import FORMAT_CODES  # noqa: E402
from losa.utils.io import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: (name, out, in, copies): copies of a layer are cycled so that the weights stream from memory as in decode
SHAPES = (("SmolLM2 gate/up", 1536, 576, 48), ("SmolLM2 down", 576, 1536, 48), ("LLaMA-7B gate/up", 11008, 4096, 2),
          ("LLaMA-7B down", 4096, 11008, 2))


def render(src: Path, dst: Path) -> None:
    """Write the markdown of every row in ``src`` to ``dst``."""
    out = ["# The AVX-512 float32-input loop's bf16 expansion: widen first vs vpexpandw first", "",
           "Written by `benchmarks/bench_bf16_expand.py` (see its docstring): one float32 input row times packed "
           "bf16 weights, both expansions alternating on the same layers, best times. `speed` = widen first / "
           "vpexpandw first (above 1: vpexpandw first is faster).", ""]
    for title, where, rs in run_sections(read_jsonl(src)):
        out += [title, "", f"{where}.{load_sentence(rs[0])} Vendor default here: "
                f"{'vpexpandw first' if rs[0]['default_expand16'] else 'widen first'}.", "",
                "| threads | layer | shape | sparsity | widen first us | vpexpandw first us | speed |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['threads']} | {r['layer']} | {r['out']} x {r['in']} | {r['sparsity']:.0%} | {r['widen_us']:.0f} | "
                f"{r['expand16_us']:.0f} | {r['widen_us'] / r['expand16_us']:.2f}x |" for r in rs if "layer" in r]
        steps = [r for r in rs if r.get("kind") == "engine step"]
        if steps:
            out += ["", "Whole decode steps (the decode engine):", "",
                    "| threads | model | sparsity | widen first ms/token | vpexpandw first ms/token | speed |",
                    "|---|---|---|---|---|---|"]
            out += [f"| {r['threads']} | {r['model']} | {r['sparsity']:.0%} | {r['widen_ms']:.2f} | "
                    f"{r['expand16_ms']:.2f} | {r['widen_ms'] / r['expand16_ms']:.2f}x |" for r in steps]
        out.append("")
    atomic_write_text(dst, "\n".join(out))


def engine_rows(args: argparse.Namespace, run: str, argv_rec: list[str], default16: bool) -> list[dict]:
    """Decode steps of SmolLM2 (float32 model, bf16 values, bf16 head copy) by two engines built under either
    expansion, alternating; one row per sparsity and thread count."""
    import copy

    from _engine_ab import alternate_steps
    from _provenance import SMOLLM2
    from bench_decode import prune_magnitude

    import losa
    from losa.inference import sparsify_for_inference
    from losa.inference.decode import set_lm_head_dtype
    from losa.inference.engine import DecodeEngine

    k = _kernel.load_kernel()
    base, _tok = losa.load_model("smollm2-135m")
    rows = []
    for sp in (float(s) for s in args.sparsities.split(",")):
        model = copy.deepcopy(base)
        prune_magnitude(model, sp)
        sparsify_for_inference(model, value_dtype="bfloat16")
        set_lm_head_dtype(model, "bfloat16")
        engines = {}
        for mode in (0, 1):
            k.set_bf16_expand(mode)  # read as the engine prepares each layer's row loop
            engines[mode] = DecodeEngine(model, args.tokens)
        k.set_bf16_expand(-1)
        for th in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(th)
            best, logits = alternate_steps(engines, args.reps, args.tokens)
            if not torch.equal(logits[0], logits[1]):
                raise LosaError(f"the two engines' logits differ at {sp:.0%}: a kernel bug")
            rows.append({**provenance(th, SMOLLM2 + ", float32 model, bf16 values, bf16 head copy", argv_rec),
                         "run": run, "kind": "engine step", "sparsity": sp, "reps": args.reps,
                         "tokens": args.tokens, "default_expand16": default16, "widen_ms": best[0] * 1e3,
                         "expand16_ms": best[1] * 1e3})
            print(f"{th} thr engine {sp:.0%}: widen first {best[0] * 1e3:.2f} ms, vpexpandw first "
                  f"{best[1] * 1e3:.2f} ms ({best[0] / best[1]:.2f}x)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--engine", action="store_true", help="also time SmolLM2 decode steps with the decode engine")
    ap.add_argument("--tokens", type=int, default=128, help="decode steps per engine timing")
    ap.add_argument("--out", default=str(RESULTS / "bf16_expand.jsonl"))
    args = ap.parse_args(argv)
    k = _kernel.load_kernel()
    if k is None or _kernel.best_isa() != 2:
        raise LosaError("this benchmark times the AVX-512 loop: it needs the compiled kernel at the avx512 level")
    if args.reps < 1:
        raise LosaError(f"--reps must be at least 1, got {args.reps}")
    run = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M UTC")
    argv_rec = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    load_start = os.getloadavg()
    default16 = bool(k.bf16_expand16())
    gen = torch.Generator().manual_seed(0)
    rows = []
    try:
        for th in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(th)
            for name, n, kk, copies in SHAPES:
                for sp in (float(s) for s in args.sparsities.split(",")):
                    layers = []
                    for _ in range(copies):
                        w = torch.randn(n, kk, generator=gen)
                        cut = w.abs().kthvalue(int(sp * kk), dim=1, keepdim=True).values
                        layers.append(SparseLinear.from_dense(w * (w.abs() > cut), value_dtype="bfloat16",
                                                              fmt="bitmask"))
                    x = torch.randn(1, kk, generator=gen)
                    best, outs = {0: float("inf"), 1: float("inf")}, {}
                    for _ in range(args.reps):
                        for mode in (0, 1):
                            k.set_bf16_expand(mode)
                            t = time.perf_counter()
                            for layer in layers:
                                y = k.spmm(x, layer.meta, layer.values, layer.row_ptr, None, n, kk,
                                           FORMAT_CODES["bitmask"], 2)
                            best[mode] = min(best[mode], (time.perf_counter() - t) / copies)
                            outs[mode] = y
                    if not torch.equal(outs[0], outs[1]):
                        raise LosaError(f"the two expansions disagree on {name} at {sp:.0%}: a kernel bug")
                    rows.append({**provenance(th, f"random weights, {name} shape", argv_rec), "run": run,
                                 "layer": name, "out": n, "in": kk, "sparsity": sp, "reps": args.reps,
                                 "default_expand16": default16, "widen_us": best[0] * 1e6,
                                 "expand16_us": best[1] * 1e6})
                    print(f"{th} thr {name} {sp:.0%}: widen first {best[0] * 1e6:.0f} us, vpexpandw first "
                          f"{best[1] * 1e6:.0f} us ({best[0] / best[1]:.2f}x)", flush=True)
        if args.engine:
            rows += engine_rows(args, run, argv_rec, default16)
    finally:
        k.set_bf16_expand(-1)
    append_rows(rows, load_start, Path(args.out), render)  # stamps the load averages, appends, renders
    return 0


if __name__ == "__main__":
    sys.exit(main())
