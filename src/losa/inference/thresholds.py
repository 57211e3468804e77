"""Dispatch thresholds of :class:`~losa.inference.SparseLinear` measured on this CPU (``losa bench-runtime``).

Which path is fastest for a batch of rows (the sparse row loop, decompressed tiles + dense GEMM, the
zero-skipping bf16 GEMM) depends on the CPU. The built-in thresholds in ``sparse_linear.py`` were measured on
one machine; ``losa bench-runtime`` measures the crossovers here in under a minute and caches them per CPU
model, ISA level and thread count in ``$LOSA_CACHE_DIR/runtime_thresholds.json`` (default ``~/.cache/losa``).
Layers use a cached value where one exists for the running CPU and ISA (``LOSA_SPARSE_ISA`` included), measured
at the thread count they run with or else at the nearest one measured, else the built-in default; whether bf16 prompts take the zero-skipping GEMM at all defaults per kind of CPU
(:func:`sparse_gemm_by_default`). An explicit ``dense_batch_threshold`` on a layer always wins.

Keys of a cache entry: ``dense_batch_threshold`` (float32 activations: row loop up to this many rows, then
tiles), ``dense_batch_threshold_bf16`` and ``sparse_gemm_batch_threshold`` (bf16 activations; native-bf16
CPUs only), ``amx_max_rows`` (CPUs with AMX: bf16 batches of large layers above the row loop's threshold and up
to this many rows run on the AMX tiles kernel; small layers keep their default), plus how they were measured
(``date``, ``threads``, ``shape``, ``sparsity``, ``timings_ms``).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from losa.errors import LosaError

_K = TypeVar("_K")

CACHE_NAME = "runtime_thresholds.json"
KEYS = ("dense_batch_threshold", "dense_batch_threshold_bf16", "sparse_gemm_batch_threshold", "dense_tile_rows",
        "amx_max_rows")
#: batch rows tried when measuring (the loop wins at 1 row everywhere; beyond 64 rows tiles always won)
ROWS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)
#: prompt-sized batches at which the zero-skipping bf16 GEMM is also timed against the decompressed tiles (it
#: runs above its threshold at any batch size, so the choice must hold at prompt sizes too; where the CPU's own
#: bf16 GEMM is fast the tiles win at every size: benchmarks/results/runtime_thresholds_zen5.json)
PREFILL_ROWS = (128, 256)
#: tile heights (weight rows per decompressed tile) tried at a 128-row prompt; the fastest is cached
TILE_ROWS = (256, 512, 1024)
#: ``sparse_gemm_batch_threshold`` as layers read it when the cache says ``"never"``: no batch is large enough
NEVER = 1 << 62
#: CPUs (``vendor_id``, ``cpu family``) where the zero-skipping bf16 GEMM is on by default (nothing cached): AMD
#: family 25 with AVX512-BF16, i.e. Zen 4, where it beat decompressed tiles + torch's bf16 GEMM at prompt sizes
#: (benchmarks/results/prefill_kernel*.md). Elsewhere the tiles are the default: where torch's own bf16 GEMM is
#: faster they won at every batch size (a Zen 5: results/runtime_thresholds_zen5.json; a Xeon with AMX, whose
#: tile GEMM the decompressed tiles feed: results/runtime_thresholds_amx.json).
SPARSE_GEMM_CPUS = frozenset({("AuthenticAMD", 25)})


def cache_path() -> Path:
    """``$LOSA_CACHE_DIR/runtime_thresholds.json``, else under ``$XDG_CACHE_HOME/losa`` or ``~/.cache/losa``."""
    base = os.environ.get("LOSA_CACHE_DIR")
    if base:
        return Path(base) / CACHE_NAME
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "losa" / CACHE_NAME


def cpu_key(isa_name: str, threads: int | None = None) -> str:
    """Cache key: the CPU model name, the ISA level the kernel runs at and the thread count measured with, e.g.
    ``"AMD EPYC 7763 | avx2 | 2 threads"`` (``threads`` None: the key of entries written before thread counts were
    keyed, ``"AMD EPYC 7763 | avx2"``)."""
    from losa.inference.arith import _cpu_model

    key = f"{_cpu_model()} | {isa_name}"
    return key if threads is None else f"{key} | {threads} thread{'s' if threads != 1 else ''}"


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise LosaError(f"cannot read the threshold cache {path} ({exc}); delete it and rerun losa bench-runtime") from None
    if not isinstance(data, dict):
        raise LosaError(f"the threshold cache {path} is not a JSON object; delete it and rerun losa bench-runtime")
    return data


@lru_cache(maxsize=16)
def _entry(isa: int, threads: int) -> dict:
    """The entry measured on this CPU and ISA level at ``threads`` threads, else the one measured at the nearest
    thread count (an entry without a thread count, written before they were keyed, counts as measured at its
    ``threads`` field; one without that field counts as the farthest), else ``{}``; between two counts equally
    near, the lower. Read once per process, ISA level and thread count (forward calls this per layer and token);
    :func:`clear` rereads."""
    from losa.inference.kernel import ISA_NAMES

    data = _read(cache_path())
    base = cpu_key(ISA_NAMES[isa])
    exact = data.get(cpu_key(ISA_NAMES[isa], threads))
    if isinstance(exact, dict):
        return exact
    others = [v for k, v in data.items() if isinstance(v, dict) and (k == base or k.startswith(base + " | "))]

    def distance(entry: dict) -> tuple[int, int]:
        measured = entry.get("threads")
        return (abs(measured - threads), measured) if isinstance(measured, int) else (1 << 30, 0)

    return min(others, key=distance) if others else {}


def _stale_bf16_rows(entry: dict, isa: int) -> bool:
    """An entry whose bf16 row-loop threshold was measured against another path than the one that now follows the
    loop: written without the AMX kernel (no ``amx_max_rows``) where it now runs, or with it running after the loop
    (``amx_max_rows`` > 0) where it no longer runs (a kernel built without it)."""
    from losa.inference import kernel as _kernel

    if "dense_batch_threshold_bf16" not in entry:
        return False
    if _kernel.amx_available(isa):
        return "amx_max_rows" not in entry
    return entry.get("amx_max_rows", 0) > 0


def _stale_sparse_gemm(entry: dict) -> bool:
    """An entry written before the sparse GEMM was also timed at prompt sizes (no ``prefill_rows``): its
    threshold was the last batch measured, even where the tiles won at every size."""
    return "sparse_gemm_batch_threshold" in entry and "prefill_rows" not in entry


@lru_cache(maxsize=16)
def _cached(isa: int, threads: int) -> dict:
    entry, out = _entry(isa, threads), {}
    for name in KEYS:
        value = entry.get(name)
        if name == "sparse_gemm_batch_threshold" and _stale_sparse_gemm(entry):
            continue  # this kind of CPU's default until losa bench-runtime measures again (advice() says so)
        if name == "dense_batch_threshold_bf16" and _stale_bf16_rows(entry, isa):
            continue  # the default until measured again (advice() says so)
        if name == "sparse_gemm_batch_threshold" and value == "never":
            out[name] = NEVER
        elif isinstance(value, int) and value >= (1 if name == "dense_tile_rows" else 0):
            out[name] = value
    return out


def advice(isa: int, threads: int | None = None) -> str | None:
    """What to run when the cache has no usable thresholds for this CPU and ISA level, or None.

    Args:
        isa: the kernel's ISA code (``losa.inference.kernel.best_isa()``).
        threads: the thread count the thresholds are for (None: ``torch.get_num_threads()``).

    Returns:
        One line naming ``losa bench-runtime`` when nothing is cached here or when the cached entry predates the
        prompt-size timing of the sparse GEMM; None when the cached thresholds are in use.

    Raises:
        LosaError: the cache file exists but is not valid JSON.
    """
    entry = _entry(isa, threads or _threads())
    if not entry:
        return ("batch-size thresholds are the built-in defaults; `losa bench-runtime` measures them on this CPU "
                "(under a minute, cached)")
    if _stale_sparse_gemm(entry):
        return ("the cached batch-size thresholds predate timing the sparse GEMM at prompt sizes, so this kind of "
                "CPU's default prompt path applies; rerun `losa bench-runtime`")
    if _stale_bf16_rows(entry, isa):
        return ("the cached bf16 batch-size threshold was measured with the AMX kernel on or off unlike now, so the "
                "default applies; rerun `losa bench-runtime`")
    return None


def in_use(isa: int, threads: int) -> str | None:
    """One line saying that thresholds measured by ``losa bench-runtime`` are in use, or None when none are.

    Args:
        isa: the kernel's ISA code (``losa.inference.kernel.best_isa()``).
        threads: the threads this run uses (``torch.get_num_threads()``).

    Returns:
        Which thresholds apply, when and at how many threads they were measured, and, when none were measured at
        ``threads`` (those of the nearest thread count apply), the command that measures them at this one (the
        crossovers move with the thread count; each count's are kept); None without usable cached thresholds.

    Raises:
        LosaError: the cache file exists but is not valid JSON.
    """
    used = _cached(isa, threads)
    if not used:
        return None
    entry = _entry(isa, threads)
    names = ", ".join(f"{k}={'never' if v == NEVER else v}" for k, v in used.items())
    measured = entry.get("threads")
    line = (f"batch-size thresholds measured on this CPU by losa bench-runtime ({entry.get('date', 'undated')}, "
            f"{measured if measured is not None else '?'} thread{'s' if measured != 1 else ''}): {names}")
    if isinstance(measured, int) and measured != threads:
        line += (f"; none measured at this run's {threads} thread{'s' if threads != 1 else ''}: `losa bench-runtime "
                 f"--threads {threads}` measures them (the crossovers move with the thread count)")
    return line


def cached_thresholds(isa: int, threads: int | None = None) -> dict[str, int]:
    """The thresholds measured on this CPU at ISA level ``isa`` (0/1/2), or ``{}`` when none are cached.

    Args:
        isa: the kernel's ISA code (``losa.inference.kernel.best_isa()``).
        threads: the thread count they are for (None: ``torch.get_num_threads()``, what the caller runs with);
            where none were measured at it, those of the nearest thread count measured apply.

    Returns:
        A dict with a subset of :data:`KEYS`, read once per process, ISA level and thread count (a later change of the file
        or of ``LOSA_CACHE_DIR`` is seen after :func:`clear`; :func:`save` clears). A cached ``"never"`` reads as
        :data:`NEVER`; the sparse GEMM threshold of an entry without ``prefill_rows`` (written before prompt
        sizes were timed) is left out, so this kind of CPU's default applies (:func:`sparse_gemm_enabled`).

    Raises:
        LosaError: the cache file exists but is not valid JSON.
    """
    return _cached(isa, threads or _threads())


def sparse_gemm_by_default(fields: dict[str, str] | None = None) -> bool:
    """Whether this CPU runs the zero-skipping bf16 GEMM when ``losa bench-runtime`` has not measured it here.

    Args:
        fields: ``/proc/cpuinfo`` fields (``vendor_id``, ``cpu family``); None reads this machine's.

    Returns:
        True on the CPUs of :data:`SPARSE_GEMM_CPUS` (where it was measured to win), else False.
    """
    if fields is None:
        return _this_cpu_sparse_gemm()
    try:
        return (fields.get("vendor_id", ""), int(fields.get("cpu family", "-1"))) in SPARSE_GEMM_CPUS
    except ValueError:
        return False


@lru_cache(maxsize=1)
def amx_present() -> bool:
    """Whether this CPU has AMX-BF16 (``/proc/cpuinfo`` flags; torch's oneDNN runs bf16 GEMMs on it)."""
    from losa.inference.arith import _cpuinfo_flags

    return "amx_bf16" in _cpuinfo_flags()


@lru_cache(maxsize=1)
def _this_cpu_sparse_gemm() -> bool:
    from losa.inference.arith import cpuinfo

    return sparse_gemm_by_default(cpuinfo())


def sparse_gemm_enabled(isa: int) -> bool:
    """Whether sparse-enough bf16 layers may run large batches through the zero-skipping GEMM on this CPU.

    Args:
        isa: the kernel's ISA code (``losa.inference.kernel.best_isa()``).

    Returns:
        The cached measurement's verdict where there is one (a threshold: True; ``"never"``: False), else
        :func:`sparse_gemm_by_default`. Says nothing about native bf16 (a Zen 3 is family 25 too): callers
        check ``bf16_dot_available()`` first, as :class:`~losa.inference.SparseLinear` does.

    Raises:
        LosaError: the cache file exists but is not valid JSON.
    """
    cached = cached_thresholds(isa).get("sparse_gemm_batch_threshold")
    return sparse_gemm_by_default() if cached is None else cached != NEVER


def clear() -> None:
    """Forget what was read from the cache (after writing it, or in tests)."""
    _entry.cache_clear()
    _cached.cache_clear()


def save(entry: dict, isa_name: str) -> Path:
    """Store ``entry`` for this CPU, ISA level and its ``threads`` (when the entry has that field) in the cache file,
    beside the entries of other thread counts; returns its path."""
    from losa.utils.io import atomic_write_json

    path = cache_path()
    data = _read(path)
    threads = entry.get("threads")
    data[cpu_key(isa_name, threads if isinstance(threads, int) else None)] = entry
    atomic_write_json(path, data)
    clear()
    return path


def _median_ms(fns: dict[_K, Callable[[], object]], reps: int) -> dict[_K, float]:
    for f in fns.values():
        f()
    times: dict[_K, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _last_win(rows: Sequence[int], fast: dict[int, float], slow: dict[int, float]) -> int:
    """Largest row count up to which ``fast`` beat ``slow`` at every measured count (0: never)."""
    best = 0
    for r in rows:
        if fast[r] >= slow[r]:
            break
        best = r
    return best


def crossovers(timings: dict[str, dict[int, float]], rows: Sequence[int], prefill_rows: Sequence[int] = (),
               tile_ms: dict[int, float] | None = None) -> dict:
    """The thresholds that :func:`measure`'s timings give.

    Args:
        timings: milliseconds per path and row count: ``loop`` and ``tiles`` at every count of ``rows``; where
            the CPU has native bf16 also ``loop_bf16`` (``rows``), ``tiles_bf16`` and ``sparse_gemm_bf16``
            (``rows`` and ``prefill_rows``); where it has AMX also ``amx_bf16`` (``rows`` and ``prefill_rows``).
        rows: the increasing row counts at which every path was timed.
        prefill_rows: the larger counts at which only the two bf16 GEMM paths were timed.
        tile_ms: milliseconds of the tiles at a 128-row prompt per tile height (:data:`TILE_ROWS`), or None.

    Returns:
        ``dense_batch_threshold`` (and with bf16 timings ``dense_batch_threshold_bf16``): the largest count up to
        which the row loop beat the tiles (with AMX timings: the AMX kernel, unless that never beat the tiles) at
        every count, at least 1 (decode: a whole-matrix decompression per token never wins); with AMX timings
        ``amx_max_rows``: the largest count up to which the AMX kernel beat the bf16 tiles at every count above the
        loop's threshold (0: at none); ``sparse_gemm_batch_threshold``: the largest count up to which the bf16
        tiles beat the sparse GEMM at every count, ``"never"`` when they won at all of them, and ``prefill_rows``
        (the marker of an entry that timed prompt sizes); with ``tile_ms``, ``dense_tile_rows``: the fastest height.

    Raises:
        KeyError: a path's timings are missing (``loop`` and ``tiles`` always; the bf16 paths with ``loop_bf16``).
    """
    entry: dict[str, int | str] = {"dense_batch_threshold": max(1, _last_win(rows, timings["loop"], timings["tiles"]))}
    if "loop_bf16" in timings:
        every = [*rows, *prefill_rows]
        amx = timings.get("amx_bf16")
        loop = max(1, _last_win(rows, timings["loop_bf16"], timings["tiles_bf16"]))
        if amx:
            # with AMX the row loop hands over to the AMX kernel, which runs while it beats the tiles; where it
            # never does, the tiles follow the loop as without AMX
            amx_loop = max(1, _last_win(rows, timings["loop_bf16"], amx))
            entry["amx_max_rows"] = _last_win([r for r in every if r > amx_loop], amx, timings["tiles_bf16"])
            if entry["amx_max_rows"]:
                loop = amx_loop
        entry["dense_batch_threshold_bf16"] = loop
        last = _last_win(every, timings["tiles_bf16"], timings["sparse_gemm_bf16"])
        entry["sparse_gemm_batch_threshold"] = "never" if last == every[-1] else last
        entry["prefill_rows"] = list(prefill_rows)
    if tile_ms:
        entry["dense_tile_rows"] = min(tile_ms, key=tile_ms.__getitem__)
    return entry


def measure(shape: tuple[int, int] = (4096, 4096), sparsity: float = 0.7, rows: Sequence[int] = ROWS,
            reps: int = 7, progress: Callable[[str], None] | None = None,
            prefill_rows: Sequence[int] = PREFILL_ROWS) -> dict:
    """Measure the crossovers on this CPU at the current ISA level and torch thread count.

    Args:
        shape: ``(out, in)`` of the random test layer.
        sparsity: fraction of its weights pruned (per-row magnitude).
        rows: batch row counts to time, increasing.
        reps: interleaved repeats per row count (medians).
        progress: called with one line per row count.
        prefill_rows: larger row counts at which only the bf16 tiles, the zero-skipping sparse GEMM and (with
            AMX) the AMX kernel are timed (native-bf16 CPUs only; those not above ``rows[-1]`` are left out).

    Returns:
        The cache entry: :data:`KEYS` that apply here (the bf16 ones only on native-bf16 CPUs) and how they
        were measured. ``sparse_gemm_batch_threshold`` is the largest row count up to which the tiles won at
        every measured count, or ``"never"`` when they won at all of them (``rows`` and ``prefill_rows``).

    Raises:
        LosaError: the compiled kernel is not available (nothing to tune), or bad arguments.
    """
    import torch

    from losa.inference import kernel as _kernel
    from losa.inference.formats import FORMAT_CODES, pack
    from losa.inference.sparse_linear import DENSE_XW_MAX_ROWS

    k = _kernel.load_kernel()
    if k is None:
        raise LosaError("the sparse kernel is not built here, so there is nothing to tune; install a C++ compiler")
    if not 0.0 < sparsity < 1.0 or min(shape) < 1 or reps < 1 or not rows or list(rows) != sorted(rows):
        raise LosaError("bench-runtime needs 0 < sparsity < 1, a positive shape, reps >= 1 and increasing rows")
    prefill_rows = sorted(r for r in prefill_rows if r > rows[-1])
    isa = _kernel.best_isa()
    native = _kernel.native_bf16(isa)
    amx = _kernel.amx_available(isa)
    n, kk = shape
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, kk, generator=gen)
    drop = int(round(sparsity * kk))
    keep = w.abs() > w.abs().kthvalue(drop, dim=1, keepdim=True).values if drop else torch.ones_like(w, dtype=bool)
    p = pack(w * keep, torch.bfloat16, "bitmask")
    args = (p.meta, p.values, p.row_ptr, None, n, kk, FORMAT_CODES["bitmask"], isa)
    timings: dict[str, dict[int, float]] = {}
    with torch.inference_mode():
        # first the tile height, at a prompt of 128 rows with the GEMM this CPU's prompts use; every tile below
        # is then timed at that height
        xt = torch.randn(128, kk, generator=gen)
        xt = xt.bfloat16() if native else xt
        tile_ms = _median_ms({t: lambda t=t: k.dense_mm(xt, *args, t, native) for t in TILE_ROWS}, reps)
        tile = min(tile_ms, key=tile_ms.__getitem__)
        if progress:
            progress("tile rows at 128 rows: " + ", ".join(f"{t}: {ms:.3f} ms" for t, ms in tile_ms.items()))
        for r in [*rows, *(prefill_rows if native else ())]:
            x = torch.randn(r, kk, generator=gen)
            fns = {}
            if r in rows:
                fns = {"loop": lambda x=x: k.spmm(x, *args),
                       "tiles": lambda x=x: k.dense_mm(x, *args, tile, False)}
            if native:
                xb = x.bfloat16()
                tiles_bf16 = k.dense_mm_xw if r <= DENSE_XW_MAX_ROWS else k.dense_mm
                if r in rows:
                    fns["loop_bf16"] = lambda xb=xb: k.spmm(xb, *args)
                fns.update({"tiles_bf16": lambda xb=xb, f=tiles_bf16: f(xb, *args, tile, True),
                            "sparse_gemm_bf16": lambda xb=xb: k.sparse_mm_bf16(xb, *args[:-1])})
                if amx:
                    fns["amx_bf16"] = lambda xb=xb: k.amx_mm_bf16(xb, *args[:-1])
            for name, ms in _median_ms(fns, reps).items():
                timings.setdefault(name, {})[r] = ms
            if progress:
                progress(f"{r:3d} rows: " + ", ".join(f"{name} {t[r]:.3f} ms" for name, t in timings.items() if r in t))
    entry = crossovers(timings, rows, prefill_rows if native else (), tile_ms)
    entry.update({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": torch.get_num_threads(),
                  "shape": f"{n}x{kk}", "sparsity": sparsity, "isa": _kernel.ISA_NAMES[isa],
                  "timings_ms": {name: {str(r): round(v, 4) for r, v in t.items()} for name, t in timings.items()},
                  "tile_rows_ms_at_128_rows": {str(t): round(v, 4) for t, v in tile_ms.items()}})
    return entry
