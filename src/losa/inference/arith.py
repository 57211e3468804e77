"""Which arithmetic the sparse runtime uses on this CPU: model dtype, stored value dtype, prompt GEMM.

The decision is one pure function, :func:`choose_arithmetic`, of what the CPU offers (:class:`IsaInfo`,
from :func:`detect_isa`) and what the user asked for (:class:`Requested`; ``"auto"`` = pick the fastest).
``losa generate`` / ``losa serve`` call it at start-up and print :meth:`Choice.line`.

The rules (numbers: benchmarks/results/avx2_decode.md, inference_bf16.md, prefill_kernel.md):

* **AVX-512 with AVX512-BF16** (Zen 4, Sapphire Rapids; AMX as well on the latter): a bf16 model with bf16
  values. Decode multiplies bf16 x bf16 with ``vdpbf16ps`` (1.4-1.9x the float32 loop), prompts run the
  zero-skipping bf16 GEMM (where measured faster: Zen 4, or what ``losa bench-runtime`` found here) or torch's
  bf16 GEMM on decompressed tiles (oneDNN, AMX where present). With AMX, batches of a few rows up to short
  prompts run on AMX tiles fed straight from the expanded weights (amx_batch.md).
* **AVX2 only, or AVX-512 without BF16** (Zen 2/3, Haswell-Skylake, Ice Lake): a float32 model, bf16
  values, float32 activations. Decode is bound by the bytes it streams; bf16 values halve them and are
  widened exactly (the AVX2 loop does it with one byte shuffle). torch's bf16 GEMM has no hardware support
  here (~5x slower than float32 on a Zen 3 in issue 18; 0.19-0.23x of float32 with torch forced to AVX2 in
  avx2_decode.md), so no prompt ever goes through it: a bf16 model's sparse layers widen their inputs and run
  the float32 GEMM (``SparseLinear`` enforces this whatever was requested).
* **Portable scalar loop** (no AVX2): float32 model, bf16 values (half the memory; the widening is a shift).
* **No compiled kernel** (dense fallback): float32 everywhere; the weights stay exact and nothing is gained
  from bf16 values.

Explicit requests win, except that a bf16 prompt GEMM is never used without native bf16. An explicit
float32 model keeps float32 prompts (its precision was asked for), even where bf16 would be faster.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

from losa.errors import LosaError

ISA_LEVELS = ("scalar", "avx2", "avx512")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
VALUE_DTYPES = ("auto", "float32", "bfloat16")
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


@dataclass(frozen=True)
class IsaInfo:
    """What the runtime knows about the CPU.

    Attributes:
        level: the sparse kernel's instruction set, after ``LOSA_SPARSE_ISA``: "scalar", "avx2" or "avx512".
        native_bf16: AVX512-BF16 usable at that level (hardware bf16 dot products; fast bf16 GEMMs).
        amx: AMX-BF16 present (torch's oneDNN uses it for bf16 GEMMs).
        sparse_gemm: a bf16 prompt on layers >= 65 % sparse skips zeros (the zero-skipping GEMM) instead of
            feeding decompressed tiles to torch's bf16 GEMM (:func:`losa.inference.thresholds.sparse_gemm_enabled`:
            measured here, else the default of this kind of CPU); only with ``native_bf16``.
        amx_tiles: the kernel's AMX tiles path runs here (:func:`losa.inference.kernel.amx_available`: AMX, a
            kernel built with it, the tile state granted): small bf16 batches and short prompts of bf16 values
            use it (a float32 model's prompts with a bf16 prompt GEMM too).
        kernel: whether the compiled kernel is available (else the dense fallback runs); assumed True when
            detected without it (``detect_isa(use_kernel=False)``, e.g. for a dense baseline).
        forced: the ``LOSA_SPARSE_ISA`` value when set, else None.
        cpu: the CPU model name.
    """

    level: str
    native_bf16: bool = False
    amx: bool = False
    sparse_gemm: bool = False
    amx_tiles: bool = False
    kernel: bool = True
    forced: str | None = None
    cpu: str = ""

    def __post_init__(self) -> None:
        if self.level not in ISA_LEVELS:
            raise LosaError(f"unknown ISA level {self.level!r}; use one of {', '.join(ISA_LEVELS)}")

    @property
    def name(self) -> str:
        """Human-readable ISA, e.g. "AVX-512+BF16+AMX" or "AVX2 (forced by LOSA_SPARSE_ISA)"."""
        if not self.kernel:
            return "no compiled kernel"
        base = {"scalar": "portable scalar", "avx2": "AVX2", "avx512": "AVX-512"}[self.level]
        if self.native_bf16:
            base += "+BF16" + ("+AMX" if self.amx else "")
        return base + (" (forced by LOSA_SPARSE_ISA)" if self.forced else "")


@dataclass(frozen=True)
class Requested:
    """What the user asked for; ``"auto"`` lets :func:`choose_arithmetic` decide.

    Attributes:
        dtype: model dtype: "auto", "float32", "bfloat16" or "float16" (aliases fp32/bf16/fp16 accepted).
        value_dtype: stored precision of the sparse weights: "auto", "float32" or "bfloat16".
        prefill_dtype: precision of the prompt GEMM for float32 activations: "auto", "float32" or "bfloat16".
        stored_in: the compact file whose stored values fix ``value_dtype`` (named in the reason instead of a
            ``--value-dtype`` flag the user did not give), or None.
    """

    dtype: str = "auto"
    value_dtype: str = "auto"
    prefill_dtype: str = "auto"
    stored_in: str | None = None


@dataclass(frozen=True)
class Choice:
    """The arithmetic picked for this CPU.

    Attributes:
        dtype: model dtype to load ("float32", "bfloat16" or "float16").
        value_dtype: stored precision of the sparse weights ("float32" or "bfloat16").
        prefill_dtype: precision of the prompt GEMM for float32 activations ("float32" or "bfloat16").
        activations: what the sparse layers compute in: "bfloat16" (bf16 products, float32 sums) or "float32".
        prefill: the prompt path of the sparse layers, in words.
        reason: why, in one short clause.
        isa: the ISA it was chosen for.
        dtype_reason: why this model dtype, for a model that keeps its dense layers (``--dense``).
    """

    dtype: str
    value_dtype: str
    prefill_dtype: str
    activations: str
    prefill: str
    reason: str
    isa: str
    dtype_reason: str = ""

    def line(self, dense: bool = False) -> str:
        """One line for the log: what was chosen and why.

        Args:
            dense: the model keeps its dense layers (``--dense``): only the model dtype applies; the line
                says nothing of sparse values, activations or prompt paths.

        Returns:
            The line.
        """
        if dense:
            return (f"arithmetic ({self.isa}): {self.dtype} model, dense layers (--dense: no sparse values) -- "
                    f"{self.dtype_reason}")
        return (f"arithmetic ({self.isa}): {self.dtype} model, {self.value_dtype} values, {self.activations} "
                f"activations in sparse layers, prompts via {self.prefill} -- {self.reason}")


def _norm(value: str, allowed: tuple[str, ...], flag: str) -> str:
    v = _ALIASES.get(str(value).lower(), str(value).lower())
    if v not in allowed:
        raise LosaError(f"{flag} {value!r} is not supported; use one of {', '.join(allowed)}")
    return v


def choose_arithmetic(isa: IsaInfo, requested: Requested = Requested()) -> Choice:
    """Pick model dtype, value dtype, activation dtype and prompt path for a CPU (pure; no I/O).

    Args:
        isa: what the CPU offers (see :func:`detect_isa`).
        requested: the user's flags; "auto" fields are decided here, explicit ones are kept (except that a
            bf16 prompt GEMM is replaced by the float32 GEMM where the CPU has no native bf16).

    Returns:
        The :class:`Choice`; ``Choice.line()`` is the one-line explanation to print.

    Raises:
        LosaError: a requested dtype that is not one of :data:`MODEL_DTYPES` / :data:`VALUE_DTYPES`.
    """
    dtype = _norm(requested.dtype, MODEL_DTYPES, "--dtype")
    value_dtype = _norm(requested.value_dtype, VALUE_DTYPES, "--value-dtype")
    prefill_dtype = _norm(requested.prefill_dtype, VALUE_DTYPES, "--prefill-dtype")
    # dtypes set explicitly (by flags, or by what a --compact file stores): the reason is then what auto would do
    # on this CPU, not a description of this run
    given = [f"{flag} {raw}" for flag, raw, v in (("--dtype", requested.dtype, dtype),
                                                  ("--value-dtype", requested.value_dtype, value_dtype),
                                                  ("--prefill-dtype", requested.prefill_dtype, prefill_dtype))
             if v != "auto" and not (flag == "--value-dtype" and requested.stored_in)]
    stored = (f"{value_dtype} values as stored in {requested.stored_in}"
              if requested.stored_in and value_dtype != "auto" else "")
    native = isa.kernel and isa.level == "avx512" and isa.native_bf16
    notes: list[str] = []
    if not isa.kernel:
        why = "no compiled kernel: dense fallback, float32 keeps the weights exact"
        auto = ("float32", "float32")
    elif native:
        why = ("native bf16: vdpbf16ps decode on bf16 values, bf16 prompt GEMMs"
               + (" (AMX)" if isa.amx else "") + ("; AMX tiles for small batches" if isa.amx_tiles else ""))
        auto = ("bfloat16", "bfloat16")
    elif isa.level == "scalar":
        why = "portable loop: float32 activations, bf16 values halve the weight bytes"
        auto = ("float32", "bfloat16")
    else:
        why = ("no native bf16: float32 activations (torch's bf16 GEMM has no hardware support here: "
               "benchmarks/results/avx2_decode.md), bf16 values halve the bytes decode streams and are widened exactly")
        auto = ("float32", "bfloat16")
    if dtype == "auto":
        dtype = auto[0]
        dtype_why = ("native bf16: bf16 GEMMs run in hardware" if native else
                     "float32 keeps the weights exact (bf16 is chosen only where the kernel finds native bf16)"
                     if not isa.kernel else
                     "no native bf16: float32 GEMMs (torch's bf16 GEMM has no hardware support here)")
    else:
        dtype_why = f"--dtype {dtype} as given"
    if dtype == "bfloat16" and not native:  # only ever asked for: auto picks bf16 with native bf16 only
        notes.append("bf16 model without native bf16: sparse layers widen to float32, dense GEMMs stay slow "
                     "(--dtype auto picks float32)")
        dtype_why += "; without native bf16 its GEMMs are slow (--dtype auto picks float32)"
    if value_dtype == "auto":
        value_dtype = auto[1]
    bf16_compute = native and dtype == "bfloat16" and value_dtype == "bfloat16"
    if prefill_dtype == "auto":
        # a float32 model asked for explicitly keeps float32 prompts; bf16 models compute prompts in bf16
        prefill_dtype = "bfloat16" if native and dtype == "bfloat16" else "float32"
    elif prefill_dtype == "bfloat16" and not native:
        notes.append("--prefill-dtype bfloat16 ignored without native bf16")
        prefill_dtype = "float32"
    if not isa.kernel:
        prefill = "float32 dense matmul"
    elif native and (dtype == "bfloat16" or prefill_dtype == "bfloat16"):
        prefill = "bf16 GEMM" + (" (zero-skipping at >= 65 % sparsity)" if bf16_compute and isa.sparse_gemm else
                                 " on decompressed tiles")
        if isa.amx_tiles and value_dtype == "bfloat16":  # bf16 values: the AMX kernel takes short prompts
            prefill = "AMX tiles for short prompts, then " + prefill
    else:
        prefill = "float32 GEMM on decompressed tiles"
    if given or stored:
        set_here = [f"{', '.join(given)} as set"] if given else []
        why = f"{'; '.join(set_here + ([stored] if stored else []))}; auto on this CPU: {why}"
    return Choice(dtype=dtype, value_dtype=value_dtype, prefill_dtype=prefill_dtype,
                  activations="bfloat16" if bf16_compute else "float32", prefill=prefill,
                  reason="; ".join([why, *notes]), isa=isa.name, dtype_reason=dtype_why)


def cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The fields of the first processor block of ``path`` (``{}`` where there is none, e.g. not Linux)."""
    fields: dict[str, str] = {}
    try:
        with open(path) as fh:
            for line in fh:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _cpu_model() -> str:
    return cpuinfo().get("model name") or platform.processor() or platform.machine()


