"""Device selection."""

from __future__ import annotations

import torch

from losa.errors import LosaError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU. An unavailable explicit device is a clear error."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LosaError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
    return dev
