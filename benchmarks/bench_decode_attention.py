"""Decode attention of a bf16 model: torch's SDPA against losa's compiled kernel, alone and in a decode step.

A bf16 model (what ``losa generate`` picks on AVX512-BF16 CPUs) used to send its one-token attention to torch's
``scaled_dot_product_attention``; ``csrc/decode_attention.cpp`` now takes bf16 q/k/v too (float32 scores,
probabilities and sums; SDPA rounds its exponentiated scores to bf16). Two measurements, every variant interleaved in the same loop:

- ``op``: one attention call, LLaMA-7B heads (32 query / 32 KV heads of 128), cache lengths 128 / 1024 / 4096;
- ``step``: a decode step (the decoder layers, no LM head) of a random LLaMA-7B-shaped 2-layer stack in bf16,
  dense and 70 % sparse (bf16 values), after a 128- or 1024-token prompt, with transformers' ``sdpa`` and with
  :func:`losa.inference.attention.use_decode_attention`::

    python benchmarks/bench_decode_attention.py            # results/decode_attention.{jsonl,md}

Each row: kind, case, threads, SDPA ms, kernel ms and ``speed`` = SDPA ms / kernel ms, with the provenance fields.
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
from bench_inference import interleaved, llama_stack, prune_model

from losa.inference import kernel as kmod
from losa.inference import sparsify_for_inference
from losa.inference.attention import decode_attention, use_decode_attention
from losa.utils.io import atomic_write_text

HERE = Path(__file__).resolve().parent


class _Attn(torch.nn.Module):
    num_key_value_groups, is_causal = 1, True


def op_rows(reps: int) -> list[dict]:
    from losa.inference import attention

    gen, rows = torch.Generator().manual_seed(0), []
    for s in (128, 1024, 4096):
        q = torch.randn(1, 32, 1, 128, generator=gen).bfloat16()
        k, v = (torch.randn(1, 32, s, 128, generator=gen).bfloat16() for _ in range(2))
        mask = torch.ones(1, 1, 1, s, dtype=torch.bool)

        def call(isa, q=q, k=k, v=v, mask=mask):
            attention._KERNEL["isa"] = isa
            return decode_attention(_Attn(), q, k, v, mask)

        ms = {k: t * 1e3 for k, t in interleaved({"sdpa": lambda c=call: c(None),
                                                  "kernel": lambda c=call: c(kmod.best_isa())}, reps).items()}
        rows.append({"kind": "op", "case": f"32 heads x 128, cache {s}", "sdpa_ms": ms["sdpa"],
                     "kernel_ms": ms["kernel"]})
    return rows


def step_rows(reps: int, prompts: tuple[int, ...]) -> list[dict]:
    base = llama_stack(2, vocab=32000).to(torch.bfloat16)
    models = {"dense bf16": base}
    sparse = copy.deepcopy(base)
    prune_model(sparse, "70%")
    sparsify_for_inference(sparse, value_dtype="bfloat16")
    models["70% bf16"] = sparse
    rows = []
    for name, m in models.items():
        lean = copy.deepcopy(m)
        assert use_decode_attention(lean), "the stack does not use sdpa"
        for prompt in prompts:
            ids = torch.randint(5, 1000, (1, prompt), generator=torch.Generator().manual_seed(prompt))
            with torch.inference_mode():
                caches = {k: mm.model(ids, use_cache=True).cache for k, mm in (("sdpa", m), ("kernel", lean))}
                nxt = ids[:, -1:]

                def step(mm, past, nxt=nxt):
                    out = mm.model(nxt, cache=past, use_cache=True)
                    past.crop(-1)  # drop the new position: the same cache length at every call
                    return out

                ms = {k: t * 1e3 for k, t in interleaved({"sdpa": lambda mm=m, c=caches["sdpa"]: step(mm, c),
                                                          "kernel": lambda mm=lean, c=caches["kernel"]: step(mm, c)},
                                                         reps).items()}
            rows.append({"kind": "step", "case": f"{name}, 2 layers, cache {prompt}", "sdpa_ms": ms["sdpa"],
                         "kernel_ms": ms["kernel"]})
    return rows


def render(src: Path, dst: Path) -> None:
    rows = read_jsonl(src)
    out = ["# Decode attention of a bf16 model: torch's SDPA vs losa's kernel", "",
           "Written by `benchmarks/bench_decode_attention.py`. `op`: one attention call, LLaMA-7B heads (32 x 128), "
           "one query token; `step`: a decode step (decoder layers, no LM head) of a random LLaMA-7B-shaped 2-layer "
           "bf16 stack with transformers' `sdpa` vs `use_decode_attention`, the cache cropped back to the prompt "
           "length after every call. Medians of interleaved calls; `speed` = SDPA ms / kernel ms.", ""]
    for title, where, rs in run_sections(rows):
        out += [title, "", f"{where}.", "",
                "| kind | case | threads | SDPA ms | kernel ms | speed |", "|---|---|---|---|---|---|"]
        out += [f"| {r['kind']} | {r['case']} | {r['threads']} | {r['sdpa_ms']:.3f} | {r['kernel_ms']:.3f} | "
                f"{r['sdpa_ms'] / r['kernel_ms']:.2f}x |" for r in rs]
        out.append("")
    atomic_write_text(dst, "\n".join(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--reps", type=int, default=20, help="interleaved calls per case (default 20)")
    ap.add_argument("--prompts", default="128,1024", help="cache lengths of the decode steps (default 128,1024)")
    ap.add_argument("--out", default=str(HERE / "results" / "decode_attention.jsonl"))
    args = ap.parse_args(argv)
    if kmod.load_kernel() is None or kmod.decode_attn_op() is None:
        raise SystemExit("the compiled kernel does not build here: nothing to compare; install a C++ compiler")
    started, rows = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for r in [*op_rows(args.reps),
                  *step_rows(args.reps, tuple(int(p) for p in args.prompts.split(",")))]:
            rows.append({**provenance(threads, model="random LLaMA-7B-shaped bf16 stack"), "run": started, **r})
            print(f"{threads} thr {r['kind']} {r['case']}: {r['sdpa_ms'] / r['kernel_ms']:.2f}x", flush=True)
    save_rows(Path(args.out), rows, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
