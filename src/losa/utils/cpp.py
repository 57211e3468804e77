"""Compile-on-first-use C++ extensions (torch.utils.cpp_extension + ninja), with a clean failure type.

Builds are cached by torch (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), so only the
first use on a machine pays the compile. Callers catch :class:`KernelUnavailable` and fall back to a
pure-torch path with the same numbers.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType


class KernelUnavailable(RuntimeError):
    """A C++ kernel could not be compiled or loaded here."""


def build_extension(name: str, source: Path) -> ModuleType:
    """Compile (once) and import ``source`` as extension ``name``; raises :class:`KernelUnavailable`."""
    if os.environ.get("LOSA_DISABLE_KERNEL"):
        raise KernelUnavailable("LOSA_DISABLE_KERNEL is set")
    try:
        from torch.utils.cpp_extension import load

        return load(
            name=name,
            sources=[str(source)],
            extra_cflags=["-O3", "-fopenmp", "-std=c++17"],
            extra_ldflags=["-fopenmp"],
            verbose=bool(os.environ.get("LOSA_VERBOSE_BUILD")),
        )
    except Exception as exc:  # compiler missing, headers missing, ninja missing ...
        raise KernelUnavailable(f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}") from exc
