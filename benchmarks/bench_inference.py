"""Benchmark the sparse CPU inference runtime against torch's dense paths (same run, interleaved, medians).

    python benchmarks/bench_inference.py --out benchmarks/results/inference_mine   # full run (~15 min, 2 idle cores)
    python benchmarks/bench_inference.py --quick --out /tmp/inference_quick         # smoke run (small repeat counts)
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/bench_inference.py --out ...          # dense weights on huge pages too
                                                                                   # (the sparse buffers always are)

Writes ``<out>.json`` and ``<out>.md`` (default benchmarks/results/inference); it refuses to overwrite a finished
run's ``<out>.json``. Sections: memory bandwidth; per-layer
GEMV at batch 1/4/16 (SmolLM2 and LLaMA-7B shapes, 0/50/60/70/80 % and 2:4); the sparse-vs-dense
crossover batch; decode and prefill of a random LLaMA-7B-shaped decoder stack; SmolLM2-135M decode
tokens/s and the bf16-values perplexity check. Every speed-up is a ratio of medians against the
faster of torch's dense fp32 and bf16 ``F.linear`` measured in the same interleaved loop (the stack's: against
the fastest dense model, through transformers' modules or the C++ decode engine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from losa.errors import LosaError
from losa.inference import kernel as kmod
from losa.inference import pack, sparsify_for_inference
from losa.inference.formats import FORMAT_CODES
from losa.pruning.masks import nm_mask, unstructured_mask
from losa.utils.io import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
SMOL_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
PATTERNS = ["50%", "60%", "70%", "80%", "2:4"]


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                between: Callable[[], object] | None = None) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin; ``between`` (untimed) runs before
    every timed call, e.g. to evict the caches so that no function finds the previous one's data there."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            if between is not None:
                between()
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def keep_mask(w: torch.Tensor, pattern: str) -> torch.Tensor:
    score = w.abs()
    if pattern == "2:4":
        return nm_mask(score, 2, 4)
    return unstructured_mask(score, float(pattern.rstrip("%")) / 100, per_row=True)


def machine_info(threads: tuple[int, ...] = (1, 2)) -> dict:
    from _provenance import commit
    from _provenance import cpu as cpu_info

    k, host = kmod.load_kernel(), cpu_info()

    from losa.inference import thresholds

    # the cached thresholds in use at each thread count the benchmark runs (each count has its own entry)
    measured = {f"{t} thread{'s' if t != 1 else ''}": {key: ("never" if v == thresholds.NEVER else v)
                                                      for key, v in thresholds.cached_thresholds(kmod.best_isa(),
                                                                                                 t).items()}
                for t in threads} if k else {}
    measured = {t: v for t, v in measured.items() if v}
    return {"cpu": host["cpu"], "cpu_generation": host.get("cpu_generation", ""), "commit": commit(),
            "thresholds": measured or ("built-in defaults (no losa bench-runtime cache for this CPU)" if k
                                       else "none (the kernel is not built)"),
            "cores": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "kernel_isa": kmod.ISA_NAMES[kmod.best_isa()] if k else "none (dense fallback)",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg_start": os.getloadavg(),
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
            "LOSA_HUGEPAGES": os.environ.get("LOSA_HUGEPAGES", "1"),
            "bf16_prompt_path": ("zero-skipping GEMM on layers >= 65 % sparse" if k and kmod.bf16_dot_available()
                                 and thresholds.sparse_gemm_enabled(kmod.best_isa()) else "decompressed tiles")}


def bandwidth(threads: int, reps: int) -> float:
    """Read bandwidth in GB/s: ``sum`` over a 512 MiB float32 buffer."""
    torch.set_num_threads(threads)
    buf = torch.ones(128 * 2**20)
    t = interleaved({"sum": lambda: buf.sum()}, reps)["sum"]
    return buf.numel() * 4 / t / 1e9


# ------------------------------------------------------------------ per-layer GEMV

def layer_bench(shapes, batches, threads, reps) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for n, k in shapes:
        w = torch.randn(n, k, generator=gen) / k**0.5
        variants = {}
        for pat in PATTERNS:
            wm = w * keep_mask(w, pat)
            for vd in (torch.float32, torch.bfloat16):
                for fmt in (["bitmask", "nm24"] if pat == "2:4" else ["bitmask"]):
                    variants[(pat, str(vd)[6:], fmt, "float32")] = pack(wm, vd, fmt)
            # a bf16 model: bf16 values and bf16 inputs (the AVX512-BF16 loop where the CPU has it)
            variants[(pat, "bfloat16", "bitmask", "bfloat16")] = variants[(pat, "bfloat16", "bitmask", "float32")]
        wb = w.bfloat16()
        kern = kmod.load_kernel()
        for th in threads:
            torch.set_num_threads(th)
            isa = kmod.best_isa()
            for b in batches:
                x = torch.randn(b, k)
                xb = x.bfloat16()
                fns = {"dense_fp32": partial(F.linear, x, w), "dense_bf16": partial(F.linear, xb, wb)}
                for key, p in variants.items():
                    fns["|".join(key)] = partial(kern.spmm, xb if key[3] == "bfloat16" else x, p.meta, p.values, p.row_ptr, None, n, k,
                                                 FORMAT_CODES[p.fmt], isa)
                t = interleaved(fns, reps)
                best = min(t["dense_fp32"], t["dense_bf16"])
                for key, p in variants.items():
                    ts = t["|".join(key)]
                    rows.append({"shape": [n, k], "batch": b, "threads": th, "pattern": key[0], "values": key[1],
                                 "format": key[2], "inputs": key[3], "sparse_ms": ts * 1e3, "dense_fp32_ms": t["dense_fp32"] * 1e3,
                                 "dense_bf16_ms": t["dense_bf16"] * 1e3, "speedup_vs_best_dense": best / ts,
                                 "bytes": p.nbytes(), "GBps": p.nbytes() / ts / 1e9})
    return rows


# ------------------------------------------------------------------ crossover + prefill tile

def crossover_bench(threads, reps) -> dict:
    """Sparse kernel vs tiled decompress + dense GEMM vs the dense layer, per batch size (4096x4096).

    Three cases: 70 % bf16 values with float32 inputs, 70 % bf16 values with bf16 inputs (a bf16 model:
    bf16 GEMM, against dense bf16 ``F.linear``), 50 % float32 values with float32 inputs.
    """
    torch.set_num_threads(threads)
    n, k = 4096, 4096
    w = torch.randn(n, k) / 64
    kern = kmod.load_kernel()
    isa = kmod.best_isa()
    out = {"shape": [n, k], "threads": threads, "rows": [], "tiles": {}}
    for pat, vd, xd in (("70%", torch.bfloat16, torch.float32), ("70%", torch.bfloat16, torch.bfloat16),
                        ("50%", torch.float32, torch.float32)):
        wm = w * keep_mask(w, pat)
        wd = wm.to(xd)
        p = pack(wm, vd)
        args = (p.meta, p.values, p.row_ptr, None, n, k, FORMAT_CODES[p.fmt], isa)
        bf16_gemm = xd == torch.bfloat16
        for b in (1, 2, 4, 8, 12, 16, 24, 32, 64, 128):
            x = torch.randn(b, k).to(xd)
            t = interleaved({"sparse": partial(kern.spmm, x, *args),
                             "decompress_gemm": partial(kern.dense_mm, x, *args, 256, bf16_gemm),
                             "dense": partial(F.linear, x, wd)}, reps)
            out["rows"].append({"pattern": pat, "values": str(vd)[6:], "inputs": str(xd)[6:], "batch": b,
                                **{f"{kk}_ms": v * 1e3 for kk, v in t.items()}})
        if xd == torch.bfloat16:
            x = torch.randn(256, k).to(xd)
            t = interleaved({str(tile): partial(kern.dense_mm, x, *args, tile, True) for tile in (64, 128, 256, 512, 1024)}
                            | {"dense_bf16": partial(F.linear, x, wd)}, reps)
            out["tiles"] = {kk: v * 1e3 for kk, v in t.items()}
    return out


# ------------------------------------------------------------------ LLaMA-7B-shaped stack

def llama_stack(layers: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).eval()
    return model


def prune_model(model, pattern: str) -> None:
    from losa.models.linear import get_weight, set_weight
    from losa.models.registry import get_decoder_layers, linear_modules

    for layer in get_decoder_layers(model):
        for mod in linear_modules(layer).values():
            w = get_weight(mod)
            set_weight(mod, w * keep_mask(w, pattern))


class StackTimer:
    """Accumulates the time spent inside the decoder layers (first layer's pre-hook to last layer's hook)."""

    def __init__(self, model):
        from losa.models.registry import get_decoder_layers

        layers = get_decoder_layers(model)
        self.t0 = 0.0
        self.elapsed = 0.0
        layers[0].register_forward_pre_hook(self._start)
        layers[-1].register_forward_hook(self._stop)

    def _start(self, *args) -> None:
        self.t0 = time.perf_counter()

    def _stop(self, *args) -> None:
        self.elapsed += time.perf_counter() - self.t0


def decode_fn(model, timer: StackTimer, prompt_len: int, steps: int):
    """Prefill ``prompt_len`` tokens, then decode ``steps`` tokens one at a time with the KV cache.

    Returns (prefill s, decode s per token, decoder-stack s per token: the layers without the LM head,
    decoder-stack prefill s). The prefill computes the last position's logits only, as ``generate`` does.
    """
    ids = torch.randint(5, 1000, (1, prompt_len))

    def run() -> tuple[float, float, float, float]:
        with torch.inference_mode():
            timer.elapsed = 0.0
            t = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)
            t_prefill = time.perf_counter() - t
            stack_prefill = timer.elapsed
            past, nxt = out.cache, out.logits[:, -1:].argmax(-1)
            timer.elapsed = 0.0
            t = time.perf_counter()
            for _ in range(steps):
                out = model(nxt, cache=past, use_cache=True)
                past, nxt = out.cache, out.logits[:, -1:].argmax(-1)
            return t_prefill, (time.perf_counter() - t) / steps, timer.elapsed / steps, stack_prefill
    return run


def engine_twin(model):
    """A twin of ``model`` that shares its decoder layers and final norm but has an 8-token vocabulary.

    The C++ decode engine runs whole decode steps (it has no hook between the layers and the LM head); on the
    twin, a step is the stack's layers plus a negligible embedding lookup, final norm and 8-row LM head, so
    its time is directly comparable with the stack time of :class:`StackTimer` (slightly against the engine).
    """
    import copy

    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(model.config)
    cfg.vocab_size, cfg.num_hidden_layers = 8, 0  # no layers of its own to initialise and throw away
    with torch.device("cpu"):
        twin = LlamaForCausalLM(cfg).eval().to(model.dtype)
    twin.model.layers, twin.model.norm = model.model.layers, model.model.norm
    twin.model.rotary_emb = model.model.rotary_emb
    twin.config.num_hidden_layers = model.config.num_hidden_layers
    return twin


def engine_decode_fn(model, prompt_len: int, steps: int):
    """Like :func:`decode_fn` for the decoder stack, through the C++ decode engine (what ``losa generate`` runs).

    Build it before any :class:`StackTimer` hooks the layers (the engine refuses hooked models). Returns
    (prefill s: None, decode s per token, decoder-stack s per token: the same, stack prefill s: None).

    Raises:
        LosaError: the engine cannot run this model (the reason named).
    """
    from losa.inference.engine import DecodeEngine

    twin = engine_twin(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in twin.modules()), "build before StackTimer"
    eng = DecodeEngine(twin, prompt_len + steps + 1)
    with torch.inference_mode():
        out = twin(torch.randint(0, 8, (1, prompt_len)), use_cache=True, logits_to_keep=1)
    eng.load_prompt_cache(out.cache)
    del out

    def run() -> tuple[float | None, float, float, float | None]:
        eng.pos, nxt = prompt_len, 1
        t = time.perf_counter()
        for _ in range(steps):
            nxt = int(eng.step(nxt).argmax())
        per_token = (time.perf_counter() - t) / steps
        return None, per_token, per_token, None
    run.engine = eng  # keeps the engine (and its cache) alive with the closure
    return run


ENGINE_SUFFIX = " (engine)"


def stack_bench(layers: int, threads, reps: int, steps: int, prompt_len: int) -> dict:
    import copy

    base = llama_stack(layers, vocab=32000)
    models = {"dense_fp32": base, "dense_bf16": copy.deepcopy(base).to(torch.bfloat16)}
    dense_bytes = sum(m.weight.numel() * 4 for n, m in base.named_modules()
                      if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}")
    bytes_per_token = {"dense_fp32": dense_bytes, "dense_bf16": dense_bytes // 2}
    # "P bfloat16": a bf16 model (like dense_bf16) with bf16 values; "P float32": a float32 model with
    # float32 values; "70% bf16 values, fp32 model": bf16 storage, float32 activations and prefill GEMM.
    for pat, vd, model_dtype in (("70%", "bfloat16", torch.bfloat16), ("70%", "float32", torch.float32),
                                 ("70%", "bfloat16", torch.float32), ("50%", "bfloat16", torch.bfloat16),
                                 ("2:4", "bfloat16", torch.bfloat16)):
        m = copy.deepcopy(base)
        prune_model(m, pat)
        m.to(model_dtype)
        s = sparsify_for_inference(m, value_dtype=vd)
        name = f"{pat} {vd}" if model_dtype == getattr(torch, vd) else f"{pat} bf16 values, fp32 model"
        models[name] = m
        bytes_per_token[name] = s["sparse_bytes"]
    # the engine rows: the same weights decoded by the C++ engine (built before the timers hook the layers)
    engine_fns = {}
    for k, m in models.items():
        try:
            engine_fns[k + ENGINE_SUFFIX] = engine_decode_fn(m, prompt_len, steps)
            bytes_per_token[k + ENGINE_SUFFIX] = bytes_per_token[k]
        except LosaError as exc:  # the module rows still run; the report leaves the engine row out
            print(f"no engine row for {k}: {exc}", file=sys.stderr)
    timers = {k: StackTimer(m) for k, m in models.items()}
    res = {"layers": layers, "vocab": 32000, "prompt_len": prompt_len, "decode_steps": steps,
           "bytes_per_token": bytes_per_token, "runs": []}
    for th in threads:
        torch.set_num_threads(th)
        fns = {k: decode_fn(m, timers[k], prompt_len, steps) for k, m in models.items()} | engine_fns
        for f in fns.values():  # warm-up
            f()
        samples: dict[str, list] = {k: [] for k in fns}
        for _ in range(reps):
            for k, f in fns.items():
                samples[k].append(f())
        for k, v in samples.items():
            row = {"threads": th, "model": k}
            for i, key in enumerate(("prefill_ms", "decode_ms_per_token", "stack_decode_ms", "stack_prefill_ms")):
                if v[0][i] is not None:  # the engine rows time decode only
                    row[key] = statistics.median(x[i] for x in v) * 1e3
            res["runs"].append(row)
    return res


# ------------------------------------------------------------------ SmolLM2-135M

def smollm2_bench(threads, reps: int, tokens: int, data_dir: str) -> dict:
    import copy

    import losa
    from losa.eval.ppl import perplexity

    base, tok = losa.load_model("smollm2-135m")
    base.eval()
    prompt = tok("The history of the city of London", return_tensors="pt").input_ids
    models = {"dense_fp32": base, "dense_bf16": copy.deepcopy(base).to(torch.bfloat16)}
    torch.set_num_threads(1)  # pruning and perplexity are not what is timed here

    def wt2(m):
        return perplexity(m, tok, "wikitext2", seqlen=512, max_windows=4, data_dir=data_dir, progress=False)
    ppl = {"dense fp32 model": wt2(base), "dense bf16 model": wt2(models["dense_bf16"])}
    for sp in (0.5, 0.7):
        pruned = copy.deepcopy(base)
        losa.prune(pruned, tok, losa.PruneConfig(method="wanda", sparsity=sp, nsamples=8, seqlen=256,
                                                 data_dir=data_dir), progress=False)
        for vd in ("float32", "bfloat16"):
            m = copy.deepcopy(pruned)
            sparsify_for_inference(m, value_dtype=vd)
            models[f"{int(sp * 100)}% {vd}"] = m
            ppl[f"{int(sp * 100)}% {vd}"] = perplexity(m, tok, "wikitext2", seqlen=512, max_windows=4,
                                                       data_dir=data_dir, progress=False)
        ppl[f"{int(sp * 100)}% dense-fp32-weights"] = wt2(pruned)
        m = copy.deepcopy(pruned).to(torch.bfloat16)  # a bf16 model: bf16 values and bf16 activations
        sparsify_for_inference(m, value_dtype="bfloat16")
        models[f"{int(sp * 100)}% bf16 model"] = m
        ppl[f"{int(sp * 100)}% bf16 model"] = wt2(m)
        del pruned
    runs = []
    for th in threads:
        torch.set_num_threads(th)

        def gen(m):
            with torch.inference_mode():
                return m.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                  pad_token_id=tok.eos_token_id)
        t = interleaved({k: (lambda m=m: gen(m)) for k, m in models.items()}, reps)
        for k, v in t.items():
            runs.append({"threads": th, "model": k, "tokens_per_s": tokens / v, "seconds": v})
    return {"prompt_tokens": prompt.shape[1], "new_tokens": tokens, "ppl_wikitext2_4x512": ppl, "runs": runs}


# ------------------------------------------------------------------ report

def layer_sections(res: dict) -> list[str]:
    """The per-layer GEMV, achieved-bandwidth and crossover sections of the report."""
    bw = res["bandwidth_GBps"]
    L = ["## Per-layer GEMV (speed-up vs the faster of dense fp32 / bf16 `F.linear`)", "",
          "`bf16 model` = bf16 values and bf16 inputs (as in a model converted to bf16); `bf16` = bf16 values, "
          "float32 inputs; `fp32` = float32 values and inputs.", "",
          "| shape | batch | thr | dense fp32 ms | dense bf16 ms | " + " | ".join(f"{p} bf16 model" for p in PATTERNS)
          + " | " + " | ".join(f"{p} bf16" for p in PATTERNS)
          + " | 2:4 nm24 bf16 | " + " | ".join(f"{p} fp32" for p in PATTERNS) + " |",
          "|" + "---|" * (5 + 3 * len(PATTERNS) + 1)]
    by = {}
    for r in res["layers"]:
        key = (r["pattern"], r["values"], r["format"], r.get("inputs", "float32"))
        by.setdefault((tuple(r["shape"]), r["batch"], r["threads"]), {})[key] = r

    def cell(d, key):
        return f"{d[key]['speedup_vs_best_dense']:.2f}x" if key in d else "-"
    for (shape, b, th), d in by.items():
        any_r = next(iter(d.values()))
        cells = [cell(d, (p, "bfloat16", "bitmask", "bfloat16")) for p in PATTERNS]
        cells += [cell(d, (p, "bfloat16", "bitmask", "float32")) for p in PATTERNS]
        cells.append(cell(d, ("2:4", "bfloat16", "nm24", "float32")))
        cells += [cell(d, (p, "float32", "bitmask", "float32")) for p in PATTERNS]
        L.append(f"| {shape[0]}x{shape[1]} | {b} | {th} | {any_r['dense_fp32_ms']:.3f} | {any_r['dense_bf16_ms']:.3f} | "
                 + " | ".join(cells) + " |")
    L += ["", "Achieved bandwidth of the sparse kernel at batch 1 (GB/s of compact bytes; floor = measured "
          "read bandwidth):", "", "| shape | thr | pattern | values | inputs | sparse ms | GB/s | floor ms |",
          "|---|---|---|---|---|---|---|---|"]
    for r in res["layers"]:
        if r["batch"] == 1 and tuple(r["shape"]) in ((11008, 4096),) and r["format"] == "bitmask":
            floor = r["bytes"] / (bw[str(r["threads"])] * 1e9) * 1e3
            L.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['threads']} | {r['pattern']} | {r['values']} | "
                     f"{r.get('inputs', 'float32')} | {r['sparse_ms']:.2f} | {r['GBps']:.1f} | {floor:.2f} |")
    c = res["crossover"]
    L += ["", f"## Crossover: sparse kernel vs decompress + dense GEMM ({c['shape'][0]}x{c['shape'][1]}, "
          f"{c['threads']} thread)", "", "`dense` = `F.linear` with the inputs' dtype (bf16 GEMM for bf16 inputs).", "",
          "| pattern | values | inputs | batch | sparse ms | decompress+GEMM ms | dense ms |",
          "|---|---|---|---|---|---|---|"]
    for r in c["rows"]:
        dense = r.get("dense_ms", r.get("dense_fp32_ms"))
        L.append(f"| {r['pattern']} | {r['values']} | {r.get('inputs', 'float32')} | {r['batch']} | {r['sparse_ms']:.2f} | "
                 f"{r['decompress_gemm_ms']:.2f} | {dense:.2f} |")
    L += ["", "Prefill tile size (bf16 model, batch 256, 70 %): " + ", ".join(f"{k}: {v:.1f} ms" for k, v in c["tiles"].items()), ""]
    return L


def write_markdown(res: dict, path: Path) -> None:
    m = res["machine"]
    bw = res["bandwidth_GBps"]
    L = [f"# Sparse inference runtime benchmark ({m['date']})", "",
         f"Command: `{res['command']}`" + (f" at commit {m['commit']}" if "commit" in m else "") + "  ",
         f"Machine: {m['cpu']}" + (f" ({m['cpu_generation']})" if m.get("cpu_generation") else "")
         + f", {m['cores']} cores, torch {m['torch']} "
         f"(capability {m['torch_cpu_capability']}), kernel ISA **{m['kernel_isa']}**, Python {m['python']}.  ",
         f"Load average at start {tuple(round(x, 2) for x in m['loadavg_start'])}, at end "
         f"{tuple(round(x, 2) for x in res['loadavg_end'])}, duration {res['duration_s']:.0f} s.", ""]
    if "thresholds" in m:
        L += [f"Dispatch thresholds: {m['thresholds']}."
              + (f" bf16 prompts: {m['bf16_prompt_path']}." if "bf16_prompt_path" in m else ""), ""]
    if res.get("rendered_at"):
        L += [f"Report re-rendered from the JSON at commit {res['rendered_at']} (the measurements are the run's).", ""]
    if "THP_MEM_ALLOC_ENABLE" in m:
        L += [f"Huge pages: `THP_MEM_ALLOC_ENABLE={m['THP_MEM_ALLOC_ENABLE'] or '(unset)'}` (torch's allocator, so the "
              f"dense weights too), `LOSA_HUGEPAGES={m['LOSA_HUGEPAGES']}` (the sparse layers' packed buffers).", ""]
    if max(m["loadavg_start"][0], res["loadavg_end"][0]) > 1.0:
        L += ["> **Other processes shared this 2-core machine during the run** (load average above 1). Absolute "
              "times are inflated and 2-thread numbers suffer most (an OpenMP team waits for a descheduled "
              "thread); the ratios compare paths measured interleaved in the same loop.", ""]
    if res.get("note"):
        L += [f"> Note: {res['note']}.", ""]
    L += [f"Measured read bandwidth (`sum` over 512 MiB): {bw['1']:.1f} GB/s on 1 thread, {bw['2']:.1f} GB/s on 2.", ""]
    if "layers" in res:  # absent from --stack-only runs
        L += layer_sections(res)
    s = res["stack"]
    L += [f"## LLaMA-7B-shaped random stack ({s['layers']} decoder layers, hidden 4096, MLP 11008, dense LM head "
          f"vocab {s['vocab']}; prompt {s['prompt_len']}, {s['decode_steps']} decode steps)", "",
          "`stack ms` = time inside the decoder layers per decoded token (KV cache, batch 1; no embedding or LM "
          "head); `decode ms` = the whole decode step including the dense LM head (in the model's dtype). "
          "`stack prefill` = time inside the decoder layers for the prompt; `prefill ms` = the whole prompt "
          "forward (last position's logits only, as `generate` does). Floor = compact bytes of the stack's "
          "linears / read bandwidth (" + ", ".join(f"{stack_bandwidth(res, th):.1f} GB/s on {th} thread(s)"
                                                   for th in sorted({r["threads"] for r in s["runs"]}))
          + ": the larger of `sum`'s and what the fastest dense decode step read). Models: `P bfloat16` = the "
          "model converted to bf16 (like `dense_bf16`) with bf16 values; `P float32` = a float32 model with float32 "
          "values." + (" `(engine)` = the same weights decoded by the C++ decode engine that `losa generate` uses "
                       "(on a twin model that shares the layers, with an 8-token vocabulary: its whole step is the "
                       "stack plus a negligible head). `stack speed-up` is against the fastest dense row, engine "
                       "rows included." if any(r["model"].endswith(ENGINE_SUFFIX) for r in s["runs"]) else ""), "",
          "| thr | model | bytes/token (stack) | floor ms | stack ms | stack speed-up | decode ms/token | tokens/s | "
          "stack prefill ms | stack prefill vs dense | prefill ms |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for th in sorted({r["threads"] for r in s["runs"]}):
        rr = {r["model"]: r for r in s["runs"] if r["threads"] == th}
        best = best_dense(rr, "stack_decode_ms")
        pk = "stack_prefill_ms" if "stack_prefill_ms" in rr["dense_bf16"] else "prefill_ms"
        best_pre = best_dense(rr, pk)
        for k, r in rr.items():
            by_ = s["bytes_per_token"][k]
            if k.endswith(ENGINE_SUFFIX):  # no separate LM head or prompt timing
                tail = "- | - | - | - | - |"
            else:
                tail = (f"{r['decode_ms_per_token']:.1f} | {1e3 / r['decode_ms_per_token']:.2f} | {r[pk]:.0f} | "
                        f"{best_pre / r[pk]:.2f}x | {r['prefill_ms']:.0f} |")
            L.append(f"| {th} | {k} | {by_ / 1e6:.0f} MB | {by_ / (stack_bandwidth(res, th) * 1e9) * 1e3:.1f} | "
                     f"{r['stack_decode_ms']:.1f} | {best / r['stack_decode_ms']:.2f}x | " + tail)
    sm = res.get("smollm2")
    if sm:
        L += ["", f"## SmolLM2-135M (wanda-pruned, greedy {sm['new_tokens']} tokens, prompt {sm['prompt_tokens']} tokens)", "",
              "| thr | model | tokens/s | vs dense |", "|---|---|---|---|"]
        for th in sorted({r["threads"] for r in sm["runs"]}):
            rr = {r["model"]: r for r in sm["runs"] if r["threads"] == th}
            for k, r in rr.items():
                L.append(f"| {th} | {k} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / rr['dense_fp32']['tokens_per_s']:.2f}x |")
        L += ["", "WikiText-2 perplexity, first 4 windows of 512 tokens (bf16 values must stay within 0.5 % of fp32). "
              "`bf16 values` = bf16 storage in a float32 model; `bf16 model` = bf16 storage and bf16 activations "
              "(the whole model in bf16, like `dense_bf16`):", "",
              "| sparsity | dense fp32 weights | sparse fp32 values | sparse bf16 values | bf16 values vs fp32 | "
              "sparse bf16 model | bf16 model vs fp32 |", "|---|---|---|---|---|---|---|"]
        p = sm["ppl_wikitext2_4x512"]
        for sp in ("50%", "70%"):
            a, b_ = p[f"{sp} float32"], p[f"{sp} bfloat16"]
            c = p.get(f"{sp} bf16 model")
            cm = f"{c:.4f} | {100 * (c / a - 1):+.3f} %" if c is not None else "- | -"
            L.append(f"| {sp} | {p[f'{sp} dense-fp32-weights']:.4f} | {a:.4f} | {b_:.4f} | {100 * (b_ / a - 1):+.3f} % | {cm} |")
        if "dense bf16 model" in p:
            d32, d16 = p["dense fp32 model"], p["dense bf16 model"]
            L += ["", f"Reference, the unpruned model: fp32 {d32:.4f}, bf16 {d16:.4f} ({100 * (d16 / d32 - 1):+.3f} %): "
                  "the part of the `bf16 model` difference that comes from bf16 activations, not from the sparse layers."]
    L += ["", "## Targets (LLaMA-7B-shaped stack, vs the faster dense path)", ""]
    for line in res["targets"]:
        L.append(f"- {line}")
    L += ["", NOTES]
    atomic_write_text(path, "\n".join(L))


NOTES = """## How it works and how to read this

