"""``SparseLinear``: an inference-only linear layer holding a pruned weight in compact form.

Small batches (decode) run the compiled sparse kernel; batches above ``dense_batch_threshold`` rows
(prefill) decompress ``DENSE_TILE_ROWS`` rows at a time into a cache-resident buffer and run torch's
dense GEMM on it, so no dense copy of the weight is ever kept. On CPUs with AMX, bf16 batches between the
row loop's threshold and ``AMX_MAX_ROWS`` run the kernel's AMX tiles path instead (see ``AMX_ROW_LOOP_ROWS``), as do
float32 batches of bf16 values with ``prefill_dtype="bfloat16"``.

Precision follows the input, as in a dense layer: float32 inputs compute in float32; bfloat16 inputs
(a bf16 model) with bf16 values multiply in bf16 and sum in float32, like a dense bf16 ``F.linear``
(AVX512-BF16 ``vdpbf16ps`` where the CPU has it, 1.4-1.9x faster than the float32 loop). For float32
inputs ``prefill_dtype="bfloat16"`` rounds the large-batch GEMM's activations and outputs to bf16.
Other input dtypes (float16) compute in float32. Without a compiler the layer materialises its dense
weight once and uses ``F.linear`` (same outputs, no speed-up).

On CPUs without native bf16 (AVX2, AVX-512 without BF16, the scalar path, or ``LOSA_SPARSE_ISA`` forcing a
lower level) no prompt goes through torch's bf16 GEMM, which has no hardware support there (~5x slower than
float32 on a Zen 3): bf16 inputs are widened to float32 (exactly) for the float32 GEMM on decompressed tiles
and the output is rounded to bf16 once; ``prefill_dtype="bfloat16"`` has no effect. See
losa/inference/arith.py for the per-CPU choice of dtypes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from losa.errors import LosaError
from losa.inference import kernel as _kernel
from losa.inference import thresholds as _thresholds
from losa.inference.formats import FORMAT_CODES, Packed, pack, resolve_value_dtype, unpack

#: The thresholds below are defaults: ``losa bench-runtime`` measures them on the user's CPU and layers use
#: the cached values where present (losa/inference/thresholds.py).
#:
#: Batch rows (batch x new tokens) at or below which the sparse kernel beats decompress + dense GEMM.
#: Measured by benchmarks/bench_inference.py ("crossover" section of benchmarks/results/inference.md):
#: on the 4096x4096 layer (1 thread, Zen 4) the sparse kernel wins up to 12 rows and loses from 16 on,
#: both at 70 % bf16 and at 50 % fp32.
DENSE_BATCH_THRESHOLD = 12
#: The same for bf16 inputs with bf16 values (a bf16 model). Against the batch-rows-first tiles
#: (``DENSE_XW_MAX_ROWS``) the AVX512-BF16 row loop wins at 8 rows, is level at 12 and loses from 16 rows on
#: LLaMA-7B shapes (benchmarks/results/small_batch*.md).
DENSE_BATCH_THRESHOLD_BF16 = 12
#: Small layers (at most ``SMALL_LAYER_WEIGHTS`` weights) keep the bf16 row loop up to this many rows: the tiled
#: path's fixed cost (threads, per-tile GEMM calls) weighs more there. SmolLM2's 576x576 at 16 rows: loop
#: 0.72-1.28x of dense bf16 vs tiles 0.55-0.80x; 576x1536: level (small_batch*.md).
DENSE_BATCH_THRESHOLD_BF16_SMALL = 16
SMALL_LAYER_WEIGHTS = 1 << 20
#: Up to this many rows the decompressed bf16 tiles multiply as x · W_tileᵀ (GEMM rows = batch rows, written
#: straight into the result); above it as W_tile · xᵀ (GEMM rows = weight rows, one transpose at the end).
#: oneDNN's bf16 GEMM picks a poor kernel for the latter at 8-24 rows and K = 4096 (0.4-0.7x of dense bf16,
#: vs 0.9-1.2x for the former); from 48 rows the latter is level or faster (benchmarks/results/small_batch.md).
#: float32 GEMMs (MKL) showed no consistent winner and keep W_tile · xᵀ.
DENSE_XW_MAX_ROWS = 32
#: Layers at or below this density (kept fraction) run large bf16 batches through the zero-skipping sparse
#: GEMM instead of decompress + dense GEMM (bf16 model, bf16 values, AVX512-BF16 CPUs). Measured per layer on
#: LLaMA-7B shapes at 128 tokens (benchmarks/results/prefill_kernel*.md, three runs, 1 and 2 threads): 1.06-1.81x
#: a dense bf16 GEMM at 80 % sparsity, 0.94-1.36x at 70 % (1.14-1.36x on 1 thread), 0.73-1.03x at 60 %, 0.59-0.84x
#: at 50 % (decompress + GEMM: 0.91-1.01x at every sparsity). That was a Zen 4; where the CPU's own bf16 GEMM
#: is faster (a Zen 5, a Xeon with AMX) the tiles win at every batch size, which ``losa bench-runtime`` records as
#: ``sparse_gemm_batch_threshold: "never"``, and which is the default on CPUs not known to gain
#: (``thresholds.SPARSE_GEMM_CPUS``).
SPARSE_PREFILL_MAX_DENSITY = 0.35
#: Such layers use that sparse GEMM above this many bf16 rows and the decompressed tiles up to it: at 24
#: rows the tiles were 0.99-1.15x of dense bf16 and the sparse GEMM 0.82-0.98x, at 32 rows 1.00-1.08x vs
#: 1.01-1.15x (70 %, LLaMA-7B shapes; benchmarks/results/small_batch.md).
SPARSE_GEMM_BATCH_THRESHOLD = 24
#: CPUs with AMX (Sapphire Rapids and later Xeons) multiply bf16 batches on AMX tiles fed straight from the
#: expanded weights (``amx_mm_bf16``), whose cost hardly grows with the rows up to 32. The row loop stays up to
#: ``AMX_ROW_LOOP_ROWS`` rows (it won at 2 and 4 rows, the AMX kernel from 8), the AMX kernel runs above it up to
#: ``AMX_MAX_ROWS`` rows (``AMX_MAX_ROWS_SMALL`` on small layers, where it beat the decompressed tiles at every
#: count up to 256), and larger batches keep the paths above. Measured against the row loop and the
#: decompressed tiles on LLaMA-7B and SmolLM2 shapes, 1 and 2 threads (benchmarks/results/amx_batch.md).
#: float32 inputs with ``prefill_dtype="bfloat16"`` (bf16 values) take the AMX kernel above their own row-loop
#: threshold up to the same counts, rounded to bf16 as for the bf16 tiles.
AMX_ROW_LOOP_ROWS = 4
AMX_MAX_ROWS = 128
AMX_MAX_ROWS_SMALL = 256
#: Rows decompressed per dense tile in the prefill path (measured there: 256 ~ 1024 < 64 < whole matrix).
DENSE_TILE_ROWS = 256
#: The same for bf16 tiles on CPUs with AMX, whose tile GEMM gains from larger tiles (a Xeon with AMX, 128-row
#: prompts, LLaMA-7B shapes at 50 % and 70 %: 512 the fastest or level of 256/512/1024 on 1 and 2 threads;
#: benchmarks/results/tile_rows.md).
#: ``losa bench-runtime`` measures the best size on the user's CPU (``dense_tile_rows``).
DENSE_TILE_ROWS_AMX = 512


class SparseLinear(nn.Module):
    """``y = x · Wᵀ + b`` with ``W`` stored as bitmask/N:M metadata plus packed values.

    ``value_dtype`` (``torch.float32`` or ``torch.bfloat16``) is the precision of the stored weights;
    bfloat16 inputs compute in bf16 (products) with float32 sums; other inputs in float32.
    ``prefill_dtype`` is the precision of the large-batch GEMM for float32 inputs. Inference only.

    Raises:
        LosaError: a negative ``dense_batch_threshold``, an unknown ``prefill_dtype``, a bias of the wrong
            shape, or a ``LOSA_HUGEPAGES`` value that is not understood (the packed buffers go to huge-page
            memory: :func:`~losa.inference.kernel.hugepage_memory`).
    """

    def __init__(self, packed: Packed, bias: torch.Tensor | None = None,
                 dense_batch_threshold: int | None = None,
                 prefill_dtype: str | torch.dtype = torch.float32) -> None:
        super().__init__()
        if dense_batch_threshold is not None and int(dense_batch_threshold) < 0:
            raise LosaError(f"dense_batch_threshold={dense_batch_threshold} must be >= 0 (None: the measured default)")
        self.prefill_dtype = resolve_value_dtype(prefill_dtype, 'prefill_dtype')
        self.out_features, self.in_features = packed.shape
        self.fmt = packed.fmt
        #: rows above which the layer leaves the row loop (decompressed tiles + dense GEMM, or the AMX kernel);
        #: None = the measured default for the input dtype (DENSE_BATCH_THRESHOLD, or DENSE_BATCH_THRESHOLD_BF16[_SMALL]
        #: for bf16 inputs, AMX_ROW_LOOP_ROWS on CPUs with AMX)
        self.dense_batch_threshold = None if dense_batch_threshold is None else int(dense_batch_threshold)
        self._small = self.out_features * self.in_features <= SMALL_LAYER_WEIGHTS
        self._bf16_threshold = DENSE_BATCH_THRESHOLD_BF16_SMALL if self._small else DENSE_BATCH_THRESHOLD_BF16
        # fewer TLB misses when decode streams them
        self.register_buffer("meta", _kernel.hugepage_memory(packed.meta))
        self.register_buffer("values", _kernel.hugepage_memory(packed.values))
        self.register_buffer("row_ptr", packed.row_ptr)
        if bias is not None:
            bias = bias.detach().to("cpu", torch.float32).clone()
            if bias.shape != (self.out_features,):
                raise LosaError(f"bias shape {tuple(bias.shape)} does not match out_features={self.out_features}")
        self.register_buffer("bias", bias)
        self._dense_cache: torch.Tensor | None = None
        #: set by :meth:`plan_decode` (LeanDecoder): decode steps call the row loop without the dispatch
        self.decode_plan: DecodePlan | None = None
        #: large bf16 batches skip the zeros (see SPARSE_PREFILL_MAX_DENSITY) instead of decompressing, where
        #: ``losa bench-runtime`` measured that faster on this CPU or, unmeasured, on CPUs of its kind
        #: (``thresholds.sparse_gemm_enabled``)
        self.sparse_prefill = (packed.values.dtype == torch.bfloat16 and _kernel.kernel_available()
                               and _kernel.bf16_dot_available()
                               and self.nnz <= SPARSE_PREFILL_MAX_DENSITY * self.out_features * self.in_features
                               and _thresholds.sparse_gemm_enabled(_kernel.best_isa()))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   value_dtype: str | torch.dtype = torch.float32, fmt: str = "auto",
                   dense_batch_threshold: int | None = None,
                   prefill_dtype: str | torch.dtype = torch.float32) -> SparseLinear:
        """Pack ``weight [out, in]`` (zeros are the pruned entries)."""
        return cls(pack(weight, resolve_value_dtype(value_dtype), fmt), bias, dense_batch_threshold, prefill_dtype)

    @property
    def packed(self) -> Packed:
        return Packed(self.meta, self.values, self.row_ptr, (self.out_features, self.in_features), self.fmt)

    @property
    def value_dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nnz(self) -> int:
        return int(self.row_ptr[-1])

    @property
    def sparsity(self) -> float:
        """Fraction of stored zeros (for N:M formats: of the weights outside the index slots)."""
        return 1.0 - self.nnz / float(self.out_features * self.in_features)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``[out, in]`` weight (values widened exactly to ``dtype``)."""
        return unpack(self.packed, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.fmt}, value_dtype={str(self.value_dtype).replace('torch.', '')}, "
                f"prefill_dtype={str(self.prefill_dtype).replace('torch.', '')}, "
                f"sparsity={self.sparsity:.3f}, bf16_prefill={'sparse' if self.sparse_prefill else 'dense'}")

    def _apply(self, fn, recurse=True):
        # The packed buffers stay on the CPU in their own dtypes: ``model.to(bfloat16)`` or ``.half()``
        # must not reinterpret them. Precision is chosen once, by ``value_dtype``.
        return self

    def plan_decode(self) -> None:
        """Fix the row-loop dispatch for decode and ``torch.compile`` (see :func:`plan_decode`)."""
        self.decode_plan = plan_decode(self.values, self._small, self.dense_batch_threshold)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Lean on purpose: decode calls this once per layer and token, so Python overhead is visible
        # (the kernel converts float16/non-contiguous inputs itself).
        if x.shape[-1] != self.in_features:
            raise LosaError(f"input has {x.shape[-1]} features, SparseLinear expects {self.in_features}")
        if x.device.type != "cpu":
            raise LosaError(f"SparseLinear runs on the CPU, got an input on {x.device}; move the model and inputs to CPU")
        b = self._buffers
        values = b["values"]
        x2 = x.reshape(-1, self.in_features)
        compiling = torch.compiler.is_compiling()  # torch.compile traces the opaque op, never the kernel module
        if not compiling and _kernel.load_kernel() is None:
            if self._dense_cache is None:
                self._dense_cache = self.to_dense()
            y = F.linear(x2.float(), self._dense_cache, b["bias"])
        else:
            y = planned_row_loop(self.decode_plan, x2, b["meta"], values, b["row_ptr"], b["bias"],
                                 self.out_features, self.in_features, FORMAT_CODES[self.fmt])
            if y is None:  # not planned, or more rows than the row loop takes: the full dispatch
                threshold = -1 if self.dense_batch_threshold is None else self.dense_batch_threshold
                fn = torch.ops.losa.sparse_matmul if compiling else sparse_matmul
                y = fn(x2, b["meta"], values, b["row_ptr"], b["bias"], self.out_features, self.in_features,
                       FORMAT_CODES[self.fmt], threshold, self._small, self.sparse_prefill,
                       self.prefill_dtype == torch.bfloat16)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)


