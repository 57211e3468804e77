"""Atomic output: a crash never leaves a half-written file or checkpoint that looks complete."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from losa.errors import LosaError, option


def _umask() -> int:
    """The process umask: from /proc/self/status on Linux (no change to it), else by setting it and putting it
    back (for that moment another thread's new files would get 022)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _usual_mode(directory: bool) -> int:
    """The mode ``open()`` / ``mkdir()`` would give a new file / directory here (0666 / 0777 less the umask):
    ``tempfile`` makes its files 0600 and its directories 0700, which the rename would otherwise keep."""
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory and ``os.replace``.

    Missing parent folders are created.

    Args:
        path: the destination file.
        data: the bytes to write.
    Raises:
        LosaError: the destination cannot be written (a directory, a parent that is a file, no
            permission, a full disk), naming the path; nothing is left behind.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):  # a nicety: some filesystems (vfat, some network mounts) refuse it
            os.chmod(tmp, _usual_mode(directory=False))
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise


def _write_error(path: Path, err: OSError) -> LosaError:
    """The one-line error for an output file that cannot be written."""
    try:
        if path.is_dir():
            return LosaError(f"cannot write {path}: it is a directory; give the path of a file (e.g. inside it)")
        bad = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    except OSError:  # an ancestor that cannot even be looked at
        bad = None
    if bad is not None:
        return LosaError(f"cannot write {path}: {bad} is a file, not a directory; choose another path")
    if err.errno == errno.ENOSPC:
        return LosaError(f"cannot write {path}: no space left on the device; free some space or choose another path")
    return LosaError(f"cannot write {path} ({err.strerror or type(err).__name__}); choose a path in a writable "
                     "directory")


def _kind(path: Path, flag: str) -> str | None:
    """``"dir"``, ``"file"`` or None (missing) for ``path``; a path that cannot be looked at is an error."""
    try:
        return ("dir" if path.is_dir() else "file") if path.exists() else None
    except OSError as e:
        raise LosaError(f"{flag} {path}: cannot access it ({e.strerror or type(e).__name__}); choose another "
                        "path") from None


def check_output_file(path: str | os.PathLike, flag: str, exists_ok: bool = True,
                      overwrite_flag: str | None = None, suffix: str | None = None) -> Path:
    """Fail before any work when ``path`` cannot become an output file of :func:`atomic_write_bytes`.

    The path must not be a directory; its nearest existing parent must be a directory where files can be
    created (missing folders below it are created when writing).

    Args:
        path: the output file the command will write.
        flag: the option that gave it, e.g. ``--out`` (named in the error).
        exists_ok: whether an existing file may be replaced (False for a finished artifact, e.g. a model file).
        overwrite_flag: the option that allows replacing it (named in the error), or None when there is none.
        suffix: the file name's required ending (e.g. ``.safetensors``: the name says the format), or None.
    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    Raises:
        LosaError: ``path`` is a directory, exists while ``exists_ok`` is False, a parent is a file, a folder
            cannot be accessed or written, or the name lacks ``suffix``.
    """
    path = Path(path)
    kind = _kind(path, flag)
    if kind == "dir":
        raise LosaError(f"{flag} {path} is a directory; give the path of a file (e.g. inside it)")
    if kind == "file" and not exists_ok:
        how = f"pass {overwrite_flag} to replace it" if overwrite_flag else "delete it first to replace it"
        raise LosaError(f"{flag} {path} already exists; choose another path or {how}")
    if suffix is not None and path.suffix != suffix:
        raise LosaError(f"{flag} {path}: the file is written in the {suffix.lstrip('.')} format; name it "
                        f"{path.with_suffix(suffix) if path.suffix else path.name + suffix}")
    _check_writable(next((p for p in path.parents if _kind(p, flag)), Path(".")), path, flag)
    return path


def check_output_dir(path: str | os.PathLike, flag: str, exists_ok: bool) -> Path:
    """Fail before any work when ``path`` cannot become an output directory.

    An existing directory (with ``exists_ok``) must be writable itself; a new one needs its nearest existing
    parent to be a writable directory.

    Args:
        path: the output directory the command will write.
        flag: the option that gave it, e.g. ``--out`` (named in the error).
        exists_ok: whether an existing directory is acceptable (``--overwrite``, or a command that checks
            the directory's contents itself).
    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    Raises:
        LosaError: ``path`` is a file, exists while ``exists_ok`` is False, a parent is a file, or a folder
            cannot be accessed or written.
    """
    path = Path(path)
    kind = _kind(path, flag)
    if kind == "file":
        raise LosaError(f"{flag} {path} is a file; give the path of a directory")
    if kind == "dir" and not exists_ok:
        raise _exists(path, flag)
    _check_writable(path if kind else next((p for p in path.parents if _kind(p, flag)), Path(".")), path, flag)
    return path


def _exists(path: Path, flag: str) -> LosaError:
    return LosaError(f"output directory {path} already exists; pass {option('overwrite=True', '--overwrite')} or "
                     f"choose another {flag}")


def _check_writable(folder: Path, path: Path, flag: str) -> None:
    """``folder`` (where ``path``'s entries will be created) is a directory where entries can be created."""
    if _kind(folder, flag) != "dir":
        raise LosaError(f"{flag} {path}: {folder} is a file, not a directory; choose another path")
    try:  # what the writer will do there (permissions, read-only or special file systems)
        os.rmdir(tempfile.mkdtemp(prefix=".losa-check.", dir=folder))
    except OSError as e:
        raise LosaError(f"{flag} {path}: cannot create files in {folder} ({e.strerror or type(e).__name__}); "
                        "choose a path in a writable directory") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "model_dump"):
        return o.model_dump()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; on success it is renamed to ``path``.

    If the block raises, the temp directory is removed and ``path`` is untouched. An existing
    ``path`` is replaced only with ``overwrite=True`` (moved aside first, deleted after the rename). Its folders
    and files get the modes a plain ``mkdir()`` / ``open()`` gives (0777 / 0666 less the umask).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise _exists(path, option("out"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        # the usual modes for what it holds: tempfile made the folder 0700, and writers that go through a temp
        # file of their own (safetensors via transformers' save_pretrained) leave 0600 files
        dir_mode, file_mode = _usual_mode(directory=True), _usual_mode(directory=False)
        with contextlib.suppress(OSError):  # a nicety: some filesystems (vfat, some network mounts) refuse it
            for folder, _dirs, files in os.walk(tmp):
                os.chmod(folder, dir_mode)
                for name in files:
                    if not os.path.islink(os.path.join(folder, name)):
                        os.chmod(os.path.join(folder, name), file_mode)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
