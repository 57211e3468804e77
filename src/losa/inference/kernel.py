"""Build (once) and dispatch the compiled CPU sparse kernel.

The C++ source ships with the package (``csrc/sparse_linear.cpp``) and is compiled on first use with
``torch.utils.cpp_extension.load`` (ninja + the system C++ compiler; about a minute once, then cached in
torch's extension directory, ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``, one subdirectory per
distinct build: :func:`losa.utils.cpp.build_digest`). Where that is
impossible (no compiler) :func:`load_kernel` returns ``None`` after one clear warning, and the sparse
module falls back to a dense matmul with the same numbers.

The instruction set is chosen at run time by the kernel (``__builtin_cpu_supports``); set
``LOSA_SPARSE_ISA`` to ``scalar``, ``avx2`` or ``avx512`` to force a lower level (tests use this to
check every path). A level forced below AVX-512 also behaves as a CPU without native bf16
(:func:`native_bf16`): ``LOSA_SPARSE_ISA=avx2`` on an AVX-512 machine runs what an AVX2-only CPU would. The
weights decode streams (the packed buffers of large sparse layers, the bf16 LM head) are put in
transparent-huge-page memory on Linux (:func:`hugepage_memory`; ``LOSA_HUGEPAGES=0`` turns that off).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from losa.errors import LosaError
from losa.utils.cpp import KernelUnavailable, build_extension

if TYPE_CHECKING:
    import torch

#: the extension's sources: the sparse kernels, the decode attention and the decode engine (one extension, one
#: build; csrc/losa_kernels.h declares what they share)
_SRC = [Path(__file__).parent / "csrc" / name for name in ("sparse_linear.cpp", "decode_attention.cpp",
                                                              "decode_engine.cpp")]
#: the headers the sources include (part of the build's digest: losa.utils.cpp.build_digest)
_HEADERS = [_SRC[0].parent / name for name in ("losa_kernels.h", "decode_attention_blocked.h")]
#: extension name, also the namespace of its dispatcher op (``torch.ops.losa_sparse_kernels.spmm``)
KERNEL_NAME = "losa_sparse_kernels"
ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512"}
_ISA_CODES = {v: k for k, v in ISA_NAMES.items()}


@lru_cache(maxsize=1)
def _build() -> ModuleType:
    # an assembler too old for the AMX instructions fails the whole build: then build once more without that path
    module = build_extension(KERNEL_NAME, _SRC, headers=_HEADERS, fallback_cflags=("-DLOSA_NO_AMX",))
    global _OP_NAMESPACE
    try:
        _register_fake(module.__name__)
        _OP_NAMESPACE = module.__name__
    except Exception as exc:  # noqa: BLE001 - any failure here means: no usable kernel, fall back
        raise KernelUnavailable(f"registering the spmm op failed: {type(exc).__name__}: {exc}") from exc
    return module


_FAKE_REGISTERED: set[str] = set()
#: namespace of the loaded kernel's dispatcher op (None until :func:`load_kernel` succeeds); a plain global so
#: that code traced by torch.compile can read it without calling the loader
_OP_NAMESPACE: str | None = None


def _register_fake(namespace: str) -> None:
    """Shape function of the ``spmm`` dispatcher op, so ``torch.compile`` can trace calls to it (once).

    Args:
        namespace: the op namespace, the loaded extension's name (torch renames a rebuilt extension).
    """
    if namespace in _FAKE_REGISTERED:
        return
    import torch

    @torch.library.register_fake(f"{namespace}::spmm")
    def _(x, meta, values, row_ptr, bias, n, k, fmt, isa):
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake(f"{namespace}::decode_attn")
    def _(q, k, v, mask, scale, isa):
        return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))

    _FAKE_REGISTERED.add(namespace)


def spmm_op() -> Callable:
    """The kernel's row loop as a dispatcher op, ``torch.ops.<extension name>.spmm``.

    Same arguments as the extension's ``spmm``: ``(x [B, K], meta, values, row_ptr, bias [N] or None, N, K,
    fmt, isa)``; returns ``y [B, N]`` in the dtype of ``x`` (float32 sums, rounded once inside the op).

    Returns:
        The op (an ``OpOverloadPacket``).

    Raises:
        LosaError: when the compiled kernel has not been loaded (call :func:`load_kernel` first).
    """
    import torch

    if _OP_NAMESPACE is None:
        raise LosaError("the losa sparse kernel is not loaded; call losa.inference.kernel.load_kernel() first "
                        "(it needs a C++ compiler and ninja)")
    return getattr(torch.ops, _OP_NAMESPACE).spmm


def decode_attn_op() -> Callable | None:
    """The compiled decode attention as a dispatcher op, ``torch.ops.<extension name>.decode_attn``, or None.

    Arguments ``(q [B, H_kv, G, D], k [B, H_kv, S, D], v [B, H_kv, S, Dv], mask (bool [B, S] or None), scale,
    isa)``, q, k, v all float32 or all bfloat16 CPU tensors; returns ``[B, H_kv, G, Dv]`` in their dtype (float32
    scores, probabilities and sums; see ``csrc/decode_attention.cpp``).

    Returns:
        The op, or None when the kernel has not been loaded (no compiler): callers use torch products then.
    """
    import torch

    if _OP_NAMESPACE is None:
        return None
    return getattr(torch.ops, _OP_NAMESPACE).decode_attn


@lru_cache(maxsize=1)
def load_kernel() -> ModuleType | None:
    """The compiled kernel module, or ``None`` (with one warning) when it cannot be built here."""
    try:
        return _build()
    except KernelUnavailable as exc:
        warnings.warn(
            f"losa sparse kernel unavailable ({exc}); sparse layers fall back to a dense matmul "
            "(same outputs, no speed-up). Install a C++ compiler (e.g. apt install g++) and ninja to enable it.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def kernel_available() -> bool:
    return load_kernel() is not None


@lru_cache(maxsize=1)
def _cpu_isa() -> int:
    k = load_kernel()
    if k is None:
        raise LosaError("the losa sparse kernel is not built; install a C++ compiler and ninja, then retry")
    return int(k.cpu_isa())


def best_isa() -> int:
    """ISA level the kernel will use: the CPU's best, lowered by ``LOSA_SPARSE_ISA`` if set."""
    cpu = _cpu_isa()
    forced = os.environ.get("LOSA_SPARSE_ISA")
    if not forced:
        return cpu
    if forced not in _ISA_CODES:
        raise LosaError(f"LOSA_SPARSE_ISA={forced!r} is unknown; use one of {', '.join(_ISA_CODES)}")
    if _ISA_CODES[forced] > cpu:
        raise LosaError(f"LOSA_SPARSE_ISA={forced!r} is not supported by this CPU (best: {ISA_NAMES[cpu]})")
    return _ISA_CODES[forced]