def row_loop_threshold(x_dtype: torch.dtype, values_dtype: torch.dtype, small: bool, isa: int) -> int:
    """Batch rows up to which the kernel's row loop (``spmm``) runs; above it the tiled GEMM paths.

    The measured value of ``losa bench-runtime`` for this CPU and ISA where cached, else the built-in default
    (``DENSE_BATCH_THRESHOLD``, or ``DENSE_BATCH_THRESHOLD_BF16`` for bf16 inputs with bf16 values on a CPU
    with native bf16, ``AMX_ROW_LOOP_ROWS`` where it also has AMX). Small layers with bf16 inputs on such CPUs
    always use ``DENSE_BATCH_THRESHOLD_BF16_SMALL`` (``AMX_ROW_LOOP_ROWS`` with AMX; ``losa bench-runtime``
    measures large layers only).

    Args:
        x_dtype: dtype of the activations.
        values_dtype: dtype of the packed values.
        small: whether the layer has at most ``SMALL_LAYER_WEIGHTS`` weights.
        isa: the kernel's ISA code (``losa.inference.kernel.best_isa()``).

    Returns:
        The threshold in rows.

    Raises:
        LosaError: the threshold cache exists but is not valid JSON.
    """
    measured = _thresholds.cached_thresholds(isa)
    if x_dtype == torch.bfloat16 and values_dtype == torch.bfloat16 and _kernel.native_bf16(isa):
        if _kernel.amx_available(isa):
            bf16_default = AMX_ROW_LOOP_ROWS
        else:
            bf16_default = DENSE_BATCH_THRESHOLD_BF16_SMALL if small else DENSE_BATCH_THRESHOLD_BF16
        return bf16_default if small else measured.get("dense_batch_threshold_bf16", bf16_default)
    return measured.get("dense_batch_threshold", DENSE_BATCH_THRESHOLD)