- **Format.** Unstructured: one bit per weight (inputs padded to 32) + the kept values packed row by row
  (fp32 or bf16) + int64 row offsets. N:M: 2-bit indices per kept value (`nm24`, `nm14`) + values; the
  kernel decodes them through a 256-entry table into the same 32-lane mask. For 2:4 the index format and the
  bitmask cost exactly the same bytes (1 bit per weight), and the `2:4 nm24` column shows the table decode
  is slower, so `fmt="auto"` stores 2:4 as a bitmask and uses indices only for 1:4 (half the metadata).
- **Kernel.** Per block of 32 inputs: one 32-bit lane mask, expand the next popcount(mask) packed values
  into lanes, multiply-add against the activations; each expanded vector is reused for up to 8 batch rows;
  rows are split over `torch.get_num_threads()` threads. Float32 activations: bf16 values are widened to
  fp32 and expanded with the register form of `vexpandps` (AVX-512 F/BW/VL/VBMI2), then FMA; on Intel CPUs
  since 3bd5696 one `vpexpandw` of 32 bf16 values first, then the widen (results/bf16_expand.md). bf16
  activations (a bf16 model) with bf16 values: one register-form `vpexpandw` of 32 values and one
  `vdpbf16ps` per block (AVX512-BF16; bf16 products summed in float32, as a dense bf16 layer), 1.4-1.9x
  faster (benchmarks/results/kernel_variants.md, X1+pf). AVX2+FMA+F16C CPUs (Zen 3, Haswell): per 8 inputs
  one broadcast load of 8 packed bf16 values and one `vpshufb` from a 256-entry table that expands and widens
  them into float32 lanes, then FMA (results/avx2_variants.md); bf16 inputs are widened to float32 there.
  Elsewhere: a portable scalar loop. The header names the path this run measured (`kernel ISA`).
