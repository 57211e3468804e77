"""Results rows of the benchmarks: JSON lines appended to ``results/<name>.jsonl``, read back to render markdown.

Appending whole lines keeps every earlier row (a rerun adds rows, never replaces them). The markdown rendered
from all rows is each benchmark's own, written with ``losa.utils.io.atomic_write_text``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path


def append_jsonl(path: Path, rows: list[dict], *, fsync: bool = False) -> None:
    """Append ``rows`` to the JSON-lines file ``path`` (created with its folder when missing), one line each.

    With ``fsync`` the lines are flushed and fsynced before this returns, so they are on disk before the caller
    deletes anything they replace (e.g. a partial-results file).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """Every row of the JSON-lines file ``path``, in file order (blank lines skipped).

    Raises:
        ValueError: a line that is not JSON (e.g. cut short by a killed run), naming the file and line.
    """
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON row ({e.msg}); remove or repair that line") from None
    return rows


def save_rows(path: Path, rows: list[dict], render: Callable[[Path, Path], None]) -> None:
    """Append ``rows`` to ``path`` and re-render its markdown (``render(path, path.with_suffix(".md"))``)."""
    append_jsonl(path, rows)
    render(path, path.with_suffix(".md"))
    print(f"wrote {path} and {path.with_suffix('.md')}")


def run_sections(rows: list[dict], with_base: bool = False) -> Iterator[tuple[str, str, list[dict]]]:
    """The rows of each run (keyed by ``run`` start time and provenance), in measured order, for markdown sections.

    Args:
        rows: rows with ``run``, ``commit``, ``cpu``, ``isa``, ``command`` (and ``cpu_generation``, ``base``).
        with_base: the rows compare against a ``base`` commit (it goes into the key and the title).

    Yields:
        ``(title, where, rows)``: the ``## run, commit C[ vs base B]`` heading, the command and machine as
        `` `command` on CPU (generation) (isa)``, and the run's rows.
    """
    runs: dict[tuple, list[dict]] = {}
    for r in rows:
        cmd, forced = r["command"], r.get("LOSA_SPARSE_ISA")
        if forced and not cmd.startswith("LOSA_SPARSE_ISA="):  # rows from before the command named the forced ISA
            cmd = f"LOSA_SPARSE_ISA={forced} {cmd}"
        key = (r["run"], r["commit"], r.get("base") if with_base else None, r["cpu"], r.get("cpu_generation", ""),
               r["isa"], cmd)
        runs.setdefault(key, []).append(r)
    for (run, commit, base, cpu, gen, isa, cmd), rs in runs.items():
        title = f"## {run}, commit {commit}" + (f" vs base {base}" if with_base else "")
        yield title, f"`{cmd}` on {cpu}{f' ({gen})' if gen else ''} ({isa})", rs


def load_sentence(row: dict) -> str:
    """`` Load average (1/5/15 min) at start …, at end ….`` from a row stamped by the benchmark's ``append_rows``
    (``loadavg_start``, ``loadavg_end``), or ``""`` for rows without the stamps."""
    if "loadavg_start" not in row:
        return ""
    return f" Load average (1/5/15 min) at start {row['loadavg_start']}, at end {row['loadavg_end']}."
