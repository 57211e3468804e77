"""Swap the pruned linear layers of a loaded model for sparse inference modules.

On the CPU every pruned linear inside the decoder layers becomes a :class:`SparseLinear`. On CUDA,
2:4 layers get PyTorch's semi-structured sparse weight (``torch.sparse.to_sparse_semi_structured``,
fp16/bf16 tensor cores) where it is measured faster than the dense one on that GPU (:mod:`losa.inference.cuda24`),
and other layers stay dense. The LM head and embeddings are never touched.
Fused mixture-of-experts weights are unfused for good first (:func:`losa.models.unfuse_experts`), so each
expert matrix is a linear of its own that is counted and converted like any other.
"""

from __future__ import annotations

import logging
import warnings
from typing import TypedDict

import torch
from torch import nn

from losa.errors import LosaError
from losa.inference.cuda24 import DECISION_BATCHES, SemiStructuredChooser, check_mode, is_converted
from losa.inference.formats import resolve_value_dtype
from losa.inference.sparse_linear import SparseLinear
from losa.models.linear import get_weight, is_prunable
from losa.models.moe import unfuse_experts
from losa.models.offload import is_offloaded
from losa.models.registry import (
    get_arch,
    get_decoder_layers,
    linear_modules,
    replace_module,
    supported_model_types,
)

log = logging.getLogger(__name__)
#: the start of the warning for a model with no linear sparse enough to convert (the CLI words it itself)
NOTHING_SPARSE = "no linear layer is sparse enough to convert"


def _compute_description(model_dtype: torch.dtype, vdtype: torch.dtype) -> str:
    """Which arithmetic the CPU sparse layers use for activations of ``model_dtype``."""
    if model_dtype == torch.bfloat16 and vdtype == torch.bfloat16:
        from losa.inference.kernel import bf16_dot_available, kernel_available

        fast = kernel_available() and bf16_dot_available()
        # without AVX512-BF16 the inputs are widened to float32 inside the layer, as the arithmetic line says
        return ("bf16 products, float32 sums (AVX512-BF16)" if fast else
                "float32 on the widened bf16 inputs (exact products, float32 sums; no AVX512-BF16)")
    return "float32"


class SparsifySummary(TypedDict):
    """What :func:`sparsify_for_inference` did (a typed mapping, so ``summary["replaced"]`` keeps working)."""

    replaced: int  #: linears now sparse (CPU: SparseLinear; CUDA: 2:4 semi-structured)
    kept_dense: int  #: linears below ``min_sparsity`` (or, on CUDA, not 2:4 or not faster sparse), left as they were
    semi_structured_slower: int  #: CUDA 2:4 linears kept dense because the semi-structured form was not faster
    semi_structured_refused: int  #: CUDA 2:4 linears kept dense because PyTorch refused their semi-structured form
    dense_bytes: int  #: bytes of the replaced CPU weights before
    sparse_bytes: int  #: bytes of their packed form
    device: str  #: "cpu" or "cuda"
    value_dtype: str  #: stored precision of the sparse values
    prefill_dtype: str  #: precision of the prompt GEMM for float32 inputs
    compute: str  #: the arithmetic the layers use for this model's activations
    sparse_prefill_layers: int  #: layers whose large bf16 batches skip zeros (SPARSE_PREFILL_MAX_DENSITY)


def sparse_summary(model: nn.Module) -> SparsifySummary:
    """The :class:`SparsifySummary` of the sparse layers a model already has (e.g. after
    :func:`~losa.export.compact.load_sparse`), as :func:`sparsify_for_inference` would have reported them.

    Args:
        model: any module; its :class:`SparseLinear` layers are counted.

    Returns:
        The summary; ``dense_bytes`` is what the layers' weights take dense in the model's dtype, ``kept_dense`` is
        0 (a compact file does not say which layers it left dense), ``value_dtype`` / ``prefill_dtype`` are the
        first layer's ("float32" without sparse layers).
    """
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    dtype = next(model.parameters()).dtype
    summary = _empty_summary(dtype, layers[0].value_dtype if layers else torch.float32,
                             layers[0].prefill_dtype if layers else torch.float32, "cpu")
    for m in layers:
        _count(summary, m, m.out_features * m.in_features * dtype.itemsize)
    return summary


def _empty_summary(model_dtype: torch.dtype, vdtype: torch.dtype, prefill_dtype: torch.dtype,
                   device: str) -> SparsifySummary:
    """A :class:`SparsifySummary` with nothing counted yet."""
    return {"replaced": 0, "kept_dense": 0, "semi_structured_slower": 0, "semi_structured_refused": 0, "dense_bytes": 0, "sparse_bytes": 0, "device": device,
            "value_dtype": str(vdtype).replace("torch.", ""), "prefill_dtype": str(prefill_dtype).replace("torch.", ""),
            "compute": _compute_description(model_dtype, vdtype), "sparse_prefill_layers": 0}


