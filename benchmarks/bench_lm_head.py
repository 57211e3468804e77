"""A bf16 model's LM head at batch 1: torch's bf16 ``F.linear`` against losa's dense AVX512-BF16 row loop.

A bf16 model decodes one token per step, so its LM head (the largest matrix of a small model: SmolLM2-135M's
49152 x 576 is 40 % of the bytes a 70 % sparse step reads) is a matrix-vector product. This times, on the
head shapes of real models (random bf16 weights: the speed does not depend on the values), interleaved
(every other round in reverse order), median of ``--reps``:

* ``torch``: ``F.linear`` on the bf16 weight (what a bf16 model's ``nn.Linear`` head runs);
* ``in place``: the kernel's dense bf16 row loop over the same weight, no copy (``dense_gemv_bf16``: what the
  decode engine runs for a bf16 model's head, and :class:`~losa.inference.decode.BF16LMHead`'s one-row calls
  on heads narrower than ``KERNEL_HEAD_MAX_IN`` inputs, a cut taken from these rows);
* ``packed copy``: the sparse row loop over a packed copy with every weight kept (the decode engine's head of
  a bf16 model before it read the weight in place; one metadata bit per weight more);
* ``huge pages``: the ``in place`` loop over a copy of the weight in transparent-huge-page memory (the kernel's
  ``hugepage_copy``), where :class:`~losa.inference.decode.BF16LMHead` keeps the weight (``LOSA_HUGEPAGES``,
  default on); ``in place`` reads torch's own memory (4 KiB pages).

``speed`` = torch ms / in-place ms (both on torch's memory); ``vs 4 KiB`` = in-place ms / huge-pages ms;
``GB/s`` = the weight's bytes / time; ``max rel err`` = the largest error
of the in-place logits against a float64 product of the same bf16 values, over the largest logit (the logits
are rounded to bf16 like ``F.linear``'s, so up to about 2^-8 of a logit). Rows go to
results/lm_head.jsonl, rendered to lm_head.md. Needs a CPU with AVX512-BF16. Run:
``python benchmarks/bench_lm_head.py``.

``--inputs float32`` times a float32 model's head instead (any CPU; ``LOSA_SPARSE_ISA`` picks the kernel's level):

* ``torch``: ``F.linear`` on the float32 weight (the head as loaded);
* ``in place``: the kernel's dense row loop over the bf16 copy of :class:`~losa.inference.decode.BF16LMHead`
  with float32 inputs (``dense_gemv_f32x``: the decode engine's head, and the copy's one-row calls);
* ``packed copy``: the sparse row loop over the same copy as packed (what both ran before);
* ``huge pages``: the ``in place`` loop over the copy in huge-page memory (where the module keeps it).

``max rel err`` is then against a float64 product of the bf16-rounded weights and the float32 inputs. Rows go to
results/lm_head_f32.jsonl, rendered to lm_head_f32.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance  # noqa: E402
from _rows import load_sentence, read_jsonl, run_sections  # noqa: E402
from bench_decode import append_rows  # noqa: E402

from losa.errors import LosaError  # noqa: E402
from losa.inference import kernel as _kernel  # noqa: E402
from losa.inference.decode import BF16LMHead  # noqa: E402
from losa.inference.formats import FORMAT_CODES, pack_dense  # noqa: E402
from losa.utils.io import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: (model whose LM head shape is timed, vocabulary V, hidden size H): the head is W [V, H]
SHAPES = (("SmolLM2-135M", 49152, 576), ("Qwen2-0.5B", 151936, 896), ("LLaMA-2-7B", 32000, 4096),
          ("Gemma-2B", 256000, 2048))


def _opt(row: dict, key: str, fmt: str) -> str:
    """``fmt`` of ``row[key]``, or blank for rows from before that column."""
    return fmt.format(row[key]) if key in row else ""


def render(src: Path, dst: Path) -> None:
    """Write the markdown of every row in ``src`` to ``dst``."""
    f32 = read_jsonl(src)[0].get("inputs") == "float32"
    out = [("# A float32 model's LM head at batch 1: torch's float32 F.linear vs losa's dense row loop over the "
            "bf16 copy" if f32 else
            "# A bf16 model's LM head at batch 1: torch's bf16 F.linear vs losa's dense AVX512-BF16 row loop"), "",
           "Written by `benchmarks/bench_lm_head.py` (see its docstring): random weights in the head shapes "
           f"of the named models, one {'float32' if f32 else 'bf16'} input row, the variants interleaved (every "
           "other round in reverse order since the huge-pages column came in), medians. "
           "`speed` = torch / in place (above 1: the kernel is faster); `vs packed` = packed copy / in place; "
           "`vs 4 KiB` = in place (torch's memory, 4 KiB pages) / the same loop on huge pages (blank: not timed)."
           + (" `in place` = the dense row loop over the head's bf16 copy; `MB` and `GB/s` count that copy's "
              "bytes." if f32 else ""), ""]
    for title, where, rs in run_sections(read_jsonl(src)):
        load = load_sentence(rs[0])
        out += [title, "", f"{where}.{load}", "",
                "| threads | head shape (model) | MB | torch ms | in place ms | packed copy ms | huge pages ms | "
                "in place GB/s | speed | vs packed | vs 4 KiB | max rel err |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['threads']} | {r['vocab']} x {r['hidden']} ({r['head_of']}) | {r['mb']:.0f} | "
                f"{r['torch_ms']:.2f} | {r['in_place_ms']:.2f} | {r['packed_ms']:.2f} | "
                f"{_opt(r, 'huge_ms', '{:.2f}')} | {r['mb'] / r['in_place_ms']:.1f} | {r['speed']:.2f}x | "
                f"{r['vs_packed']:.2f}x | {_opt(r, 'vs_4k', '{:.2f}x')} | {r['max_rel_err']:.1e} |" for r in rs]
        out.append("")
    atomic_write_text(dst, "\n".join(out))


def time_shape(model: str, vocab: int, hidden: int, threads: list[int], reps: int, meta: dict,
               f32: bool = False) -> list[dict]:
    """Time the three variants on one head shape ``[vocab, hidden]`` (see the module docstring); one row per
    thread count. ``meta`` holds the run's ``run`` stamp and ``argv``; ``f32``: a float32 model's head."""
    k, isa = _kernel.load_kernel(), _kernel.best_isa()
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(vocab, hidden, generator=gen) * 0.02).to(torch.float32 if f32 else torch.bfloat16)
    x = torch.randn(1, hidden, generator=gen).to(weight.dtype)
    head = torch.nn.Linear(hidden, vocab, bias=False, dtype=weight.dtype)
    head.weight.data = weight
    lean = BF16LMHead(head)  # (checks that this CPU runs the loop)
    packed = pack_dense(weight, torch.bfloat16)
    # the bf16 matrix the dense loop reads, in torch's memory (the packed values are every weight in row order)
    copy = packed.values[: vocab * hidden].view(vocab, hidden) if f32 else weight
    assert torch.equal(copy, lean.dense_copy() if f32 else lean.weight)
    huge = k.hugepage_copy(copy)  # the same values on huge pages, where BF16LMHead keeps them
    want = (x.double() @ copy.double().T).float()
    dense = ((lambda: k.dense_gemv_f32x(x, copy, None, isa)) if f32 else
             (lambda: k.dense_gemv_bf16(x, weight, None, isa).to(torch.bfloat16)))
    variants = {"torch": lambda: torch.nn.functional.linear(x, weight), "in place": dense,
                "packed": lambda: k.spmm(x, packed.meta, packed.values, packed.row_ptr, None, vocab, hidden,
                                         FORMAT_CODES["bitmask"], isa),
                "huge pages": ((lambda: k.dense_gemv_f32x(x, huge, None, isa)) if f32 else
                               (lambda: k.dense_gemv_bf16(x, huge, None, isa).to(torch.bfloat16)))}
    rows = []
    with torch.inference_mode():
        err = float((variants["in place"]().float() - want).abs().max() / want.abs().max())
        assert lean.in_place != f32
        for th in threads:
            torch.set_num_threads(th)
            times: dict[str, list[float]] = {name: [] for name in variants}
            for rep in range(reps + 1):  # the first round warms up
                # every other round in reverse order: no variant always runs right after the same one (the VM's
                # L3 is large enough to hold a head, so what ran just before matters)
                for name, fn in (list(variants.items()) if rep % 2 == 0 else list(variants.items())[::-1]):
                    t = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t)
            ms = {name: statistics.median(v[1:]) * 1e3 for name, v in times.items()}
            what = "random float32 weights (bf16 copy)" if f32 else "random bf16 weights"
            rows.append({**provenance(th, f"{what}, {model}'s LM head shape", meta["argv"]),
                         "run": meta["run"], "kernel_isa": _kernel.ISA_NAMES[isa], "head_of": model, "vocab": vocab,
                         "inputs": "float32" if f32 else "bfloat16", "hidden": hidden, "mb": copy.numel() * 2 / 1e6, "reps": reps, "torch_ms": ms["torch"],
                         "in_place_ms": ms["in place"], "packed_ms": ms["packed"], "huge_ms": ms["huge pages"],
                         "speed": ms["torch"] / ms["in place"], "vs_packed": ms["packed"] / ms["in place"],
                         "vs_4k": ms["in place"] / ms["huge pages"],
                         "max_rel_err": err})
            print(f"{th} thr {model:14s} torch {ms['torch']:8.2f}  in place {ms['in place']:8.2f}  "
                  f"packed {ms['packed']:8.2f}  huge pages {ms['huge pages']:8.2f} ms  speed {rows[-1]['speed']:.2f}x  "
                  f"vs 4 KiB {rows[-1]['vs_4k']:.2f}x", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--inputs", choices=("bfloat16", "float32"), default="bfloat16",
                    help="bfloat16: a bf16 model's head; float32: a float32 model's head and its bf16 copy")
    ap.add_argument("--out", default=None, help="default: results/lm_head.jsonl (lm_head_f32.jsonl for float32)")
    args = ap.parse_args(argv)
    f32 = args.inputs == "float32"
    out = Path(args.out) if args.out else RESULTS / ("lm_head_f32.jsonl" if f32 else "lm_head.jsonl")
    if args.reps < 1:
        raise LosaError(f"--reps must be at least 1, got {args.reps}")
    if _kernel.load_kernel() is None:
        raise LosaError("the LM head loops need the compiled kernel (a C++ compiler and ninja)")
    if not f32 and not _kernel.native_bf16():
        raise LosaError("the dense bf16 row loop needs a CPU with AVX512-BF16 (and no LOSA_SPARSE_ISA below avx512)")
    run = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M UTC")
    load_start = os.getloadavg()
    rows = []
    for model, vocab, hidden in SHAPES:
        rows += time_shape(model, vocab, hidden, [int(t) for t in args.threads.split(",")], args.reps,
                           {"run": run, "argv": [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]}, f32)
    append_rows(rows, load_start, out, render)  # stamps the load averages, appends, renders
    return 0


if __name__ == "__main__":
    sys.exit(main())
