"""Results rows of the benchmarks: JSON lines appended to ``results/<name>.jsonl``, read back to render markdown.

Appending whole lines keeps every earlier row (a rerun adds rows, never replaces them); the markdown rendered
from all rows is written atomically by the caller (``losa.utils.io.atomic_write_text``).
"""

from __future__ import annotations

import json
from pathlib import Path


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to the JSON-lines file ``path`` (created with its folder when missing), one line each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Every row of the JSON-lines file ``path``, in file order (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