@lru_cache(maxsize=1)
def _cpu_has_bf16dot() -> bool:
    k = load_kernel()
    return k is not None and bool(k.cpu_has_bf16dot())


def native_bf16(isa: int | None = None) -> bool:
    """Whether the CPU computes bf16 natively at ISA level ``isa`` (default :func:`best_isa`).

    True only at the AVX-512 level on CPUs with AVX512-BF16. Elsewhere (AVX2, AVX-512 without BF16, the
    scalar path, or a level forced lower with ``LOSA_SPARSE_ISA``) bf16 GEMMs have no hardware support, and
    the sparse layers never use one: bf16 inputs are widened to float32 (see losa/inference/arith.py).
    """
    if not _cpu_has_bf16dot():
        return False
    return (best_isa() if isa is None else isa) == _ISA_CODES["avx512"]


@lru_cache(maxsize=1)
def _cpu_has_amx() -> bool:
    k = load_kernel()
    return k is not None and bool(k.amx_available())


def amx_available(isa: int | None = None) -> bool:
    """Whether bf16 batches may run on the AMX tiles kernel (``amx_mm_bf16``) at ISA level ``isa``.

    True on CPUs with AMX-BF16 (Sapphire Rapids and later Xeons) at the AVX-512 level with native bf16, where
    Linux granted the process its tile state; False elsewhere and at a level forced lower with
    ``LOSA_SPARSE_ISA``.

    Args:
        isa: the kernel's ISA code (default :func:`best_isa`).

    Returns:
        Whether the AMX kernel runs here.
    """
    return native_bf16(isa) and _cpu_has_amx()


def bf16_dot_available() -> bool:
    """Whether bf16 inputs with bf16 values use the AVX512-BF16 loop here (else: float32 on widened inputs)."""
    return native_bf16()


_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def hugepages_enabled() -> bool:
    """Whether the runtime puts the weights decode streams (sparse layers' packed buffers, the bf16 LM head) and the
    decode engine's KV cache in huge-page memory (``LOSA_HUGEPAGES``, default on).

    Returns:
        False for ``LOSA_HUGEPAGES`` = 0, false, no, off or empty (any case); True when unset or 1, true, yes, on.

    Raises:
        LosaError: any other value (a typo would otherwise silently mean one or the other).
    """
    value = os.environ.get("LOSA_HUGEPAGES", "1").strip().lower()
    if value not in _ON + _OFF:
        raise LosaError(f"LOSA_HUGEPAGES={os.environ['LOSA_HUGEPAGES']!r} is not understood; use 1 (huge pages for "
                        "the weights decode streams, the default) or 0 (torch's ordinary pages)")
    return value in _ON


def hugepage_memory(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied into transparent-huge-page memory, where that is on and possible.

    Decode reads each weight once per token; on 4 KiB pages every page of it is a TLB miss, and torch's allocator
    never asks for huge pages (with THP in its common "madvise" mode, unless ``THP_MEM_ALLOC_ENABLE=1``). The
    kernel's ``hugepage_copy`` allocates 2 MiB-aligned memory, advises it and copies ``t`` there. What that is
    worth on LM heads: benchmarks/results/lm_head.md and lm_head_f32.md (the head loops on both memories) and
    lm_head_engine.md (whole SmolLM2 decode steps).

    Args:
        t: any tensor (the first call may build the kernel: :func:`load_kernel`).

    Returns:
        A copy of ``t`` (same dtype, shape and values) in huge-page memory when the compiled kernel is loaded,
        :func:`hugepages_enabled`, and ``t`` is a contiguous CPU tensor of at least 2 MiB on Linux; else ``t``.

    Raises:
        LosaError: a ``LOSA_HUGEPAGES`` value that is not understood (:func:`hugepages_enabled`).
    """
    k = load_kernel()
    if k is None or not hugepages_enabled():
        return t
    return k.hugepage_copy(t)