def _count(summary: SparsifySummary, layer: SparseLinear, dense_bytes: int) -> None:
    """Add one CPU sparse layer (whose dense weight took ``dense_bytes``) to ``summary``."""
    summary["replaced"] += 1
    summary["dense_bytes"] += dense_bytes
    summary["sparse_bytes"] += layer.packed.nbytes()
    summary["sparse_prefill_layers"] += int(layer.sparse_prefill)


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(full name, module)`` of every linear to consider: the decoder layers' prunable linears of a
    registered Hugging Face family (experts unfused for good), else every ``nn.Linear`` / ``Conv1D`` of
    any module tree (as torchao's one-call API), already converted ones skipped."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in supported_model_types():
        return [(n, m) for n, m in model.named_modules() if is_prunable(m) and not isinstance(m, SparseLinear)]
    spec = get_arch(model)
    unfuse_experts(model)  # for good: the inference model runs its experts as (sparse) linears
    prefix = {id(layer): name for name, layer in model.named_modules()}
    out = []
    for layer in get_decoder_layers(model, spec):
        if any(isinstance(m, SparseLinear) for m in layer.modules()):
            linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}  # already converted
        else:
            linears = linear_modules(layer, spec)
        out += [(f"{prefix[id(layer)]}.{n}", m) for n, m in linears.items()]
    return out


def _check_settings_of_converted(model: nn.Module, value_dtype: torch.dtype, fmt: str,
                                 dense_batch_threshold: int | None, prefill_dtype: torch.dtype) -> None:
    """A second call converts only the layers still dense: it cannot change the settings of those converted
    before, so settings that differ from theirs are refused instead of being silently ignored."""
    done = [m for m in model.modules() if isinstance(m, SparseLinear)]
    if not done:
        return
    want: dict[str, object] = {"value_dtype": value_dtype, "prefill_dtype": prefill_dtype,
                               "dense_batch_threshold": dense_batch_threshold}
    if fmt != "auto":  # auto picks per layer
        want["fmt"] = fmt
    differs = [f"{k}={getattr(m, k)} (this call: {v})" for k, v in want.items()
               for m in [next((m for m in done if getattr(m, k) != v), None)] if m is not None]
    if differs:
        raise LosaError(f"the model is already sparsified with {', '.join(differs).replace('torch.', '')}; pass the "
                        "same settings to convert its remaining dense layers, or sparsify a freshly loaded model")


