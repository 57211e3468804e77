"""Compile-on-first-use C++ extensions (torch.utils.cpp_extension + ninja), with a clean failure type.

Builds are cached by torch (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), so only the
first use on a machine pays the compile. Each distinct build (the sources' and headers' paths and contents,
flags, compiler, torch and Python: :func:`build_digest`) has its own directory, ``<extension>/<digest>``: two
checkouts or installs of losa on one machine each keep their build instead of recompiling over each other's
whenever the other one has run (in one shared directory torch and ninja rebuild whenever the sources or their
paths differ from the last build, and a process that loads while the other one builds waits for it). Old
builds' directories are not removed. Callers catch :class:`KernelUnavailable` and fall back to a pure-torch
path with the same numbers.

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
#: left in a build's directory when that build failed and a fallback build replaced it: later processes go straight
#: to the fallback instead of failing the same compilation again (its text is the first error)
BUILD_FAILED = "losa-build-failed"


class KernelUnavailable(RuntimeError):
    """A C++ kernel could not be compiled or loaded here."""


#: compiler and linker flags of every build (part of the build's digest)
CFLAGS = ("-O3", "-fopenmp", "-std=c++17")
LDFLAGS = ("-fopenmp",)


def build_digest(sources: list[Path], headers: list[Path] | None = None, extra_cflags: tuple[str, ...] = ()) -> str:
    """What identifies one build of an extension (16 hex digits): a hash of its sources' and headers' absolute
    paths and contents, the flags (:data:`CFLAGS`, ``extra_cflags``, :data:`LDFLAGS`), the compiler named by
    ``$CXX``, and the torch and Python installs.

    The paths count because ninja rebuilds when a source's path changes: two checkouts of the same code at
    different places would otherwise share a directory and rebuild over each other.

    Args:
        sources: the C++ files compiled.
        headers: files they include (torch tracks only the sources; a changed header must rebuild too).
        extra_cflags: compiler flags of this build on top of :data:`CFLAGS`.

    Returns:
        The digest, the name of the build's directory under the extension's.
    """
    import hashlib
    import sys
    import sysconfig

    import torch

    h = hashlib.sha256()
    for part in (torch.__version__, str(Path(torch.__file__).parent), sys.version, sysconfig.get_path("include"),
                 os.environ.get("CXX", ""), *CFLAGS, *extra_cflags, "|", *LDFLAGS):
        h.update(part.encode() + b"\0")
    for path in [*sources, *(headers or [])]:
        h.update(str(Path(path).resolve()).encode() + b"\0" + Path(path).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_directory(name: str, digest: str | None = None) -> Path:
    """torch's build directory for extension ``name``, or its subdirectory ``digest`` (created if missing).

    Args:
        name: the extension's name.
        digest: :func:`build_digest` of one build (None: the extension's own directory).

    Returns:
        The directory.
    """
    from torch.utils import cpp_extension

    try:
        path = Path(cpp_extension._get_build_directory(name, verbose=False))
    except AttributeError:  # private helper gone in some torch version: same layout, CPU builds
        import sys

        root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
            cpp_extension.get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}_cpu")
        path = Path(root) / name
    if digest is not None:
        path = path / digest
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


def build_extension(name: str, source: Path | list[Path], headers: list[Path] | None = None,
                    fallback_cflags: tuple[str, ...] = ()) -> ModuleType:
    """Compile (once per :func:`build_digest`) and import ``source`` (one file or several) as extension ``name``.

    Args:
        name: the extension's name (its module name, and the namespace of the operators it registers).
        source: its C++ file(s).
        headers: files the sources include, part of the digest.
        fallback_cflags: flags for a second build when the first fails (e.g. ``-DLOSA_NO_AMX``, which leaves out
            code an older assembler cannot build), in a directory of its own; empty: no second build. A first
            build that failed is not tried again (:data:`BUILD_FAILED`) until its digest changes.

    Returns:
        The imported extension module.

    Raises:
        KernelUnavailable: no compiler, ninja or headers, or the build failed (the message names the cause).
    """
    if os.environ.get("LOSA_DISABLE_KERNEL"):
        raise KernelUnavailable("LOSA_DISABLE_KERNEL is set")
    # resolved, as the digest hashes them: ninja must see one path per file (symlinked checkouts too)
    sources = [Path(p).resolve() for p in (source if isinstance(source, list) else [source])]
    primary: Path | None = None
    try:
        primary = build_directory(name, build_digest(sources, headers))
        if not (fallback_cflags and (primary / BUILD_FAILED).exists()):
            return _build(name, sources, primary, ())
        first = (primary / BUILD_FAILED).read_text()
    except Exception as exc:  # compiler missing, headers missing, ninja missing ...
        first = _cause(exc)
        if not fallback_cflags:
            raise KernelUnavailable(first) from exc
        log.warning("building the %s C++ kernel failed (%s); building it again with %s", name, first,
                    " ".join(fallback_cflags))
    try:
        extra = tuple(fallback_cflags)
        module = _build(name, sources, build_directory(name, build_digest(sources, headers, extra)), extra)
    except Exception as exc:
        raise KernelUnavailable(f"{first}; again with {' '.join(fallback_cflags)}: {_cause(exc)}") from exc
    if primary is not None and not (primary / BUILD_FAILED).exists():
        (primary / BUILD_FAILED).write_text(first)
    return module


def _cause(exc: Exception) -> str:
    """One line naming a failed build's cause: the exception type and the last line of its message."""
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"


def _build(name: str, sources: list[Path], directory: Path, extra: tuple[str, ...]) -> ModuleType:
    """Compile ``sources`` with :data:`CFLAGS` and ``extra`` in ``directory`` (under its lock) and import them."""
    from torch.utils.cpp_extension import load

    if not (directory / f"{name}.so").exists():
        log.info("compiling the %s C++ kernel (once per machine, about a minute) ...", name)
    with build_lock(directory):
        return load(
            name=name,
            sources=[str(p) for p in sources],
            extra_cflags=[*CFLAGS, *extra],
            extra_ldflags=list(LDFLAGS),
            build_directory=str(directory),
            verbose=bool(os.environ.get("LOSA_VERBOSE_BUILD")),
        )
