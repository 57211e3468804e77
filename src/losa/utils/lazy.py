"""The one lazy-import pattern of losa: a package names its public attributes and the modules that
define them, and each is imported on first access (so ``import losa`` and ``losa --help`` do not
import torch or transformers)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module-level ``__getattr__`` and ``__dir__`` for ``package``.

    Args:
        package: the package's ``__name__``.
        exports: public name -> the module that defines it (e.g. ``{"prune": "losa.pipelines.oneshot"}``).
    Returns:
        ``(__getattr__, __dir__)`` to assign in the package's ``__init__``. The first access imports the
        module and caches the value in the package's namespace.
    Raises:
        AttributeError: (from ``__getattr__``) a name that is not exported.
    """

    def __getattr__(name: str) -> Any:
        target = exports.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(target), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