- **Prefill.** Above `DENSE_BATCH_THRESHOLD` rows the layer decompresses 256-row tiles into a cache-resident
  buffer (bf16 tiles by `vpexpandw` for a bf16 model, else fp32) and calls torch's GEMM on each tile (no
  dense copy of the weight is kept). The threshold is the crossover measured above; the tile size is the
  fastest of the measured ones. Decompression is extra work that a dense layer does not do, so this path can
  at best tie with dense. Where it was measured faster (Zen 4, or `losa bench-runtime` on this CPU), bf16
  prompts on layers >= 65 % sparse skip the zeros instead (the zero-skipping GEMM); the header says which ran.
- **Floor.** bytes per token = compact bytes of every decoder linear (values + bitmask + row offsets);
  floor ms = bytes / read bandwidth (per-layer table: `sum`'s; stack: the larger of `sum`'s and what the
  fastest dense decode step read). A kernel at the floor would be memory-bound; where the
  measured time is well above it, the kernel is bound by instructions (mask decode + expand + FMA per 16
  weights) rather than by memory, which is why 70 % and 80 % gain less than their byte ratio.
- **2-thread numbers.** On this shared 2-core VM the second thread was usually descheduled by other jobs:
  an OpenMP team then waits for a scheduler time slice, which shows up as times quantised near 12 ms for
  *both* torch's dense paths and the sparse kernel. Treat 2-thread ratios from a loaded run as unreliable;
  rerun on an idle machine (the script records the load average).