def sparsify_for_inference(model: nn.Module, value_dtype: str | torch.dtype = "float32", fmt: str = "auto",
                           min_sparsity: float = 0.25,
                           dense_batch_threshold: int | None = None,
                           prefill_dtype: str | torch.dtype = "float32",
                           semi_structured: str = "auto") -> SparsifySummary:
    """Replace, in place, every decoder linear with sparsity >= ``min_sparsity`` by a sparse module.

    Works on any ``nn.Module``: for a registered Hugging Face family the decoder layers' prunable
    linears are considered, for anything else every ``nn.Linear`` in the tree (like torchao's
    ``sparsify_``); dense layers (below ``min_sparsity``) stay as they are.

    ``value_dtype`` ("float32" or "bfloat16") is the stored precision on the CPU (see
    ``SparseLinear.value_dtype``); ``prefill_dtype`` ("float32" or "bfloat16") is the precision of the
    large-batch (prompt) GEMM for float32 activations; ``fmt`` is "auto", "bitmask", "nm24" or "nm14".
    The layers compute in the precision of their inputs: in a bf16 model (``model.to(torch.bfloat16)``)
    with bf16 values they multiply in bf16 and sum in float32, like dense bf16 layers, and decode up to
    ~1.9x faster than with float32 activations on CPUs with AVX512-BF16. Returns a summary:
    ``{"replaced", "kept_dense", "semi_structured_slower", "semi_structured_refused", "dense_bytes", "sparse_bytes",
    "device", "value_dtype", "prefill_dtype", "compute", "sparse_prefill_layers"}`` (bytes are over the replaced CPU layers; ``compute`` says which
    arithmetic the layers use for this model's activations; ``sparse_prefill_layers`` counts the layers that
    run large bf16 batches through the zero-skipping sparse GEMM, see ``SPARSE_PREFILL_MAX_DENSITY``).
    ``model.generate`` keeps working (KV cache included). Called again on a sparsified model it converts
    the layers still dense, with the settings of the first call (other settings raise ``LosaError``).

    Args:
        model: a pruned model (any ``nn.Module``), on the CPU (or CUDA for 2:4); modified in place.
        value_dtype: precision of the stored non-zero values, "float32" (exact) or "bfloat16" (half the bytes).
        fmt: index format of the kept positions, "auto", "bitmask", "nm24" or "nm14".
        min_sparsity: fraction of zeros in ``[0, 1]`` from which a linear is converted (others stay dense).
        dense_batch_threshold: rows of a batch above which a layer decompresses tiles for a dense GEMM
            (None: the value measured on this CPU by ``losa bench-runtime``, else the built-in default).
        prefill_dtype: precision of the large-batch GEMM for float32 activations, "float32" or "bfloat16".
        semi_structured: CUDA only: "auto" gives a 2:4 fp16/bf16 linear PyTorch's semi-structured weight where
            that is measured faster than dense on this GPU for its shape at a decode step's and a prompt's batch
            (each distinct shape timed once; :mod:`losa.inference.cuda24`), "always" converts every 2:4 linear,
            "never" none.
    Returns:
        The summary above (a dict; ``replaced`` 0 means no linear reached ``min_sparsity``: nothing changed).

    Raises:
        LosaError: ``min_sparsity`` outside [0, 1], an unknown value / prefill dtype, format or
            ``semi_structured`` mode, a negative
            ``dense_batch_threshold``, settings that differ from an earlier call's on the same model, a model
            offloaded by accelerate, a device other than CPU (and CUDA 2:4), or a ``LOSA_HUGEPAGES`` value
            that is not understood (:func:`~losa.inference.kernel.hugepages_enabled`).
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise LosaError(f"min_sparsity={min_sparsity} is outside [0, 1]; use e.g. 0.25")
    vdtype = resolve_value_dtype(value_dtype)
    chooser = SemiStructuredChooser(check_mode(semi_structured))
    _check_settings_of_converted(model, vdtype, fmt, dense_batch_threshold,
                                 resolve_value_dtype(prefill_dtype, "prefill_dtype"))
    if is_offloaded(model):
        raise LosaError("sparsify_for_inference needs every weight in memory, and this model is offloaded by "
                        "accelerate; load it without offloading (no device_map with max_memory/offload_folder)")
    device = next(model.parameters()).device
    summary = _empty_summary(next(model.parameters()).dtype, vdtype, resolve_value_dtype(prefill_dtype, "prefill_dtype"),
                             device.type)
    converted_before = 0
    for name, mod in _candidates(model):
        if is_converted(mod):  # a semi-structured weight from an earlier call
            converted_before += 1
            continue
        w = get_weight(mod).detach()
        sparsity = float((w == 0).float().mean())
        if sparsity < min_sparsity:
            summary["kept_dense"] += 1
            continue
        if device.type == "cuda":
            summary["replaced" if chooser.apply(mod) else "kept_dense"] += 1
            continue
        if device.type != "cpu":
            raise LosaError(f"sparse inference supports CPU (and CUDA 2:4), not {device.type}; move the model to CPU")
        bias = getattr(mod, "bias", None)
        new = SparseLinear.from_dense(w, bias, vdtype, fmt, dense_batch_threshold, prefill_dtype)
        replace_module(model, name, new)
        _count(summary, new, w.numel() * w.element_size())
    summary["semi_structured_slower"], summary["semi_structured_refused"] = chooser.slower, chooser.refused
    if chooser.slower:
        log.warning("%d 2:4 linear(s) kept dense: PyTorch's semi-structured sparse weight was not faster than the dense "
                    "one on this GPU at %s-row batches (%s); semi_structured='always' converts them anyway",
                    chooser.slower, "- and ".join(map(str, DECISION_BATCHES)),
                    "; ".join(f"{'x'.join(map(str, k[0]))}: " + ", ".join(f"{s:.2f}x at {b}" for b, s in v.items())
                              for k, v in chooser.measured.items() if v is not None))
    if chooser.refused:
        log.warning("%d 2:4 linear(s) kept dense: PyTorch refused their semi-structured weight (a shape or GPU its "
                    "kernels do not take)", chooser.refused)
    if device.type == "cuda" and summary["replaced"] == 0 and not (chooser.slower or chooser.refused
                                                                     or converted_before):
        log.warning("no 2:4 fp16/bf16 layer found: CUDA semi-structured sparsity needs 2:4 masks and a "
                    "half-precision model (load with dtype='bfloat16')")
    elif (device.type != "cuda" and summary["replaced"] == 0
          and not any(isinstance(m, SparseLinear) for m in model.modules())):
        warnings.warn(f"{NOTHING_SPARSE} (min_sparsity={min_sparsity:g}): nothing was converted; prune the model "
                      "first (losa.prune)", stacklevel=2)
    return summary
