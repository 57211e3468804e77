"""Device selection."""

from __future__ import annotations

import os

import torch

from losa.errors import LosaError, option


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU. An unknown or unavailable explicit device is a clear error.

    Args:
        device: ``auto`` (or None), or a torch device name such as ``cpu``, ``cuda``, ``cuda:1``.
    Returns:
        The :class:`torch.device`.
    Raises:
        LosaError: ``device`` is not a device name, or names CUDA (or a CUDA index) that is not available.
    """
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise LosaError(f"device {str(device)!r} is not a device; set {option('device')} to auto, cpu, cuda or "
                        "cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LosaError(f"device {device!r} requested but CUDA is not available; set {option('device')} to cpu or "
                        "auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LosaError(f"device {device!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s); set {option('device')} to cuda:0 to cuda:{torch.cuda.device_count() - 1}, or "
                        "auto")
    return dev


def activation_budget(device: torch.device, fraction: float = 0.25, cap: int = 8 << 30) -> int:
    """Bytes of activations one calibration batch may take on ``device``: ``fraction`` of what is free
    (GPU free memory, or available RAM), at most ``cap``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = _available_ram()
    return int(min(cap, fraction * free))


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4 << 30
