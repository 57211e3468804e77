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

``--engine`` times whole decode steps of SmolLM2-135M-Instruct (dequantised from Q4_1, magnitude-pruned per output
row, bf16 values) instead: per sparsity and model dtype (a float32 model with its head's bf16 copy; on CPUs with
AVX512-BF16 also the bf16 model, head in place) two models built the same way except that one's head stays on
4 KiB pages (``LOSA_HUGEPAGES=0`` while its ``BF16LMHead`` is made) and the other's goes to huge pages (the
default), each decoded by its own decode engine, alternating, best of ``--reps`` (``--tokens`` steps each). The
sparse layers are on huge pages in both (with ``--all-weights``: only in the second). Rows go to results/lm_head_engine.jsonl, rendered to lm_head_engine.md.
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


def _thp_sentence(row: dict) -> str:
    """`` Transparent huge pages: MODE.`` for rows that recorded it (``thp``), else ``""``."""
    return f" Transparent huge pages: {row['thp']}." if "thp" in row else ""


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
        load = load_sentence(rs[0]) + _thp_sentence(rs[0])
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


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode (the bracketed word of /sys/kernel/mm/transparent_hugepage/enabled,
    e.g. ``madvise``), with torch's ``THP_MEM_ALLOC_ENABLE`` when set (then torch's own tensors get huge pages
    too, and the 4 KiB arms are not on 4 KiB pages); ``unknown`` off Linux."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        mode = text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        mode = "unknown"
    torch_thp = os.environ.get("THP_MEM_ALLOC_ENABLE")
    return mode + (f", THP_MEM_ALLOC_ENABLE={torch_thp}" if torch_thp else "")


def _check_huge(huge: torch.Tensor, small: torch.Tensor, what: str) -> None:
    """Refuse to time a 'huge pages' arm that is not a separate copy from hugepage_copy (2 MiB-aligned)."""
    if huge.data_ptr() == small.data_ptr() or huge.data_ptr() % (2 << 20):
        raise LosaError(f"{what} is not in huge-page memory (LOSA_HUGEPAGES=0, or not Linux): nothing to compare; "
                        "unset LOSA_HUGEPAGES")


def render_engine(src: Path, dst: Path) -> None:
    """Write the markdown of the ``--engine`` rows in ``src`` to ``dst``."""
    out = ["# Decode steps of SmolLM2-135M with the LM head on 4 KiB pages vs huge pages (the decode engine)", "",
           "Written by `benchmarks/bench_lm_head.py --engine` (see its docstring): two engines of the same pruned "
           "model, alternating, best time per step; they differ only in where the head's weight lives (with "
           "`--all-weights`: the sparse layers' packed buffers too, `pages differ for`). `speed` = "
           "4 KiB / huge pages (above 1: huge pages faster).", ""]
    for title, where, rs in run_sections(read_jsonl(src)):
        out += [title, "", f"{where}.{load_sentence(rs[0])}{_thp_sentence(rs[0])}", "",
                "| threads | model | sparsity | head | pages differ for | 4 KiB ms/step | huge pages ms/step | speed |",
                "|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['threads']} | {r['model_dtype']} | {r['sparsity']:.0%} | {r['head']} | "
                f"{r.get('pages_for', 'head')} | {r['small_ms']:.2f} | {r['huge_ms']:.2f} | "
                f"{r['small_ms'] / r['huge_ms']:.2f}x |" for r in rs]
        out.append("")
    atomic_write_text(dst, "\n".join(out))


