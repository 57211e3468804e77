"""Compile-on-first-use kernels survive an interrupted build (no stale-lock hang)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from losa.utils.cpp import BUILD_LOCK, build_digest, build_directory, build_lock


def _try_flock(path: Path) -> bool:
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def test_stale_torch_lock_is_removed(tmp_path):
    (tmp_path / "lock").write_text("")
    with build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
        assert not _try_flock(tmp_path / BUILD_LOCK)  # held while inside
    assert _try_flock(tmp_path / BUILD_LOCK)


def test_lock_of_a_killed_builder_is_released(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from pathlib import Path
            from losa.utils.cpp import build_lock
            with build_lock(Path({str(tmp_path)!r})):
                Path({str(tmp_path / "lock")!r}).write_text("")  # what torch's baton looks like mid-build
                print("held", flush=True)
                time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not _try_flock(tmp_path / BUILD_LOCK)  # a live builder keeps others waiting
        os.kill(holder.pid, signal.SIGKILL)  # killed mid-build: torch's lock file stays behind
        holder.wait(timeout=30)
    finally:
        holder.kill()
    assert (tmp_path / "lock").exists()
    t0 = time.monotonic()
    with build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
    assert time.monotonic() - t0 < 5


@pytest.mark.skipif(os.environ.get("LOSA_DISABLE_KERNEL") is not None, reason="kernels disabled")
def test_kernel_loads_despite_a_stale_lock():
    """The real SparseGPT kernel, with torch's lock file planted as a killed build leaves it."""
    from losa.pruning.sparsegpt import _SRC

    (build_directory("losa_obs_kernel", build_digest([_SRC])) / "lock").write_text("")
    code = "from losa.pruning.sparsegpt import obs_kernel; assert obs_kernel() is not None; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
    assert "left by an interrupted build" in res.stderr


def test_each_distinct_build_has_its_own_directory(tmp_path, monkeypatch):
    """Two checkouts must not share, and so rebuild, one build directory: not with other contents (sources or
    headers), nor with the same contents at another path (ninja rebuilds when a source's path changes)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("CXX", raising=False)
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "k.cpp").write_text("int f() { return 1; }\n")
        (d / "k.h").write_text("#pragma once\n")
    same = build_digest([a / "k.cpp"], [a / "k.h"])
    assert build_digest([a / "k.cpp"], [a / "k.h"]) == same  # the same build: the same directory
    assert build_digest([b / "k.cpp"], [b / "k.h"]) != same  # the same files in another checkout
    other = build_digest([b / "k.cpp"], [b / "k.h"])
    (b / "k.cpp").write_text("int f() { return 2; }\n")
    assert build_digest([b / "k.cpp"], [b / "k.h"]) != other
    (b / "k.cpp").write_text("int f() { return 1; }\n")
    (b / "k.h").write_text("#pragma once\n#define X 1\n")
    assert build_digest([b / "k.cpp"], [b / "k.h"]) != other
    monkeypatch.setenv("CXX", "clang++")  # another compiler
    assert build_digest([a / "k.cpp"], [a / "k.h"]) != same
    monkeypatch.delenv("CXX")
    assert build_digest([a / "k.cpp"]) != same  # the header is part of the build
    d1, d2 = build_directory("losa_x", same), build_directory("losa_x", build_digest([b / "k.cpp"], [b / "k.h"]))
    assert d1 != d2 and d1.parent == d2.parent == tmp_path / "ext" / "losa_x" and d1.is_dir() and d2.is_dir()


@pytest.mark.skipif(os.environ.get("LOSA_DISABLE_KERNEL") is not None, reason="kernels disabled")
def test_the_sparse_kernel_is_built_in_its_digest_directory():
    from losa.inference import kernel

    assert kernel.load_kernel() is not None
    digest = build_digest(kernel._SRC, kernel._HEADERS)
    assert (build_directory(kernel.KERNEL_NAME, digest) / f"{kernel.KERNEL_NAME}.so").exists()


def test_failed_build_is_retried_with_the_fallback_flags(tmp_path, monkeypatch):
    """A build that fails (e.g. an assembler without the AMX instructions) runs once more with the fallback flags,
    in a directory of its own, and later calls go straight to the fallback; when both fail the error names both
    causes in order, and without fallback flags there is no second build."""
    import torch.utils.cpp_extension as ext

    from losa.utils import cpp

    monkeypatch.delenv("LOSA_DISABLE_KERNEL", raising=False)
    (tmp_path / "k.cpp").write_text("int f() { return 1; }\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    calls = []

    def fake_load(name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
        calls.append((list(extra_cflags), build_directory))
        if "-DNO_X" not in extra_cflags:
            raise RuntimeError("Error building extension 'k': unknown instruction")
        return "module"

    monkeypatch.setattr(ext, "load", fake_load)
    assert cpp.build_extension("k", tmp_path / "k.cpp", fallback_cflags=("-DNO_X",)) == "module"
    assert [c for c, _ in calls] == [list(cpp.CFLAGS), [*cpp.CFLAGS, "-DNO_X"]]
    assert calls[0][1] != calls[1][1]  # the fallback build has its own digest directory
    assert (Path(calls[0][1]) / cpp.BUILD_FAILED).read_text().find("unknown instruction") >= 0
    calls.clear()
    assert cpp.build_extension("k", tmp_path / "k.cpp", fallback_cflags=("-DNO_X",)) == "module"
    assert [c for c, _ in calls] == [[*cpp.CFLAGS, "-DNO_X"]]  # the failed build is not tried again
    calls.clear()
    with pytest.raises(cpp.KernelUnavailable, match="unknown instruction"):
        cpp.build_extension("k", tmp_path / "k.cpp")
    assert len(calls) == 1
    calls.clear()
    (tmp_path / "k.cpp").write_text("int f() { return 2; }\n")  # a new digest: no failure recorded for it
    errors = iter(["first: no g++", "second: still no g++"])

    def failing(**kw):
        calls.append(kw)
        raise OSError(next(errors))

    monkeypatch.setattr(ext, "load", failing)
    with pytest.raises(cpp.KernelUnavailable, match="first: no g.*again with -DNO_X.*second: still no g"):
        cpp.build_extension("k", tmp_path / "k.cpp", fallback_cflags=("-DNO_X",))
    assert len(calls) == 2
