"""Pure logic of benchmarks/bench_llamacpp.py (no llama.cpp needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_llamacpp as bl  # noqa: E402


def test_floor_bytes_tied_head_reads_embedding_once_as_head() -> None:
    tensors = {"total": 1000, "token_embd": 300, "output": 0}
    assert bl.gguf_bytes_per_token(tensors) == 1000


def test_floor_bytes_separate_head_skips_embedding() -> None:
    tensors = {"total": 1300, "token_embd": 300, "output": 300}
    assert bl.gguf_bytes_per_token(tensors) == 1000


def test_agreement_counts_leading_equal_tokens() -> None:
    assert bl.agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert bl.agreement([], [1]) == 0
    assert bl.agreement([5, 6], [5, 6, 7]) == 2


def test_missing_llama_python_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        bl.llama_python_version(str(tmp_path / "no-python"))
    msg = str(exc.value)
    assert "pip install llama-cpp-python==" in msg and "\n" not in msg
