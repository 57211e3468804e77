"""Decode steps of SmolLM2-135M after a long context: the decode engine's KV cache on 4 KiB pages vs huge pages.

Every decode step reads the whole filled part of the KV cache, as it reads a weight; after 4096 positions that is
about as many bytes as SmolLM2's sparse weights. The engine allocates its cache in transparent-huge-page memory
where ``LOSA_HUGEPAGES`` is on (the default). This builds two decode engines of the same pruned model (magnitude
per output row, bf16 values, bf16 LM head; timing only), the first with ``LOSA_HUGEPAGES=0`` while it allocates its
cache (torch's 4 KiB pages; the model's weights are on huge pages in both), and times ``--tokens`` steps at positions
``--context`` onwards with each, alternating, best of ``--reps`` (``_engine_ab.alternate_steps``; the positions below
hold zeros, which cost the attention the same reads as a real context)::

    python benchmarks/bench_kv_cache.py                      # 70 %, contexts 1024 and 4096, 1 and 2 threads
    LOSA_SPARSE_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_kv_cache.py   # the AVX2 loops

Models: float32 (a float32 cache), and bf16 (a bf16 cache) on CPUs with AVX512-BF16. Rows go to
results/kv_cache.jsonl, rendered to kv_cache.md: threads, model dtype, sparsity, cached positions, the cache bytes
a step reads, ms per step in each memory, and ``speed`` = 4 KiB / huge pages (above 1: huge pages faster).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _engine_ab import alternate_steps  # noqa: E402
from _provenance import SMOLLM2, provenance  # noqa: E402
from _rows import load_sentence, read_jsonl, run_sections  # noqa: E402
from bench_decode import append_rows, prune_magnitude  # noqa: E402
from bench_lm_head import _thp_sentence, thp_mode  # noqa: E402

from losa.errors import LosaError  # noqa: E402
from losa.inference import kernel as _kernel  # noqa: E402
from losa.utils.io import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def render(src: Path, dst: Path) -> None:
    """Write the markdown of every row in ``src`` to ``dst``."""
    out = ["# Decode steps of SmolLM2-135M after a long context: the KV cache on 4 KiB pages vs huge pages", "",
           "Written by `benchmarks/bench_kv_cache.py` (see its docstring): two decode engines of the same pruned "
           "model, alternating, best time per step; they differ only in where their KV cache lives. `cache MB` = "
           "the keys and values a step reads at that context. `speed` = 4 KiB / huge pages (above 1: huge pages "
           "faster).", ""]
    for title, where, rs in run_sections(read_jsonl(src)):
        out += [title, "", f"{where}.{load_sentence(rs[0])}{_thp_sentence(rs[0])}", "",
                "| threads | model | sparsity | cached positions | cache MB | 4 KiB ms/step | huge pages ms/step | "
                "speed |", "|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['threads']} | {r['model_dtype']} | {r['sparsity']:.0%} | {r['context']} | {r['cache_mb']:.0f} | "
                f"{r['small_ms']:.2f} | {r['huge_ms']:.2f} | {r['small_ms'] / r['huge_ms']:.2f}x |" for r in rs]
        out.append("")
    atomic_write_text(dst, "\n".join(out))


def engines_for(model: torch.nn.Module, max_len: int) -> dict[str, object]:
    """Two decode engines of ``model``: the KV cache on torch's 4 KiB pages, and on huge pages (checked)."""
    from losa.inference.engine import DecodeEngine

    before = os.environ.get("LOSA_HUGEPAGES")
    try:
        os.environ["LOSA_HUGEPAGES"] = "0"
        small = DecodeEngine(model, max_len)
        os.environ["LOSA_HUGEPAGES"] = "1"
        huge = DecodeEngine(model, max_len)
    finally:
        if before is None:
            os.environ.pop("LOSA_HUGEPAGES", None)
        else:
            os.environ["LOSA_HUGEPAGES"] = before
    if huge.k_cache.nbytes < 2 << 20:
        raise SystemExit(f"error: a cache of {max_len} positions is under 2 MiB, which stays in torch's memory; "
                         "give a larger --contexts")
    if huge.k_cache.data_ptr() % (2 << 20) or huge.v_cache.data_ptr() % (2 << 20):
        raise LosaError("the second engine's KV cache is not in huge-page memory (not Linux?): nothing to compare")
    if small.k_cache.data_ptr() % (2 << 20) == 0 and not os.environ.get("THP_MEM_ALLOC_ENABLE"):
        raise LosaError("the first engine's KV cache is 2 MiB-aligned: not torch's 4 KiB pages")
    return {"4 KiB": small, "huge pages": huge}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="1024,4096", help="cached positions before the timed steps")
    ap.add_argument("--sparsities", default="0.7")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per engine and round")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "kv_cache.jsonl"))
    args = ap.parse_args(argv)
    try:
        contexts = [int(c) for c in args.contexts.split(",")]
        sparsities = [float(s) for s in args.sparsities.split(",")]
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError as exc:
        raise SystemExit(f"error: --contexts, --sparsities and --threads are comma-separated numbers ({exc})") from None
    if args.reps < 1 or args.tokens < 1 or min(contexts) < 0:
        raise SystemExit("error: --reps and --tokens must be at least 1 and --contexts at least 0")
    if _kernel.load_kernel() is None:
        raise SystemExit("error: the decode engine needs the compiled kernel (a C++ compiler and ninja)")
    import losa
    from losa.inference import sparsify_for_inference
    from losa.inference.decode import set_lm_head_dtype

    run = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M UTC")
    argv_rec = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    load_start = os.getloadavg()
    base, _tok = losa.load_model("smollm2-135m")
    cfg = base.config
    dtypes = [torch.float32] + ([torch.bfloat16] if _kernel.native_bf16() else [])
    rows = []
    for sp in sparsities:
        for dtype in dtypes:
            model = copy.deepcopy(base)
            prune_magnitude(model, sp)
            sparsify_for_inference(model, value_dtype="bfloat16")
            model = model.to(dtype)
            set_lm_head_dtype(model, "bfloat16")
            engines = engines_for(model, max(contexts) + args.tokens)
            name = str(dtype).replace("torch.", "")
            for ctx in contexts:
                # keys and values of every layer's KV heads at the context's midpoint of the timed steps
                mb = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (ctx + args.tokens // 2)
                      * (cfg.hidden_size // cfg.num_attention_heads) * dtype.itemsize / 1e6)
                for th in threads:
                    torch.set_num_threads(th)
                    best, logits = alternate_steps(engines, args.reps, args.tokens, start=ctx)
                    if not torch.equal(logits["4 KiB"], logits["huge pages"]):
                        raise LosaError(f"the two engines' logits differ at {sp:.0%}, {ctx} positions")
                    rows.append({**provenance(th, f"{SMOLLM2}, {name} model, bf16 values, bf16 head", argv_rec),
                                 "run": run, "model_dtype": name, "sparsity": sp, "context": ctx, "cache_mb": mb,
                                 "thp": thp_mode(), "reps": args.reps, "tokens": args.tokens,
                                 "small_ms": best["4 KiB"] * 1e3, "huge_ms": best["huge pages"] * 1e3})
                    print(f"{th} thr {name} {sp:.0%} ctx {ctx}: 4 KiB {best['4 KiB'] * 1e3:.2f} ms, huge pages "
                          f"{best['huge pages'] * 1e3:.2f} ms ({best['4 KiB'] / best['huge pages']:.2f}x)", flush=True)
            del engines, model
    append_rows(rows, load_start, Path(args.out), render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
