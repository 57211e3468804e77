"""Results rows of the benchmarks: JSON lines appended to ``results/<name>.jsonl``, read back to render markdown.

Appending whole lines keeps every earlier row (a rerun adds rows, never replaces them). The markdown rendered
from all rows is each benchmark's own (bench_sibling_fusion, bench_decode and bench_llamacpp write it with
``losa.utils.io.atomic_write_text``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to the JSON-lines file ``path`` (created with its folder when missing), one line each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


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
