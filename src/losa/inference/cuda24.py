"""2:4 layers on CUDA: PyTorch's semi-structured sparse weight, used only where it is faster than the dense one.

``torch.sparse.to_sparse_semi_structured`` stores a 2:4 fp16/bf16 weight for the sparse tensor cores. Its
``F.linear`` is not faster on every GPU: on an H200 (torch 2.11, CUDA 13) it was slower than the dense layer for
every LLaMA-7B layer shape and batch measured (``benchmarks/results/gpu_check.md``; PyTorch's cuSPARSELt path
sets up its matmul descriptors on every call, pytorch/pytorch#153825, and its CUTLASS path supports Ampere-class
GPUs only). So ``semi_structured="auto"`` times both forms of each distinct weight
shape once on the layer's own GPU, at a decode step's batch and at a prompt's (:data:`DECISION_BATCHES`), and
converts a layer only when the sparse form is faster at both; ``"always"`` and ``"never"`` decide without timing.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from losa.errors import LosaError
from losa.inference.formats import nm_fits

#: values of ``sparsify_for_inference(semi_structured=...)``
SEMI_STRUCTURED_MODES = ("auto", "always", "never")
#: rows of the input batches at which "auto" times a shape: one decode step, one long prompt
DECISION_BATCHES = (1, 2048)


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`SEMI_STRUCTURED_MODES`.

    Raises:
        LosaError: any other value, naming the allowed ones.
    """
    if mode not in SEMI_STRUCTURED_MODES:
        raise LosaError(f"semi_structured={mode!r} is not one of {', '.join(SEMI_STRUCTURED_MODES)}; use 'auto' "
                        "(convert 2:4 layers where PyTorch's semi-structured weight is measured faster)")
    return mode


def qualifies(mod: nn.Module) -> bool:
    """Whether ``mod`` can take a semi-structured weight: an ``nn.Linear`` with an fp16/bf16 weight whose
    non-zeros fit 2:4 along the input dimension."""
    w = getattr(mod, "weight", None)
    return (isinstance(mod, nn.Linear) and w is not None and w.dtype in (torch.float16, torch.bfloat16)
            and nm_fits(w.detach() != 0, 2, 4))


def is_converted(mod: nn.Module) -> bool:
    """Whether ``mod`` already has a semi-structured weight (an earlier :func:`convert`)."""
    from torch.sparse import SparseSemiStructuredTensor

    return isinstance(getattr(mod, "weight", None), SparseSemiStructuredTensor)


def convert(mod: nn.Linear) -> bool:
    """Give ``mod`` (see :func:`qualifies`) PyTorch's semi-structured sparse weight, in place.

    Returns:
        False, leaving ``mod`` as it was, where PyTorch refuses the weight (a shape its kernels do not take, a GPU
        without them).
    """
    from torch.sparse import to_sparse_semi_structured

    try:
        sparse = to_sparse_semi_structured(mod.weight.detach())
    except RuntimeError:
        return False
    mod.weight = nn.Parameter(sparse, requires_grad=False)
    return True


def cuda_ms(fn: Callable[[], object], reps: int) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn`` on the current CUDA stream (CUDA events)."""
    out = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def measure_speedups(weight: torch.Tensor, batches: tuple[int, ...] = DECISION_BATCHES,
                     reps: int = 10) -> dict[int, float] | None:
    """Speed-up of the semi-structured ``F.linear`` over the dense one for ``weight`` on its GPU.

    Args:
        weight: a 2:4 fp16/bf16 weight, shape ``(out_features, in_features)``, on a CUDA device.
        batches: rows of the random inputs, shape ``(batch, in_features)``, in the weight's dtype.
        reps: timed calls of each form per batch after three warm-up calls, interleaved in pairs.
    Returns:
        ``{batch: dense median ms / semi-structured median ms}``, 0.0 for a batch the sparse form fails on; None
        where PyTorch refuses to convert the weight.
    """
    from torch.sparse import to_sparse_semi_structured

    try:
        sparse = to_sparse_semi_structured(weight.detach())
    except RuntimeError:  # a shape or GPU that the semi-structured kernels do not take
        return None
    out: dict[int, float] = {}
    with torch.inference_mode(), torch.cuda.device(weight.device):  # events on the weight's own GPU
        for b in batches:
            x = torch.randn(b, weight.shape[1], device=weight.device, dtype=weight.dtype)
            try:
                for _ in range(3):
                    F.linear(x, weight), F.linear(x, sparse)
            except RuntimeError:  # a shape or GPU that the semi-structured kernels do not support
                out[b] = 0.0
                continue
            dense_ms, sparse_ms = [], []
            for _ in range(reps):
                dense_ms += cuda_ms(lambda x=x: F.linear(x, weight), 1)
                sparse_ms += cuda_ms(lambda x=x: F.linear(x, sparse), 1)
            out[b] = statistics.median(dense_ms) / statistics.median(sparse_ms)
    return out


class SemiStructuredChooser:
    """Decides per layer whether to convert (see the module docstring); "auto" measures each distinct
    ``(shape, dtype, device)`` once.

    Attributes:
        mode: one of :data:`SEMI_STRUCTURED_MODES`.
        measured: ``{(shape, dtype, device): {batch: speed-up}}`` of the shapes timed so far.
        slower: layers that qualified but were kept dense because the sparse form was not faster.
        refused: layers that qualified but whose weight PyTorch refused to convert (kept dense).
    """

    def __init__(self, mode: str = "auto",
                 measure: Callable[[torch.Tensor], dict[int, float] | None] = measure_speedups) -> None:
        self.mode = check_mode(mode)
        self.measure = measure
        self.measured: dict[tuple, dict[int, float] | None] = {}
        self.slower = self.refused = 0

    def faster(self, weight: torch.Tensor) -> bool | None:
        """Whether the semi-structured form of ``weight`` is faster than the dense one at every batch; None where
        PyTorch refuses to convert it."""
        key = (tuple(weight.shape), weight.dtype, weight.device)
        if key not in self.measured:
            self.measured[key] = self.measure(weight)
        speedups = self.measured[key]
        return None if speedups is None else all(s > 1.0 for s in speedups.values())

    def apply(self, mod: nn.Module) -> bool:
        """Convert ``mod`` if it qualifies and the mode (or the timing) says so.

        Returns:
            True if ``mod`` now has a semi-structured weight.
        """
        if self.mode == "never" or not qualifies(mod):
            return False
        faster = self.faster(mod.weight) if self.mode == "auto" else True
        if faster is False:
            self.slower += 1
            return False
        if faster is None or not convert(mod):
            self.refused += 1
            return False
        return True