"""


DENSE_MODELS = ("dense_fp32", "dense_bf16", "dense_fp32" + ENGINE_SUFFIX, "dense_bf16" + ENGINE_SUFFIX)


def stack_bandwidth(res: dict, th: int) -> float:
    """Read bandwidth (GB/s) behind the stack's floors on ``th`` threads: the larger of ``sum``'s and what the
    fastest dense decode step read (its bytes / its stack time, attention included, so still an underestimate).

    ``sum`` alone can read slower than a dense GEMV does (a VM, torch forced to AVX2); a floor from it would be
    too slow and every ratio against it too kind.
    """
    s = res["stack"]
    rr = {r["model"]: r for r in s["runs"] if r["threads"] == th}
    achieved = max(s["bytes_per_token"][k] / (rr[k]["stack_decode_ms"] * 1e-3) / 1e9 for k in DENSE_MODELS if k in rr)
    return max(res["bandwidth_GBps"][str(th)], achieved)


def best_dense(rr: dict, key: str, engine: bool = True) -> float:
    """The faster dense path's time in one thread count's rows ``rr`` (model -> row): torch's fp32 and bf16
    modules and, with ``engine`` and where measured, the same dense models through the decode engine."""
    return min(rr[k][key] for k in DENSE_MODELS if key in rr.get(k, {}) and not math.isnan(rr[k][key])
               and (engine or not k.endswith(ENGINE_SUFFIX)))


def targets(res: dict) -> list[str]:
    out = []
    runs = res["stack"]["runs"]

    def sp(model, th, key="stack_decode_ms", engine=True):
        rr = {r["model"]: r for r in runs if r["threads"] == th}
        return best_dense(rr, key, engine) / rr[model][key]
    models = {r["model"] for r in runs}
    paths = ("",) + ((ENGINE_SUFFIX,) if "70% bfloat16" + ENGINE_SUFFIX in models else ())
    for model, th, goal in (("70% bfloat16", 1, 2.6), ("70% bfloat16", 2, 3.5), ("50% bfloat16", 1, 1.5),
                            ("2:4 bfloat16", 1, 1.5)):
        for path in paths:
            got = sp(model + path, th)
            line = f"{model + path} decode, {th} thread(s): {got:.2f}x (target {goal}x) - {'MET' if got >= goal else 'MISSED'}"
            if len(paths) > 1:  # the baseline is torch's faster dense path; the engine's dense rows are stricter
                mod = sp(model + path, th, engine=False)
                line = (f"{model + path} decode, {th} thread(s): {mod:.2f}x torch's faster dense modules (target "
                        f"{goal}x) - {'MET' if mod >= goal else 'MISSED'}; {got:.2f}x the fastest dense path with "
                        f"the engine's dense rows - {'MET' if got >= goal else 'MISSED'}")
            out.append(line)
    # the dense bf16 GEMV at the measured read bandwidth: a baseline that a slow bf16 GEMV cannot inflate
    dense_bf16_bytes = res["stack"]["bytes_per_token"]["dense_bf16"]
    for th in sorted({r["threads"] for r in runs}):
        floor_ms = dense_bf16_bytes / (stack_bandwidth(res, th) * 1e9) * 1e3
        rr = {r["model"]: r for r in runs if r["threads"] == th}
        for path in paths:
            got = floor_ms / rr["70% bfloat16" + path]["stack_decode_ms"]
            out.append(f"70% bfloat16{path} decode vs the dense bf16 bandwidth floor ({floor_ms:.1f} ms), {th} "
                       f"thread(s): {got:.2f}x (target 1.5x) - {'MET' if got >= 1.5 else 'MISSED'}")
    threads = sorted({r["threads"] for r in runs})
    key = "stack_prefill_ms" if "stack_prefill_ms" in runs[0] else "prefill_ms"
    for th in threads:
        for model in ("70% bfloat16", "50% bfloat16", "2:4 bfloat16"):
            got = sp(model, th, key)
            out.append(f"{model} prefill (decoder stack), {th} thread(s): {got:.2f}x of dense (target >= 1.0x within "
                       f"noise) - {'MET' if got >= 0.97 else 'MISSED'}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny repeat counts (smoke test)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers in the LLaMA-7B-shaped stack (2-4)")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--stack-only", action="store_true",
                    help="only the bandwidth, the LLaMA-7B-shaped stack (where the targets are) and SmolLM2 unless "
                         "skipped; no per-layer or crossover sections")
    ap.add_argument("--out", default=str(OUT / "inference"))
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from an existing .json")
    ap.add_argument("--resume-smollm2", action="store_true",
                    help="run only the SmolLM2 section (1 thread) on top of an existing .partial.json")
    a = ap.parse_args()
    from _provenance import provenance  # the command with the ISA-forcing variables that were set

    out = Path(a.out)
    if a.report_only:
        from _provenance import commit

        res = json.loads(out.with_suffix(".json").read_text())
        res["targets"] = targets(res)  # derived from the measurements: kept in step with the .md
        if commit() != res["machine"].get("commit"):
            res["rendered_at"] = commit()
        atomic_write_json(out.with_suffix(".json"), res)
        write_markdown(res, out.with_suffix(".md"))
        return 0
    if out.with_suffix(".json").exists():
        print(f"{out.with_suffix('.json')} holds a finished run; pass another --out (or delete it to measure again)",
              file=sys.stderr)
        return 2
    if kmod.load_kernel() is None:
        print("the sparse kernel could not be built; nothing to benchmark", file=sys.stderr)
        return 1
    if a.resume_smollm2:
        res = json.loads(out.with_suffix(".partial.json").read_text())
        t0 = time.time() - res.get("duration_s", 0.0)
        res["command"] += " ; then: " + provenance(1, argv=sys.argv)["command"]
        res["smollm2"] = smollm2_bench((1,), 3, 32, a.data_dir)
        return _finish(res, out, t0)
    reps = 3 if a.quick else 9
    t0 = time.time()
    res: dict = {"command": provenance(1, argv=sys.argv)["command"], "machine": machine_info()}
    try:
        res["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=REPO).stdout.strip()
    except OSError:
        pass
    res["bandwidth_GBps"] = {str(t): bandwidth(t, reps) for t in (1, 2)}
    print("bandwidth", res["bandwidth_GBps"], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)

    def checkpoint() -> None:  # partial results survive a crash
        atomic_write_json(out.with_suffix(".partial.json"), res)

    if not a.stack_only:
        res["layers"] = layer_bench(SMOL_SHAPES + LLAMA_SHAPES, (1, 4, 16), (1, 2), reps)
        checkpoint()
        print("layers done", round(time.time() - t0), flush=True)
        res["crossover"] = crossover_bench(1, reps)
        checkpoint()
        print("crossover done", round(time.time() - t0), flush=True)
    res["stack"] = stack_bench(a.layers, (1, 2), max(3, reps // 2), 4 if a.quick else 8, 128)
    res["duration_s"] = time.time() - t0
    checkpoint()
    print("stack done", round(time.time() - t0), flush=True)
    if not a.skip_smollm2:
        res["smollm2"] = smollm2_bench((1, 2), max(2, reps // 3), 32, a.data_dir)
        print("smollm2 done", round(time.time() - t0), flush=True)
    return _finish(res, out, t0)


def _finish(res: dict, out: Path, t0: float) -> int:
    res["targets"] = targets(res)
    res["loadavg_end"] = os.getloadavg()
    res["duration_s"] = time.time() - t0
    atomic_write_json(out.with_suffix(".json"), res)
    write_markdown(res, out.with_suffix(".md"))
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    print("\n".join(res["targets"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