class DecodePlan(NamedTuple):
    """A layer's row-loop dispatch, fixed once (plain ints, so compiled code can use it).

    ``isa``: the kernel's ISA code; ``max_rows_bf16``: the row-loop threshold for bf16 inputs;
    ``max_rows_other``: for every other input dtype (float32, float16).
    """

    isa: int
    max_rows_other: int
    max_rows_bf16: int


def plan_decode(values: torch.Tensor, small: bool, threshold: int | None) -> DecodePlan | None:
    """A :class:`DecodePlan` for a layer, or None without the compiled kernel.

    Every decode step of a small model pays the dispatch of :func:`sparse_matmul` once per layer (ISA,
    environment, threshold cache), and compiled code cannot read the environment or the cache at run time.
    :class:`~losa.inference.decode.LeanDecoder` therefore plans each layer once: steps with few rows then
    call the kernel's row loop directly (:func:`planned_row_loop`), from a compiled graph as the dispatcher
    op ``losa_sparse_kernels::spmm``; larger batches keep the full dispatch. A later change of
    ``LOSA_SPARSE_ISA``, of the threshold cache (after :func:`losa.inference.thresholds.clear`), of torch's
    thread count (which selects the cached thresholds) or of the layer's ``dense_batch_threshold`` is seen after
    planning again (``plan_decode()`` on the layer);
    ``layer.decode_plan = None`` removes the plan.

    Args:
        values: the layer's packed values.
        small: whether the layer has at most ``SMALL_LAYER_WEIGHTS`` weights.
        threshold: the layer's own ``dense_batch_threshold`` (None: measured or built-in default).

    Returns:
        The plan, or None.

    Raises:
        LosaError: an unknown or unsupported ``LOSA_SPARSE_ISA``, or an invalid threshold cache.
    """
    if _kernel.load_kernel() is None:
        return None
    isa = _kernel.best_isa()
    if threshold is not None:
        return DecodePlan(isa, threshold, threshold)
    return DecodePlan(isa, row_loop_threshold(torch.float32, values.dtype, small, isa),
                      row_loop_threshold(torch.bfloat16, values.dtype, small, isa))


