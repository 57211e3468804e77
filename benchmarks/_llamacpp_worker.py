"""llama.cpp side of bench_llamacpp.py: runs under the Python that has ``llama-cpp-python`` (not losa's venv).

Standard library plus ``llama_cpp`` only. Prints one JSON line on stdout.

Usage:
    python _llamacpp_worker.py version
    python _llamacpp_worker.py quantize-f16 IN.gguf OUT.gguf
    python _llamacpp_worker.py decode MODEL.gguf --threads T --tokens N --ids 1,2,3 [--reps R] [--no-extra-bufts]

``decode`` loads the GGUF, evaluates the prompt ids (given, so both engines see the same prompt), then generates
exactly N greedy tokens (``sample(top_k=1, temp=0)`` + ``eval([token])``, no stop on end-of-sequence) after a short
warm-up. Per repetition it records the wall time of prompt + N tokens (the accounting bench_decode.py uses for
losa), the wall time of the N tokens alone, and llama.cpp's own single-token eval counter
(``llama_perf_context``); the best of the repetitions is printed. ``--no-extra-bufts`` loads the model with
llama.cpp's extra CPU buffer types off (``use_extra_bufts = false``: no AMX and no weight repacking), which
``Llama(...)`` does not expose as an argument.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _version() -> dict:
    """The llama-cpp-python version and the CPU features its llama.cpp was built with."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    return {"llama_cpp_python": llama_cpp.__version__,
            "system_info": info.decode(errors="replace").strip() if isinstance(info, bytes) else str(info)}


def _quantize_f16(inp: str, out: str) -> dict:
    """Write ``out`` as the F16 GGUF of ``inp`` with llama.cpp's quantize API (dequantises quantised tensors).

    Args:
        inp: the source GGUF.
        out: the file to write (the caller renames it into place).

    Returns:
        ``{"rc": return code of llama_model_quantize, "seconds": wall time}``.
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_F16
    params.allow_requantize = True
    params.nthread = 1
    t = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(inp.encode(), out.encode(), params)
    return {"rc": int(rc), "seconds": round(time.perf_counter() - t, 2)}


def _generate(llm: object, ids: list[int], tokens: int) -> tuple[float, float, list[int]]:
    """One greedy generation from a fresh context state.

    Args:
        llm: a ``llama_cpp.Llama``.
        ids: the prompt ids.
        tokens: new tokens to generate.

    Returns:
        (seconds for prompt + tokens, seconds for the tokens alone, the new token ids).
    """
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    out = []
    for _ in range(tokens):
        tok = llm.sample(top_k=1, temp=0.0)
        llm.eval([tok])
        out.append(int(tok))
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1, out


def _without_extra_bufts() -> None:
    """Make every later ``Llama(...)`` load its model with ``use_extra_bufts = false``."""
    import llama_cpp.llama_cpp as low

    default = low.llama_model_default_params

    def params() -> object:
        p = default()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params


def _decode(model: str, threads: int, tokens: int, ids: list[int], reps: int, extra_bufts: bool = True) -> dict:
    """Load ``model`` and time ``reps`` greedy generations of ``tokens`` tokens (best of each measure).

    Args:
        model: the GGUF file.
        threads: llama.cpp threads (generation and batch).
        tokens: new tokens per generation.
        ids: the prompt ids.
        reps: timed repetitions (after one short warm-up generation).
        extra_bufts: llama.cpp's extra CPU buffer types (AMX, repacked weights) on, as by default.

    Returns:
        The measurements, the new token ids of the last repetition and the library version.
    """
    import llama_cpp

    if not extra_bufts:
        _without_extra_bufts()
    llm = llama_cpp.Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False,
                          seed=0)
    _generate(llm, ids, min(8, tokens))
    best = {"e2e_s": float("inf"), "decode_s": float("inf"), "perf_eval_ms": float("inf")}
    n_eval = None
    out: list[int] = []
    for _ in range(reps):
        llama_cpp.llama_perf_context_reset(llm.ctx)
        e2e, dec, out = _generate(llm, ids, tokens)
        perf = llama_cpp.llama_perf_context(llm.ctx)
        best["e2e_s"] = min(best["e2e_s"], e2e)
        best["decode_s"] = min(best["decode_s"], dec)
        if perf.n_eval > 0:
            best["perf_eval_ms"] = min(best["perf_eval_ms"], perf.t_eval_ms / perf.n_eval)
            n_eval = int(perf.n_eval)
    if n_eval is None:
        best["perf_eval_ms"] = None
    return {**best, "perf_n_eval": n_eval, "new_ids": out, "prompt_tokens": len(ids), "tokens": tokens,
            "threads": threads, "extra_bufts": extra_bufts, **_version()}


def main(argv: list[str] | None = None) -> int:
    """Dispatch the sub-command and print its JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("version")
    q = sub.add_parser("quantize-f16")
    q.add_argument("inp")
    q.add_argument("out")
    d = sub.add_parser("decode")
    d.add_argument("model")
    d.add_argument("--threads", type=int, required=True)
    d.add_argument("--tokens", type=int, required=True)
    d.add_argument("--ids", required=True, help="comma-separated prompt token ids")
    d.add_argument("--reps", type=int, default=1)
    d.add_argument("--no-extra-bufts", action="store_true", help="no AMX / repacked weight buffers")
    args = ap.parse_args(argv)
    if args.cmd == "version":
        res = _version()
    elif args.cmd == "quantize-f16":
        res = _quantize_f16(args.inp, args.out)
    else:
        res = _decode(args.model, args.threads, args.tokens, [int(i) for i in args.ids.split(",")], args.reps,
                      extra_bufts=not args.no_extra_bufts)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
