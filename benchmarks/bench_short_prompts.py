"""Short prompts through a sparse SmolLM2 on a CPU with AMX: the AMX tiles kernel against the paths before it.

A prompt of N tokens runs every linear of the model on N rows. On CPUs with AMX-BF16 the sparse layers of a bf16
model take N = 5-128 rows (5-256 on small layers, as all of SmolLM2's are) through the AMX tiles kernel
(``amx_mm_bf16``); before it they took the row loop up to 12 rows (16 on small layers) and decompressed tiles +
torch's bf16 GEMM above. This times
the whole prompt forward (``model(ids, logits_to_keep=1)``, no cache) of SmolLM2-135M-Instruct (dequantised from
Q4_1, cast to bf16), interleaved, median of ``--reps``:

* ``dense``: the dense bf16 model (torch's bf16 GEMMs: oneDNN on AMX; the float32 model with ``--model-dtype float32``);
* ``S% amx``: pruned to S % (magnitude per output row; the speed depends on the sparsity, not on which weights)
  and ``sparsify_for_inference(value_dtype="bfloat16")``, as ``losa generate`` runs it here;
* ``S% no amx``: the same model with the AMX kernel switched off (``kernel.amx_available`` patched to False), i.e.
  the dispatch of an AVX512-BF16 CPU without AMX.

``--model-dtype float32`` times a float32 model instead (the dense float32 model is the baseline) whose sparse layers
keep bf16 values and run prompts through a bf16 GEMM (``prefill_dtype="bfloat16"``, ``losa generate --dtype float32
--prefill-dtype bfloat16``): its prompts above the float32 row loop's threshold take the AMX kernel too.

``--batches B,...`` adds batched greedy generation, the other use of small batches: ``model.generate`` of B
copies of a 16-token prompt, ``--new-tokens`` new tokens each (every decode step multiplies B rows; the time
includes the prompt forward of 16 B rows), same modes, interleaved, median of ``--batch-reps``.

``x dense`` = dense ms / mode ms; ``amx gain`` = no-amx ms / amx ms. Rows go to results/short_prompts.jsonl,
rendered to short_prompts.md. Needs a CPU with AMX-BF16. Run: ``python benchmarks/bench_short_prompts.py``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import SMOLLM2, provenance  # noqa: E402
from _rows import load_sentence, read_jsonl, run_sections  # noqa: E402
from bench_decode import append_rows, prune_magnitude  # noqa: E402

import losa  # noqa: E402
from losa.errors import LosaError  # noqa: E402
from losa.inference import kernel as _kernel  # noqa: E402
from losa.inference import sparsify_for_inference  # noqa: E402
from losa.utils.io import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def size(row: dict) -> str:
    """The prompt length, or ``B x T`` (batch, new tokens) for a batched-generation row."""
    return str(row["tokens"]) if row.get("kind", "prompt") == "prompt" else f"{row['batch']} x {row['new_tokens']}"


def render(src: Path, dst: Path) -> None:
    """Write the markdown of every row in ``src`` to ``dst``."""
    out = ["# Short prompts through a sparse SmolLM2: the AMX tiles kernel vs the paths before it", "",
           "Written by `benchmarks/bench_short_prompts.py` (see its docstring): one prompt forward of N tokens "
           "(no cache, logits of the last token), modes interleaved, medians. `x dense` = the dense model's ms (same "
           "dtype as the sparse one: see each section's model) / mode ms; "
           "`amx gain` = the same sparse model's ms with the AMX kernel switched off / with it. `batch decode` rows: "
           "greedy `generate` of B copies of a 16-token prompt, T new tokens each (prompt forward included).", ""]
    for title, where, rs in run_sections(read_jsonl(src)):
        out += [title, "", f"{where}. Model: {rs[0]['model']}.{load_sentence(rs[0])}", ""]
        for kind, head in (("prompt", "tokens"), ("batch decode", "batch x new tokens")):
            sel = [r for r in rs if r.get("kind", "prompt") == kind]
            if not sel:
                continue
            out += [f"{kind}:", "", f"| threads | {head} | dense ms | sparsity | amx ms | no amx ms | amx x dense | "
                    "no amx x dense | amx gain |", "|---|---|---|---|---|---|---|---|---|"]
            out += [f"| {r['threads']} | {size(r)} | {r['dense_ms']:.2f} | {r['sparsity']:.0%} | {r['amx_ms']:.2f} | "
                    f"{r['no_amx_ms']:.2f} | {r['dense_ms'] / r['amx_ms']:.2f}x | {r['dense_ms'] / r['no_amx_ms']:.2f}x | "
                    f"{r['no_amx_ms'] / r['amx_ms']:.2f}x |" for r in sel]
            out.append("")
    atomic_write_text(dst, "\n".join(out))


def time_modes(modes: dict[str, tuple[torch.nn.Module, bool]], call, reps: int, no_amx) -> dict[str, float]:
    """Median ms of ``call(model)`` per mode over ``reps`` interleaved rounds after one warm-up round; modes whose
    flag is set run with ``no_amx`` (the patch that switches the AMX kernel off) started."""
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(reps + 1):  # the first round warms up
        for name, (m, off) in modes.items():
            if off:
                no_amx.start()
            try:
                t = time.perf_counter()
                call(m)
                times[name].append(time.perf_counter() - t)
            finally:
                if off:
                    no_amx.stop()
    return {name: statistics.median(v[1:]) * 1e3 for name, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", default="8,16,32,64,128", help="prompt lengths")
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--batches", default="", help="batch sizes of batched generation, e.g. 4,8,16 (default: none)")
    ap.add_argument("--new-tokens", type=int, default=16, help="new tokens per sequence in batched generation")
    ap.add_argument("--batch-reps", type=int, default=5)
    ap.add_argument("--model-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="bfloat16: a bf16 model; float32: a float32 model with bf16 values and a bf16 prompt GEMM")
    ap.add_argument("--out", default=str(RESULTS / "short_prompts.jsonl"))
    args = ap.parse_args(argv)
    if args.reps < 1 or args.batch_reps < 1 or args.new_tokens < 1:
        raise LosaError("--reps, --batch-reps and --new-tokens must be at least 1")
    if not _kernel.amx_available():
        raise LosaError("this benchmark compares the AMX kernel with the paths before it: it needs a CPU with AMX-BF16 "
                        "(and no LOSA_SPARSE_ISA below avx512)")
    run = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M UTC")
    load_start = os.getloadavg()
    argv_rec = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    base, _tok = losa.load_model("smollm2-135m")
    f32 = args.model_dtype == "float32"
    base = (base.float() if f32 else base.to(torch.bfloat16)).eval()
    model_id = SMOLLM2 + (", float32 model, bf16 values, bf16 prompt GEMM" if f32 else ", bf16")
    sparse = {}
    for sp in (float(s) for s in args.sparsities.split(",")):
        m = copy.deepcopy(base)
        prune_magnitude(m, sp)
        sparsify_for_inference(m, value_dtype="bfloat16", prefill_dtype="bfloat16" if f32 else "float32")
        sparse[sp] = m
    no_amx = mock.patch.object(_kernel, "amx_available", lambda isa=None: False)
    gen = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    modes = {"dense": (base, False)}
    for sp, m in sparse.items():
        modes[f"{sp} amx"] = (m, False)
        modes[f"{sp} no amx"] = (m, True)
    rows = []
    with torch.inference_mode():
        for th in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(th)
            work = [({"tokens": n}, args.reps, lambda m, ids=torch.randint(0, vocab, (1, n), generator=gen):
                     m(ids, use_cache=False, logits_to_keep=1)) for n in (int(t) for t in args.tokens.split(","))]
            prompt = torch.randint(0, vocab, (1, 16), generator=gen)
            work += [({"kind": "batch decode", "batch": b, "new_tokens": args.new_tokens}, args.batch_reps,
                      lambda m, ids=prompt.expand(b, -1).contiguous(): m.generate(
                          ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                          min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0))
                     for b in (int(t) for t in args.batches.split(",") if t)]
            for fields, reps, call in work:
                ms = time_modes(modes, call, reps, no_amx)
                for sp in sparse:
                    rows.append({**provenance(th, model_id, argv_rec), "run": run, "kind": "prompt",
                                 **fields, "sparsity": sp, "reps": reps, "dense_ms": ms["dense"],
                                 "amx_ms": ms[f"{sp} amx"], "no_amx_ms": ms[f"{sp} no amx"]})
                    print(f"{th} thr {size(rows[-1])} {sp:.0%}: dense {ms['dense']:.2f}  amx {ms[f'{sp} amx']:.2f}  "
                          f"no amx {ms[f'{sp} no amx']:.2f} ms", flush=True)
    append_rows(rows, load_start, Path(args.out), render)  # stamps the load averages, appends, renders
    return 0


if __name__ == "__main__":
    sys.exit(main())
