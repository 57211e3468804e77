"""Compile-on-first-use C++ extensions (torch.utils.cpp_extension + ninja), with a clean failure type.

Builds are cached by torch (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), so only the
first use on a machine pays the compile. Callers catch :class:`KernelUnavailable` and fall back to a
pure-torch path with the same numbers.

torch serialises builds with a ``lock`` file that a killed build leaves behind, after which every later
load waits for it forever. Builds therefore also take an OS file lock (``flock``: released when its
holder dies, however it dies); whoever holds it knows that a ``lock`` file it finds is stale and removes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

#: our lock file in the build directory (torch's own is ``lock``)
BUILD_LOCK = "losa-build.lock"


class KernelUnavailable(RuntimeError):
    """A C++ kernel could not be compiled or loaded here."""


def build_directory(name: str) -> Path:
    """torch's build directory for extension ``name`` (created if missing)."""
    from torch.utils import cpp_extension

    try:
        return Path(cpp_extension._get_build_directory(name, verbose=False))
    except AttributeError:  # private helper gone in some torch version: same layout, CPU builds
        import sys

        root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
            cpp_extension.get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}_cpu")
        path = Path(root) / name
        path.mkdir(parents=True, exist_ok=True)
        return path


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Hold the build lock of ``directory``; inside it, torch's leftover ``lock`` file is removed."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock only
        yield
        return
    with open(directory / BUILD_LOCK, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.warning("waiting for another process that is building %s ...", directory.name)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            stale = directory / "lock"
            if stale.exists():
                log.warning("removing %s, left by an interrupted build", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _header_flag(headers: list[Path] | None) -> list[str]:
    if not headers:
        return []
    import hashlib

    digest = hashlib.sha256(b"".join(Path(h).read_bytes() for h in headers)).hexdigest()[:16]
    return [f"-DLOSA_HEADERS_SHA={digest}"]


def build_extension(name: str, source: Path | list[Path], headers: list[Path] | None = None) -> ModuleType:
    """Compile (once) and import ``source`` (one file or several) as extension ``name``; raises
    :class:`KernelUnavailable`.

    torch rebuilds an extension when its sources or flags change, not its headers: the contents of ``headers``
    go into a ``-D`` flag, so that changing one rebuilds too.
    """
    if os.environ.get("LOSA_DISABLE_KERNEL"):
        raise KernelUnavailable("LOSA_DISABLE_KERNEL is set")
    try:
        from torch.utils.cpp_extension import load

        directory = build_directory(name)
        if not (directory / f"{name}.so").exists():
            log.info("compiling the %s C++ kernel (once per machine, about a minute) ...", name)
        with build_lock(directory):
            return load(
                name=name,
                sources=[str(p) for p in (source if isinstance(source, list) else [source])],
                extra_cflags=["-O3", "-fopenmp", "-std=c++17", *_header_flag(headers)],
                extra_ldflags=["-fopenmp"],
                build_directory=str(directory),
                verbose=bool(os.environ.get("LOSA_VERBOSE_BUILD")),
            )
    except Exception as exc:  # compiler missing, headers missing, ninja missing ...
        raise KernelUnavailable(f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}") from exc