def planned_row_loop(plan: DecodePlan | None, x2: torch.Tensor, meta: torch.Tensor, values: torch.Tensor,
                     row_ptr: torch.Tensor, bias: torch.Tensor | None, out_features: int, in_features: int,
                     fmt_code: int) -> torch.Tensor | None:
    """``x2 · Wᵀ + b`` through the planned row loop when ``x2`` has few enough rows, else None.

    Args:
        plan: the layer's :class:`DecodePlan` (None: not planned, returns None).
        x2: inputs ``[rows, in_features]``.
        meta, values, row_ptr: the packed weight (see :mod:`losa.inference.formats`).
        bias: float32 bias ``[out_features]`` or None.
        out_features: rows of the weight.
        in_features: columns of the weight.
        fmt_code: :data:`~losa.inference.formats.FORMAT_CODES` of the format.

    Returns:
        ``[rows, out_features]`` in the dtype of ``x2``, or None when the plan does not cover this batch.
    """
    if plan is None or x2.shape[0] > (plan.max_rows_bf16 if x2.dtype == torch.bfloat16 else plan.max_rows_other):
        return None
    if torch.compiler.is_compiling():  # the dispatcher op rounds to x2's dtype itself (no fusable cast)
        return _kernel.spmm_op()(x2, meta, values, row_ptr, bias, out_features, in_features, fmt_code, plan.isa)
    y = _kernel.load_kernel().spmm(x2, meta, values, row_ptr, bias, out_features, in_features, fmt_code, plan.isa)
    return y if y.dtype == x2.dtype else y.to(x2.dtype)


