"""Per-layer reconstruction error of the sparse model against dense targets stored on disk.

Both passes are visitors of the layer-sequential engine (:mod:`losa.calib.engine`), so they hook
nothing themselves, work with layer onload, and propagate the model's own outputs layer by layer
(errors of earlier layers propagate, as in the deployed model).

The dense model's decoder-layer outputs on the first ``k`` calibration windows are computed once
(before any pruning) and written to a memory-mapped file ``[L, k, seq, hidden]`` in bfloat16 (kept as
raw 16-bit words, since NumPy has no bfloat16: same range as float32, ~3 significant digits, which
is plenty for a normalised error). Later only one decoder layer's slice for one batch is read at a
time.

Two definitions (``LoSAConfig.recon_error``; LoSA, Huang et al. 2025, Sec. 3.3):

- ``global``: ``L_l = Σ ‖y_dense − y_sparse‖² / Σ ‖y_dense‖²`` over all tokens and channels;
- ``channel``: the same ratio per hidden channel c, averaged over channels,
  ``L_l = mean_c Σ_t (y_dense − y_sparse)²_tc / Σ_t (y_dense)²_tc``, so a few massive-activation
  channels cannot dominate it (channels whose dense output is all zeros are left out).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from losa.calib.engine import LayerwiseEngine
from losa.calib.visitor import LayerContext, LayerVisitor
from losa.errors import LosaError, option
from losa.models.registry import get_decoder_layers


@dataclass
class _TargetWriter(LayerVisitor):
    """Stores every layer's outputs (bf16 bits) into ``arr[layer, window]``."""

    arr: np.ndarray
    batch_size: int

    def visit(self, ctx: LayerContext) -> None:
        for b, y in enumerate(ctx.outputs):
            start = b * self.batch_size
            self.arr[ctx.index, start:start + y.shape[0]] = y.to(torch.bfloat16).cpu().view(torch.int16).numpy()


class DenseTargets:
    """Memory-mapped dense decoder-layer outputs (bfloat16 bits in an int16 ``.npy``).

    Args:
        path: the ``.npy`` file written by :meth:`compute`.
    Raises:
        LosaError: the file is missing.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise LosaError(f"dense targets {self.path} missing; rerun without {option('resume')} to recompute them")
        self.data = np.load(self.path, mmap_mode="r")

    @classmethod
    def compute(cls, model: nn.Module, ids: torch.Tensor, path: str | os.PathLike, batch_size: int = 1,
                device: str = "auto", progress: bool = False) -> DenseTargets:
        """Run the (dense) model over ``ids`` (``[k, seq]``) and store every decoder layer's outputs at ``path``
        (written to a temporary name, then renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        n_layers = len(get_decoder_layers(model))
        hidden = model.config.get_text_config().hidden_size  # a multimodal model (Gemma 3) keeps it in text_config
        tmp = path.with_name(f".{path.name}.partial.npy")
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int16, shape=(n_layers, len(ids), ids.shape[1], hidden))
        LayerwiseEngine(model, ids, device=device, batch_size=batch_size, progress=progress,
                        desc="dense targets").run(_TargetWriter(arr, batch_size))
        arr.flush()
        del arr
        os.replace(tmp, path)
        return cls(path)

    def layer(self, i: int, start: int, stop: int) -> torch.Tensor:
        """Layer ``i``'s dense outputs for windows ``start:stop`` as float32 ``[stop - start, seq, hidden]``."""
        return torch.from_numpy(np.array(self.data[i, start:stop], copy=True)).view(torch.bfloat16).float()


@dataclass
class _ErrorVisitor(LayerVisitor):
    """Accumulates per layer and hidden channel Σ (y_dense − y)² and Σ y_dense², ``[L, hidden]`` float64."""

    targets: DenseTargets
    batch_size: int
    num: np.ndarray
    den: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.den = np.zeros_like(self.num)

    def visit(self, ctx: LayerContext) -> None:
        for b, y in enumerate(ctx.outputs):
            start = b * self.batch_size
            d = self.targets.layer(ctx.index, start, start + y.shape[0]).to(y.device)  # [b, seq, hidden]
            self.num[ctx.index] += (y.float() - d).double().square().sum((0, 1)).cpu().numpy()
            self.den[ctx.index] += d.double().square().sum((0, 1)).cpu().numpy()

    def errors(self, definition: str) -> list[float]:
        if definition == "global":
            num, den = self.num.sum(1), self.den.sum(1)
            return [float(a / b) if b > 0 else 0.0 for a, b in zip(num, den)]
        out = []
        for num, den in zip(self.num, self.den):
            live = den > 0
            out.append(float((num[live] / den[live]).mean()) if live.any() else 0.0)
        return out


#: the reconstruction-error definitions (see the module docstring)
RECON_ERRORS = ("global", "channel")


def reconstruction_errors(model: nn.Module, ids: torch.Tensor, targets: DenseTargets, batch_size: int = 1,
                          device: str = "auto", progress: bool = False, definition: str = "global") -> list[float]:
    """Normalised squared error of every decoder layer's output against the dense targets.

    Args:
        model: the (sparse, possibly adapter-wrapped) model.
        ids: the calibration windows the targets were computed on, ``[k, seq]``.
        targets: from :meth:`DenseTargets.compute`.
        batch_size: windows per forward (must match the targets' computation only in total).
        device: compute device of the engine.
        progress: show a progress bar.
        definition: ``global`` or ``channel`` (see the module docstring).
    Returns:
        one error per decoder layer (0 where the dense output is all zeros).
    Raises:
        LosaError: the stored targets do not match ``ids`` or the model; an unknown ``definition``.
    """
    n_layers = len(get_decoder_layers(model))
    if targets.data.shape[:3] != (n_layers, len(ids), ids.shape[1]):
        raise LosaError("stored dense targets do not match the calibration windows; delete them and rerun")
    if definition not in RECON_ERRORS:
        raise LosaError(f"unknown reconstruction error {definition!r}; choose one of {', '.join(RECON_ERRORS)}")
    visitor = _ErrorVisitor(targets, batch_size, np.zeros((n_layers, targets.data.shape[3])))
    LayerwiseEngine(model, ids, device=device, batch_size=batch_size, progress=progress,
                    desc="reconstruction errors").run(visitor)
    return visitor.errors(definition)
