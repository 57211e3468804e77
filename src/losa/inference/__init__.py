"""Sparse inference runtime: compact pruned weights and a compiled CPU kernel (plus 2:4 on CUDA).

Typical use::

    losa.prune(model, tok, PruneConfig(method="wanda", sparsity=0.7))
    summary = losa.sparsify_for_inference(model, value_dtype="bfloat16")
    model.generate(...)                      # decode runs the sparse kernel
    save_sparse(model, "model.sparse.safetensors")
"""

from __future__ import annotations

from losa.inference.formats import FORMATS, Packed, pack, unpack
from losa.inference.kernel import kernel_available
from losa.inference.sparse_linear import DENSE_BATCH_THRESHOLD, DENSE_BATCH_THRESHOLD_BF16, SparseLinear
from losa.inference.sparsify import SparsifySummary, sparsify_for_inference
from losa.utils.lazy import lazy_attributes

# the compact file lives in losa.export (which imports this package): bound on first use
__getattr__, __dir__ = lazy_attributes(__name__, {"load_sparse": "losa.export.compact",
                                                  "save_sparse": "losa.export.compact"})

__all__ = [
    "DENSE_BATCH_THRESHOLD",
    "DENSE_BATCH_THRESHOLD_BF16",
    "FORMATS",
    "Packed",
    "SparseLinear",
    "SparsifySummary",
    "kernel_available",
    "load_sparse",
    "pack",
    "save_sparse",
    "sparsify_for_inference",
    "unpack",
]