def _cpuinfo_flags() -> set[str]:
    return set(cpuinfo().get("flags", "").split())


def detect_isa(use_kernel: bool = True) -> IsaInfo:
    """What this CPU offers the sparse runtime, honouring ``LOSA_SPARSE_ISA``.

    Args:
        use_kernel: ask the compiled kernel (builds it on first use; authoritative: what it will run). With
            False, or where the kernel cannot be built, ``/proc/cpuinfo`` flags are used (Linux; else scalar).

    Returns:
        An :class:`IsaInfo`; ``kernel`` is False when the compiled kernel is unavailable.

    Raises:
        LosaError: ``LOSA_SPARSE_ISA`` is unknown or above what the CPU supports.
    """
    from losa.inference import kernel as _kernel

    forced = os.environ.get("LOSA_SPARSE_ISA") or None
    flags = _cpuinfo_flags()
    amx = "amx_bf16" in flags
    k = _kernel.load_kernel() if use_kernel else None
    if k is not None:
        level = _kernel.ISA_NAMES[_kernel.best_isa()]
        bf16 = bool(k.cpu_has_bf16dot())
    else:
        if {"avx512f", "avx512bw", "avx512vl", "avx512_vbmi2"} <= flags:
            best = "avx512"
        elif {"avx2", "fma", "f16c", "popcnt"} <= flags:
            best = "avx2"
        else:
            best = "scalar"
        level = best
        if forced:
            if forced not in ISA_LEVELS:
                raise LosaError(f"LOSA_SPARSE_ISA={forced!r} is unknown; use one of {', '.join(ISA_LEVELS)}")
            if ISA_LEVELS.index(forced) > ISA_LEVELS.index(best):
                raise LosaError(f"LOSA_SPARSE_ISA={forced!r} is not supported by this CPU (best: {best})")
            level = forced
        bf16 = "avx512_bf16" in flags
    native_bf16 = level == "avx512" and bf16
    if native_bf16 and k is not None:
        from losa.inference import thresholds

        sparse_gemm = thresholds.sparse_gemm_enabled(_kernel.best_isa())
    else:
        sparse_gemm = False
    return IsaInfo(level=level, native_bf16=native_bf16, amx=amx and level == "avx512", sparse_gemm=sparse_gemm,
                   amx_tiles=k is not None and _kernel.amx_available(), kernel=k is not None or not use_kernel,
                   forced=forced, cpu=_cpu_model())