def engine_rows(args: argparse.Namespace, run: str, argv_rec: list[str]) -> list[dict]:
    """SmolLM2 decode steps, the head on 4 KiB pages vs huge pages (see the module docstring); one row per
    sparsity, model dtype and thread count."""
    import copy

    from _engine_ab import alternate_steps
    from _provenance import SMOLLM2
    from bench_decode import prune_magnitude

    import losa
    from losa.inference import sparsify_for_inference
    from losa.inference.decode import set_lm_head_dtype
    from losa.inference.engine import DecodeEngine

    base, _tok = losa.load_model("smollm2-135m")
    dtypes = [torch.float32] + ([torch.bfloat16] if _kernel.native_bf16() else [])
    before = os.environ.get("LOSA_HUGEPAGES")
    rows = []
    for sp in (float(s) for s in args.sparsities.split(",")):
        for dtype in dtypes:
            engines, heads = {}, {}
            for mem, env in (("4 KiB", "0"), ("huge pages", "1")):
                model = copy.deepcopy(base)
                prune_magnitude(model, sp)
                try:
                    os.environ["LOSA_HUGEPAGES"] = env if args.all_weights else "1"
                    sparsify_for_inference(model, value_dtype="bfloat16")  # else: huge pages in both
                    model = model.to(dtype)
                    os.environ["LOSA_HUGEPAGES"] = env
                    set_lm_head_dtype(model, "bfloat16")
                finally:
                    if before is None:
                        os.environ.pop("LOSA_HUGEPAGES", None)
                    else:
                        os.environ["LOSA_HUGEPAGES"] = before
                head = model.get_output_embeddings()
                heads[mem] = (head.dense_copy() if not head.in_place else head.weight).detach()
                engines[mem] = DecodeEngine(model, args.tokens)
            _check_huge(heads["huge pages"], heads["4 KiB"], "the second engine's head")
            if not args.all_weights and heads["4 KiB"].data_ptr() % (2 << 20) == 0:
                raise LosaError("the first engine's head is 2 MiB-aligned: not torch's 4 KiB pages")
            what = "in place" if head.in_place else "bf16 copy"
            for th in (int(t) for t in args.threads.split(",")):
                torch.set_num_threads(th)
                best, logits = alternate_steps(engines, args.reps, args.tokens)
                if not torch.equal(logits["4 KiB"], logits["huge pages"]):
                    raise LosaError(f"the two engines' logits differ at {sp:.0%}: the head's values changed")
                name = str(dtype).replace("torch.", "")
                rows.append({**provenance(th, f"{SMOLLM2}, {name} model, bf16 values, bf16 head ({what})",
                                          argv_rec),
                             "run": run, "kind": "engine step", "model_dtype": name, "head": what, "sparsity": sp,
                             "pages_for": "head and sparse layers" if args.all_weights else "head", "thp": thp_mode(),
                             "reps": args.reps, "tokens": args.tokens, "small_ms": best["4 KiB"] * 1e3,
                             "huge_ms": best["huge pages"] * 1e3})
                print(f"{th} thr engine {name} {sp:.0%}: 4 KiB {best['4 KiB'] * 1e3:.2f} ms, huge pages "
                      f"{best['huge pages'] * 1e3:.2f} ms ({best['4 KiB'] / best['huge pages']:.2f}x)", flush=True)
    return rows


def time_shape(model: str, vocab: int, hidden: int, threads: list[int], reps: int, meta: dict,
               f32: bool = False) -> list[dict]:
    """Time the variants on one head shape ``[vocab, hidden]`` (see the module docstring); one row per
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
    # the memory BF16LMHead holds: the copy made there, or the weight moved there (`weight` is the old storage)
    huge = (lean.dense_copy() if f32 else lean.weight).detach()
    assert torch.equal(copy, huge)
    _check_huge(huge, copy, f"{model}'s head")
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
                         "max_rel_err": err, "thp": thp_mode()})
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
    ap.add_argument("--engine", action="store_true",
                    help="time whole SmolLM2 decode steps with the head on 4 KiB pages vs huge pages instead")
    ap.add_argument("--sparsities", default="0.5,0.7", help="with --engine: the models' sparsities")
    ap.add_argument("--tokens", type=int, default=128, help="with --engine: decode steps per engine and round")
    ap.add_argument("--all-weights", action="store_true",
                    help="with --engine: the 4 KiB model's sparse layers on 4 KiB pages too (LOSA_HUGEPAGES=0)")
    ap.add_argument("--out", default=None, help="default: results/lm_head.jsonl (lm_head_f32.jsonl for float32, "
                                                "lm_head_engine.jsonl with --engine)")
    args = ap.parse_args(argv)
    f32 = args.inputs == "float32"
    if args.reps < 1 or args.tokens < 1:
        raise LosaError(f"--reps and --tokens must be at least 1, got {args.reps} and {args.tokens}")
    if _kernel.load_kernel() is None:
        raise LosaError("the LM head loops need the compiled kernel (a C++ compiler and ninja)")
    run = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M UTC")
    argv_rec = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    if args.engine:
        load_start = os.getloadavg()
        rows = engine_rows(args, run, argv_rec)
        append_rows(rows, load_start, Path(args.out) if args.out else RESULTS / "lm_head_engine.jsonl",
                    render_engine)
        return 0
    out = Path(args.out) if args.out else RESULTS / ("lm_head_f32.jsonl" if f32 else "lm_head.jsonl")
    if not f32 and not _kernel.native_bf16():
        raise LosaError("the dense bf16 row loop needs a CPU with AVX512-BF16 (and no LOSA_SPARSE_ISA below avx512)")
    load_start = os.getloadavg()
    rows = []
    for model, vocab, hidden in SHAPES:
        rows += time_shape(model, vocab, hidden, [int(t) for t in args.threads.split(",")], args.reps,
                           {"run": run, "argv": argv_rec}, f32)
    append_rows(rows, load_start, out, render)  # stamps the load averages, appends, renders
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LosaError as exc:  # bad input or a machine that cannot run it: one line, no traceback
        sys.exit(f"bench_lm_head.py: {exc}")