def sparse_matmul(x2: torch.Tensor, meta: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor,
                  bias: torch.Tensor | None, out_features: int, in_features: int, fmt_code: int, threshold: int,
                  small: bool, sparse_prefill: bool, prefill_bf16: bool) -> torch.Tensor:
    """``x2 · Wᵀ + b`` of a packed weight through the compiled kernel, choosing the path by batch rows.

    The full dispatch of :meth:`SparseLinear.forward` (unplanned layers, and batches above a plan's row-loop
    threshold) as a plain function, also registered as the torch custom op ``losa::sparse_matmul``, so
    ``torch.compile`` traces around it.

    Args:
        x2: inputs ``[rows, in_features]``.
        meta: packed metadata (see :mod:`losa.inference.formats`).
        values: packed values (float32 or bfloat16).
        row_ptr: row offsets into ``values``.
        bias: float32 bias ``[out_features]`` or None.
        out_features: rows of the weight.
        in_features: columns of the weight.
        fmt_code: :data:`~losa.inference.formats.FORMAT_CODES` of the format.
        threshold: rows up to which the sparse kernel runs; -1 for the measured default of the input dtype.
        small: whether the layer has at most ``SMALL_LAYER_WEIGHTS`` weights.
        sparse_prefill: whether large bf16 batches may use the zero-skipping sparse GEMM.
        prefill_bf16: whether large float32 batches run a bf16 GEMM (only with native bf16).

    Returns:
        ``[rows, out_features]`` in the dtype of ``x2``.

    Raises:
        LosaError: when the compiled kernel is unavailable.
    """
    k = _kernel.load_kernel()
    if k is None:
        raise LosaError("the losa sparse kernel is not built; install a C++ compiler and ninja, then retry")
    isa = _kernel.best_isa()
    native = _kernel.native_bf16(isa)  # else no bf16 GEMM: bf16 inputs run the float32 paths
    bf16_in = x2.dtype == torch.bfloat16 and values.dtype == torch.bfloat16
    args = (meta, values, row_ptr, bias, out_features, in_features, fmt_code, isa)
    measured = _thresholds.cached_thresholds(isa)  # losa bench-runtime on this CPU, else {}
    if threshold < 0:
        threshold = row_loop_threshold(x2.dtype, values.dtype, small, isa)
    rows = x2.shape[0]
    # the AMX kernel takes bf16 values with bf16 inputs, or other inputs rounded to bf16 for a bf16 prompt GEMM
    amx_in = values.dtype == torch.bfloat16 and (x2.dtype == torch.bfloat16 or prefill_bf16)
    if rows <= threshold:
        y = k.spmm(x2, *args)
    elif (amx_in and rows <= (AMX_MAX_ROWS_SMALL if small else measured.get("amx_max_rows", AMX_MAX_ROWS))
          and _kernel.amx_available(isa)):
        if bf16_in:
            y = k.amx_mm_bf16(x2, *args[:-1])
        else:  # as the bf16 tiles: activations and the GEMM's output rounded to bf16, the bias added in float32
            y = k.amx_mm_bf16(x2.to(torch.bfloat16), meta, values, row_ptr, None, out_features, in_features, fmt_code)
            y = y.float() if bias is None else y.float() + bias
    elif bf16_in and native and sparse_prefill and rows > measured.get("sparse_gemm_batch_threshold",
                                                                         SPARSE_GEMM_BATCH_THRESHOLD):
        y = k.sparse_mm_bf16(x2, *args[:-1])
    else:
        bf16_gemm = native and (bf16_in or prefill_bf16)
        tiles = k.dense_mm_xw if bf16_gemm and rows <= DENSE_XW_MAX_ROWS else k.dense_mm
        y = tiles(x2, *args, tile_rows(measured, bf16_gemm), bf16_gemm)
    return y if y.dtype == x2.dtype else y.to(x2.dtype)


