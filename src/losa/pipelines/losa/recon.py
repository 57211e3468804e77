"""Per-layer reconstruction error of the sparse model against dense targets stored on disk.

The dense model's decoder-layer outputs on the first ``k`` calibration windows are computed once
(before any pruning) and written to a memory-mapped file ``[L, k, seq, hidden]`` in bfloat16 (kept as
raw 16-bit words, since NumPy has no bfloat16: same range as float32, ~3 significant digits, which
is plenty for a normalised error). Later only one decoder layer's slice for one batch is read at a
time, so RAM holds no more than the activations of a forward pass.

``L_l = Σ ‖y_dense − y_sparse‖² / Σ ‖y_dense‖²`` over those windows, with the sparse model run end to
end (errors of earlier layers propagate, as in the deployed model).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from losa.errors import LosaError
from losa.models.registry import get_decoder_layers


@contextlib.contextmanager
def _layer_output_hooks(model: nn.Module, fn: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    handles = []
    try:
        for i, layer in enumerate(get_decoder_layers(model)):
            def hook(_m, _a, out, i=i):
                fn(i, (out[0] if isinstance(out, tuple | list) else out).detach())

            handles.append(layer.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _forward_batches(model: nn.Module, ids: torch.Tensor, batch_size: int,
                     fn: Callable[[int, int, torch.Tensor], None]) -> None:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                with _layer_output_hooks(model, lambda i, y, s=start: fn(i, s, y)):
                    model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
    finally:
        model.train(was_training)


class DenseTargets:
    """Memory-mapped dense decoder-layer outputs (bfloat16 bits in an int16 ``.npy``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise LosaError(f"dense targets {self.path} missing; rerun without --resume to recompute them")
        self.data = np.load(self.path, mmap_mode="r")

    @classmethod
    def compute(cls, model: nn.Module, ids: torch.Tensor, path: str | os.PathLike, batch_size: int = 1) -> DenseTargets:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        n_layers = len(get_decoder_layers(model))
        hidden = getattr(model.config, "hidden_size", None) or model.config.n_embd
        tmp = path.with_name(f".{path.name}.partial.npy")
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int16, shape=(n_layers, len(ids), ids.shape[1], hidden))

        def store(i: int, start: int, y: torch.Tensor) -> None:
            arr[i, start:start + y.shape[0]] = y.to(torch.bfloat16).cpu().view(torch.int16).numpy()

        _forward_batches(model, ids, batch_size, store)
        arr.flush()
        os.replace(tmp, path)
        return cls(path)

    def layer(self, i: int, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.data[i, start:stop], copy=True)).view(torch.bfloat16).float()


def reconstruction_errors(model: nn.Module, ids: torch.Tensor, targets: DenseTargets, batch_size: int = 1) -> list[float]:
    """Normalised squared error of every decoder layer's output against the dense targets."""
    n_layers = len(get_decoder_layers(model))
    if targets.data.shape[:3] != (n_layers, len(ids), ids.shape[1]):
        raise LosaError("stored dense targets do not match the calibration windows; delete them and rerun")
    num = np.zeros(n_layers)
    den = np.zeros(n_layers)

    def acc(i: int, start: int, y: torch.Tensor) -> None:
        d = targets.layer(i, start, start + y.shape[0]).to(y.device)
        num[i] += float((y.float() - d).double().square().sum())
        den[i] += float(d.double().square().sum())

    _forward_batches(model, ids, batch_size, acc)
    return [float(a / b) if b > 0 else 0.0 for a, b in zip(num, den)]
