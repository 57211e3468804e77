"""Per-token decode time of SmolLM2-135M: dense, the sparse runtime before, and the lean decode path.

Modes (each a separate copy of the model, timed interleaved: every repetition runs every mode once):

* ``dense fp32``: the unpruned float32 model, ``model.generate`` (dynamic cache, transformers' ``sdpa`` attention).
* ``sparse before``: pruned, ``sparsify_for_inference(value_dtype="bfloat16")``, float32 LM head, plain
  ``model.generate`` (what ``losa generate`` did before the lean path; no decode plans).
* ``lean bf16 head``: as before plus the bf16 LM head copy (``--lm-head-dtype bfloat16``) and the layers'
  decode plans (:class:`LeanDecoder` fixes each layer's row-loop dispatch once) and losa's decode attention, eager.
* ``lean bf16 head + static + compile``: plus a static KV cache and the compiled decode step (``--compile``).
* ``lean bf16 head + engine``: the lean model decoded by the C++ decode engine (:mod:`losa.inference.engine`,
  ``--decode-engine auto``, the default of ``losa generate``): the prompt through the model, then one engine call
  per token. Every other lean mode is timed with the engine off (``decode_engine="off"``).
* ``bf16 model + engine`` (on CPUs with AVX512-BF16, where ``losa generate --dtype auto`` picks a bf16 model):
  the model cast to bf16, pruned, bf16 values, decoded by the engine (bf16 inputs into the AVX512-BF16 loops:
  the sparse ones, and the dense one over the bf16 LM head's own weight; earlier rows: a packed copy of the head).
* ``dense fp32 + engine`` (``--with-dense-engine``): the dense model decoded by the engine (float32 weights).
* ``..., generate loop`` (``--with-generate-loop``): the engine modes with Hugging Face ``generate``'s token loop
  around the engine steps instead of the engine's own loop (:mod:`losa.inference.engine_loop`, what every
  ``+ engine`` mode runs since it exists), for the before/after; the same model as the mode without the suffix.
* ``..., unplanned`` (``--with-unplanned``): the lean modes without the decode plans, for the before/after.
* ``..., sdpa attention`` (``--with-sdpa``): the lean modes with transformers' ``sdpa`` attention instead of
  losa's decode attention (:mod:`losa.inference.attention`, which every lean mode uses), for the before/after.
* ``..., attention products`` (``--with-attention-products``): the lean modes with the decode attention's float32
  step as two torch matrix products instead of the compiled kernel (``csrc/decode_attention.cpp``), for the
  before/after (the switch is a module setting, applied around each of these modes' runs).
* ``..., python wrapper`` (``--with-python-wrapper``): the compiled lean mode with Inductor's generated Python
  wrapper instead of its C++ wrapper (``--compile-wrapper python``; every other compiled mode uses the C++ one).
* ``overhead only + static + compile`` (``--with-overhead``): the compiled lean mode with every sparse linear and
  the LM head replaced by a module that returns zeros: what a decoded token costs outside the weight-streaming
  layers (norms, rotary, attention, KV cache, ``generate``); the difference to the compiled mode is the time in
  the sparse linears and the head. Its tokens are meaningless (``same`` is left blank).

Pruning is magnitude per output row (timing only: the kernels' speed depends on the sparsity, not on which
weights are kept). Greedy, a fixed prompt, exactly ``--tokens`` new tokens, best of ``--reps``. The bandwidth
floor is the bytes one decoded token streams (packed sparse linears, LM head) over the read bandwidth measured
as in bench_inference.py, before the timings and again after every repetition of each thread count, the best
taken (the VM's speed swings within a run; the best time of each mode pairs with the best bandwidth); rows with
``bandwidth_GBps_lowest`` (the ``GB/s low`` column) were measured so, earlier rows once, before the timings.
Rows are appended to benchmarks/results/decode.jsonl and decode.md is rendered from all
rows. Run: ``PYTHONPATH=src python benchmarks/bench_decode.py``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance  # noqa: E402
from _rows import read_jsonl, save_rows  # noqa: E402

from losa.errors import LosaError  # noqa: E402
from losa.inference import SparseLinear, sparsify_for_inference  # noqa: E402
from losa.inference import kernel as _kernel  # noqa: E402
from losa.inference.decode import BF16LMHead, LeanDecoder, set_lm_head_dtype  # noqa: E402
from losa.pruning.masks import unstructured_mask  # noqa: E402
from losa.utils.io import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "SmolLM2-135M-Instruct, dequantised from Q4_1"
PROMPT = "The history of the city of London"


def bandwidth(threads: int, reps: int = 5) -> float:
    """Read bandwidth in GB/s: best of ``reps`` ``sum`` over a 512 MiB float32 buffer (as bench_inference.py).

    Args:
        threads: torch threads.
        reps: repetitions.

    Returns:
        GB/s.
    """
    torch.set_num_threads(threads)
    buf = torch.ones(128 * 2**20)
    buf.sum()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best / 1e9


def prune_magnitude(model: torch.nn.Module, sparsity: float) -> None:
    """Zero the smallest-magnitude ``sparsity`` of every decoder linear, per output row (in place)."""
    with torch.no_grad():
        for layer in model.model.layers:
            for mod in layer.modules():
                if isinstance(mod, torch.nn.Linear):
                    mod.weight.mul_(unstructured_mask(mod.weight.abs(), sparsity, per_row=True))


def bytes_per_token(model: torch.nn.Module) -> int:
    """Weight bytes one decoded token streams: every linear (packed where sparse) and the LM head."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, SparseLinear):
            total += mod.packed.nbytes()
        elif isinstance(mod, BF16LMHead):  # its bf16 weight or copy, read as a dense matrix (rows before
            # commit add11df also counted the copy's metadata, one bit per weight, which its packed loop read)
            total += mod.out_features * mod.in_features * 2
        elif isinstance(mod, torch.nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
    return total


def unplanned(decoder: LeanDecoder) -> LeanDecoder:
    """``decoder`` with its layers' decode plans removed (every call takes the full Python dispatch)."""
    for mod in decoder.model.modules():
        if hasattr(mod, "decode_plan"):
            mod.decode_plan = None
    return decoder


@torch.library.custom_op("losa_bench::zeros_out", mutates_args=())
def zeros_out(x: torch.Tensor, out_features: int) -> torch.Tensor:
    """Zeros ``[*x.shape[:-1], out_features]`` as an op that ``torch.compile`` cannot see into.

    A plain ``x.new_zeros(...)`` lets Inductor treat the layer's output as a constant and eliminate everything
    that only feeds it (norms, rotary, attention: the compiled overhead-only step then measured almost nothing);
    through an opaque op that reads ``x``, the step keeps all of its work except the weight layers'.
    """
    return x.new_zeros(*x.shape[:-1], out_features)


@zeros_out.register_fake
def _(x: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class _Zeros(torch.nn.Module):
    """Stands in for a weight layer in the overhead-only mode: zeros of the layer's output shape (opaque op)."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return zeros_out(x, self.out_features)


def zero_weight_layers(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every :class:`SparseLinear` and :class:`BF16LMHead` replaced by :class:`_Zeros` (in place)."""
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, (SparseLinear, BF16LMHead)):
                setattr(mod, name, _Zeros(child.out_features))
    return model


def build_modes(base: torch.nn.Module, sparsities: list[float], compile_step: bool,
                with_unplanned: bool = False, with_overhead: bool = False,
                with_sdpa: bool = False, with_python_wrapper: bool = False,
                with_attention_products: bool = False, engine: bool = True,
                with_dense_engine: bool = False, with_generate_loop: bool = False,
                keep: Callable[[str], object] | None = None) -> dict[str, dict]:
    """The models to time: name -> {"model", "decoder", "sparsity", "bytes"} (and "overhead": True for the
    overhead-only mode). With ``keep``, only the modes whose name it accepts are built (``--only``): the pruned
    models behind the others are not made either."""
    want = keep or (lambda name: True)
    modes: dict[str, dict] = {}
    # dense and "sparse before" are plain transformers generate: sdpa attention, no decode plans, no engine
    if want("dense fp32"):
        modes["dense fp32"] = {"model": base, "sparsity": 0.0,
                               "decoder": LeanDecoder(base, decode_attention=False, decode_engine="off")}
    if with_dense_engine and want("dense fp32 + engine"):
        dense = copy.deepcopy(base)
        modes["dense fp32 + engine"] = {"model": dense, "decoder": LeanDecoder(dense), "sparsity": 0.0}
    for sp in sparsities:
        tag = f"{round(sp * 100)}%"

        @functools.lru_cache(maxsize=1)
        def pruned_model(sp: float = sp) -> torch.nn.Module:  # built once, when a kept mode needs it
            m = copy.deepcopy(base)
            prune_magnitude(m, sp)
            sparsify_for_inference(m, value_dtype="bfloat16")
            return m

        lean = [("", False)] + ([(" + static + compile", True)] if compile_step else [])
        if want(f"{tag} sparse before"):
            pruned = pruned_model()
            modes[f"{tag} sparse before"] = {
                "model": pruned, "decoder": unplanned(LeanDecoder(pruned, decode_attention=False, decode_engine="off")),
                "sparsity": sp}
        for suffix, comp in lean:
            # (name suffix, drop the decode plans, decode attention, compile wrapper, attention as torch products)
            variants = ([("", False, True, "cpp", False)]
                        + ([(", unplanned", True, True, "cpp", False)] if with_unplanned else [])
                        + ([(", attention products", False, True, "cpp", True)] if with_attention_products else [])
                        + ([(", sdpa attention", False, False, "cpp", False)] if with_sdpa else [])
                        + ([(", python wrapper", False, True, "python", False)] if with_python_wrapper and comp else []))
            for note, drop_plan, attention, wrapper, products in variants:
                if not want(f"{tag} lean bf16 head{suffix}{note}"):
                    continue
                head = copy.deepcopy(pruned_model())
                set_lm_head_dtype(head, "bfloat16")
                dec = LeanDecoder(head, compile=comp, decode_attention=attention, compile_wrapper=wrapper,
                                  decode_engine="off")
                modes[f"{tag} lean bf16 head{suffix}{note}"] = {
                    "model": head, "sparsity": sp, "decoder": unplanned(dec) if drop_plan else dec,
                    "attention_products": products}
        engine_names = [f"{tag} lean bf16 head + engine"] + ([f"{tag} lean bf16 head + engine, generate loop"]
                                                              if with_generate_loop else [])
        if engine and any(want(name) for name in engine_names):
            eng = copy.deepcopy(pruned_model())
            set_lm_head_dtype(eng, "bfloat16")
            dec = LeanDecoder(eng)
            if not dec.use_engine:
                raise LosaError(f"the decode engine does not run here: {dec.engine_reason}")
            if want(engine_names[0]):
                modes[engine_names[0]] = {"model": eng, "sparsity": sp, "decoder": dec}
            if with_generate_loop and want(engine_names[1]):
                modes[engine_names[1]] = {"model": eng, "sparsity": sp, "decoder": LeanDecoder(eng, token_loop="generate")}
        b16_names = [f"{tag} bf16 model + engine"] + ([f"{tag} bf16 model + engine, generate loop"]
                                                       if with_generate_loop else [])
        # what `losa generate --dtype auto` runs on this CPU: a bf16 model
        if engine and _kernel.native_bf16() and any(want(name) for name in b16_names):
            b16 = copy.deepcopy(base).to(torch.bfloat16)
            prune_magnitude(b16, sp)
            sparsify_for_inference(b16, value_dtype="bfloat16")
            set_lm_head_dtype(b16, "bfloat16")  # as `losa generate --lm-head-dtype auto` does: in place here
            if want(b16_names[0]):
                modes[b16_names[0]] = {"model": b16, "sparsity": sp, "decoder": LeanDecoder(b16)}
            if with_generate_loop and want(b16_names[1]):
                modes[b16_names[1]] = {"model": b16, "sparsity": sp, "decoder": LeanDecoder(b16, token_loop="generate")}
        if with_overhead and compile_step and want(f"{tag} overhead only + static + compile"):
            zero = copy.deepcopy(pruned_model())
            set_lm_head_dtype(zero, "bfloat16")
            zero_weight_layers(zero)
            modes[f"{tag} overhead only + static + compile"] = {
                "model": zero, "sparsity": sp, "decoder": LeanDecoder(zero, compile=True), "overhead": True}
    for m in modes.values():
        # (a bf16 model's engine multiplies the bf16 head's own weight here: native bf16 has the AVX512-BF16 loop)
        m["bytes"] = bytes_per_token(m["model"])
    return modes


def generate_kwargs(tok: object, ids: torch.Tensor, tokens: int) -> dict:
    """The ``generate`` arguments of every timed run: greedy, exactly ``tokens`` new tokens.

    No end-of-sequence token (``eos_token_id=None``) rather than ``min_new_tokens``: transformers' min-new-tokens
    logits processor scans the whole vocabulary for the EOS ids at every step, a cost a real run does not pay.
    """
    return dict(do_sample=False, eos_token_id=None, pad_token_id=tok.eos_token_id,
                attention_mask=torch.ones_like(ids))


def time_mode(m: dict, ids: torch.Tensor, tokens: int, gen_kw: dict) -> tuple[float, torch.Tensor]:
    """Time one generation of ``tokens`` new tokens with one mode of :func:`build_modes` (prompt included).

    Args:
        m: a mode (``{"decoder": LeanDecoder, ...}``).
        ids: the prompt ids ``(1, T)``.
        tokens: new tokens to generate.
        gen_kw: :func:`generate_kwargs` for this prompt.

    Returns:
        (wall seconds, the generated ids with the prompt).
    """
    from losa.inference import attention

    isa = attention._KERNEL["isa"]
    if m.get("attention_products"):
        attention._KERNEL["isa"] = None
    try:
        with torch.inference_mode():
            t = time.perf_counter()
            out = m["decoder"].generate(ids, tokens, **gen_kw)
            return time.perf_counter() - t, out
    finally:
        attention._KERNEL["isa"] = isa


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, append rows to decode.jsonl and render decode.md.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success.

    Raises:
        LosaError: for invalid arguments.
    """
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled mode")
    ap.add_argument("--no-engine", action="store_true", help="leave out the decode-engine mode")
    ap.add_argument("--with-dense-engine", action="store_true", help="also decode the dense model with the engine")
    ap.add_argument("--with-generate-loop", action="store_true",
                    help="also time the engine modes inside transformers' generate loop instead of the engine's own "
                         "token loop (the before/after of losa.inference.engine_loop)")
    ap.add_argument("--with-unplanned", action="store_true",
                    help="also time the lean modes without the layers' decode plans (the full dispatch per call)")
    ap.add_argument("--with-overhead", action="store_true",
                    help="also time the compiled lean mode with the sparse linears and the head returning zeros")
    ap.add_argument("--with-sdpa", action="store_true",
                    help="also time the lean modes with transformers' sdpa attention instead of losa's decode "
                         "attention (the before/after of losa.inference.attention)")
    ap.add_argument("--with-attention-products", action="store_true",
                    help="also time the lean modes with the decode attention's float32 step as torch products instead "
                         "of the compiled kernel")
    ap.add_argument("--with-python-wrapper", action="store_true",
                    help="also time the compiled lean mode with Inductor's Python wrapper instead of its C++ wrapper "
                         "(the before/after of --compile-wrapper cpp)")
    ap.add_argument("--only", default=None, metavar="REGEX",
                    help="time only the modes whose name matches this regular expression (e.g. 'bf16 model \\+ "
                         "engine' for the engine's before/after with more repetitions; `same` is left blank when the "
                         "'sparse before' mode it compares with is not timed)")
    ap.add_argument("--out", default=str(RESULTS / "decode.jsonl"))
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.reps < 1:
        raise LosaError("--tokens and --reps must be at least 1")
    import losa

    load_start = os.getloadavg()
    threads = [int(t) for t in args.threads.split(",")]
    base, tok = losa.load_model("smollm2-135m")
    base.eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    keep = None
    if args.only is not None:
        import re

        try:
            keep = re.compile(args.only).search
        except re.error as e:
            raise LosaError(f"--only {args.only!r} is not a regular expression ({e}); fix it") from None
    modes = build_modes(base, [float(s) for s in args.sparsities.split(",")], not args.no_compile,
                        args.with_unplanned, args.with_overhead, args.with_sdpa, args.with_python_wrapper,
                        args.with_attention_products, not args.no_engine, args.with_dense_engine,
                        args.with_generate_loop, keep=keep)
    if not modes:
        raise LosaError(f"--only {args.only!r} matches no mode; modes are named like '70% bf16 model + engine'")
    bw = {t: bandwidth(t) for t in threads}
    print("bandwidth GB/s", bw, flush=True)
    bw_low = dict(bw)
    gen_kw = generate_kwargs(tok, ids, args.tokens)

    def run(m: dict) -> tuple[float, torch.Tensor]:
        return time_mode(m, ids, args.tokens, gen_kw)

    compile_s = {}
    for name, m in modes.items():  # warm-up (and the compile, timed once)
        torch.set_num_threads(threads[0])
        t, m["tokens"] = run(m)
        if m["decoder"].compile:
            compile_s[name] = t
            print(f"compile + first run of {name}: {t:.1f} s", flush=True)
    rows = []
    for th in threads:
        torch.set_num_threads(th)
        best = {k: float("inf") for k in modes}
        for _ in range(args.reps):
            for name, m in modes.items():
                t, _ = run(m)
                best[name] = min(best[name], t)
            now = bandwidth(th, reps=2)  # the VM's speed swings: pair the best times with the best bandwidth
            bw[th], bw_low[th] = max(bw[th], now), min(bw_low[th], now)
        print(f"bandwidth GB/s on {th} threads: {bw_low[th]:.1f}-{bw[th]:.1f} during the run", flush=True)
        for name, m in modes.items():
            ms = 1000 * best[name] / args.tokens
            floor = m["bytes"] / (bw[th] * 1e9) * 1000
            before = modes.get(f"{round(m['sparsity'] * 100)}% sparse before")
            ref = before["tokens"] if before is not None and m["sparsity"] and not m.get("overhead") else None
            same = None if ref is None else bool(torch.equal(m["tokens"], ref))
            row = {**provenance(th, MODEL, [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
                   "mode": name, "sparsity": m["sparsity"], "new_tokens": args.tokens, "prompt_tokens": ids.shape[1],
                   "reps": args.reps, "ms_per_token": round(ms, 2), "tokens_per_s": round(1000 / ms, 2),
                   "bytes_per_token": m["bytes"], "bandwidth_GBps": round(bw[th], 2),
                   "bandwidth_GBps_lowest": round(bw_low[th], 2),
                   "floor_ms": round(floor, 2), "x_floor": round(ms / floor, 2) if floor else None,
                   "greedy_same_as_before": same, "compile_s": round(compile_s[name], 1) if name in compile_s else None,
                   "torch": torch.__version__, "kernel_isa": _kernel.ISA_NAMES[_kernel.best_isa()]}
            rows.append(row)
            print(f"{th} thr  {name:40s} {ms:7.2f} ms/token  floor {floor:6.2f}", flush=True)
    append_rows(rows, load_start, Path(args.out), render)
    return 0


def append_rows(rows: list[dict], load_start: tuple[float, ...], out: Path, render) -> None:
    """Stamp ``rows`` with the load averages at start and now, append them to the JSONL ``out`` and
    re-render its Markdown (``render(jsonl, md)``) from all rows."""
    load_end = os.getloadavg()
    for r in rows:
        r["loadavg_start"], r["loadavg_end"] = [round(x, 2) for x in load_start], [round(x, 2) for x in load_end]
    save_rows(out, rows, render)


def render(jsonl: Path, md: Path) -> None:
    """Render every row of ``jsonl`` as a markdown table with its provenance."""
    rows = read_jsonl(jsonl)
    L = ["# Decode speed: SmolLM2-135M, sparse runtime before and after the lean decode path", "",
         "Written by `benchmarks/bench_decode.py`. Greedy, a fixed prompt, a fixed number of new tokens, best of "
         "the repetitions, modes interleaved. Pruning: magnitude per output row (timing only). Sparse modes: bf16 "
         "values, float32 model and activations, except `bf16 model + engine` (the model cast to bf16, as `losa "
         "generate --dtype auto` loads it on CPUs with AVX512-BF16). `+ engine` modes decode with the C++ decode "
         "engine (`losa/inference/engine.py`, one call per token), every other mode with it off (rows before "
         "commit 7de7042 predate it). floor = bytes streamed per token (packed linears + LM head) / "
         "measured read bandwidth (`sum` over 512 MiB, best of 5; in runs with a `GB/s low` column also after "
         "every repetition, the best taken and `GB/s low` the lowest: the VM's speed swings within a run). `same` = greedy tokens equal to `sparse "
         "before` at that sparsity (for the bf16 model: a float32 model's tokens, so paths may part at near-ties). "
         "Other jobs shared the machine: see the load averages.", "",
         "Rows of commits b44c057 and 77b3ff7 (2026-12-02): there the plain lean modes grouped the sparse layers "
         "fed the same input (q/k/v, gate/up) into one kernel call per step, and `, ungrouped` was one call per "
         "layer, as shipped before and since (the groups were removed again in 74bc610: the compiled step was "
         "slower with them; README, `sibling_fusion.md`).", ""]
    runs: dict[tuple, list[dict]] = {}
    for r in rows:
        runs.setdefault((r["date"][:16], r["commit"], r["command"], r["cpu"], r["isa"]), []).append(r)
    for (date, commit, command, cpu, isa), rs in runs.items():
        r0 = rs[0]
        L += [f"## {date} UTC, commit {commit}", "",
              f"`{command}` on {cpu} ({isa}), torch {r0.get('torch', '?')}"
              + (f", losa kernel ISA **{r0['kernel_isa']}**" if r0.get("kernel_isa") else "") + f", model: {r0['model']}; "
              f"{r0['new_tokens']} new tokens after a {r0['prompt_tokens']}-token prompt, best of {r0['reps']}.", "",
              f"Load average (1/5/15 min) at start {r0['loadavg_start']}, at end {r0['loadavg_end']} "
              "(2 CPU cores).", ""]
        comp = [f"{r['mode']}: {r['compile_s']} s" for r in rs if r.get("compile_s") is not None and r["threads"] == rs[0]["threads"]]
        if comp:
            L += ["Compile + first generation (once per model): " + "; ".join(comp) + ".", ""]
        low = any("bandwidth_GBps_lowest" in r for r in rs)
        L += ["| threads | mode | ms/token | tokens/s | MB/token | GB/s read | " + ("GB/s low | " if low else "")
              + "floor ms | x floor | same |", "|---|---|---|---|---|---|---|---|---|" + ("---|" if low else "")]
        for r in rs:
            same = "" if r["greedy_same_as_before"] is None else ("yes" if r["greedy_same_as_before"] else "no")
            L.append(f"| {r['threads']} | {r['mode']} | {r['ms_per_token']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['bytes_per_token'] / 1e6:.1f} | {r['bandwidth_GBps']:.1f} | "
                     + (f"{r.get('bandwidth_GBps_lowest', float('nan')):.1f} | " if low else "")
                     + f"{r['floor_ms']:.2f} | {'' if r['x_floor'] is None else format(r['x_floor'], '.2f')} | "
                     f"{same} |")
        L.append("")
    atomic_write_text(md, "\n".join(L))


if __name__ == "__main__":
    sys.exit(main())