def tile_rows(measured: dict[str, int], bf16_gemm: bool) -> int:
    """Rows per decompressed tile: ``dense_tile_rows`` measured by ``losa bench-runtime`` on this CPU, else
    :data:`DENSE_TILE_ROWS_AMX` for bf16 GEMMs on an AMX CPU and :data:`DENSE_TILE_ROWS` otherwise.

    Args:
        measured: this CPU's cached thresholds (:func:`losa.inference.thresholds.cached_thresholds`).
        bf16_gemm: whether the tiles feed torch's bf16 GEMM (native bf16 only).

    Returns:
        The tile height in weight rows.
    """
    if "dense_tile_rows" in measured:
        return measured["dense_tile_rows"]
    return DENSE_TILE_ROWS_AMX if bf16_gemm and _thresholds.amx_present() else DENSE_TILE_ROWS


@torch.library.custom_op("losa::sparse_matmul", mutates_args=())
def _sparse_matmul_op(x2: torch.Tensor, meta: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor,
                      bias: torch.Tensor | None, out_features: int, in_features: int, fmt_code: int, threshold: int,
                      small: bool, sparse_prefill: bool, prefill_bf16: bool) -> torch.Tensor:
    """:func:`sparse_matmul` as an opaque op for ``torch.compile`` (eager code calls the function directly)."""
    return sparse_matmul(x2, meta, values, row_ptr, bias, out_features, in_features, fmt_code, threshold, small,
                         sparse_prefill, prefill_bf16)


@_sparse_matmul_op.register_fake
def _(x2: torch.Tensor, meta: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, bias: torch.Tensor | None,
      out_features: int, in_features: int, fmt_code: int, threshold: int, small: bool, sparse_prefill: bool,
      prefill_bf16: bool) -> torch.Tensor:
    return x2.new_empty((x2.shape[0], out_features))
