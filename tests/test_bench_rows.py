"""benchmarks/_rows.py and the benchmarks that append and read their results rows through it."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _rows  # noqa: E402

#: the benchmarks whose rows go through _rows.append_jsonl / read_jsonl (importing them starts no work)
ROWS_BENCHMARKS = ["bench_avx2_decode", "bench_full_ppl", "bench_losa", "bench_memory", "bench_multiprocess",
                   "bench_offload_prune", "bench_teacher_cache", "bench_work_stealing", "bench_zeroshot_models"]


@pytest.mark.parametrize("fsync", [False, True])
def test_appended_rows_read_back_in_order_and_fsync_only_when_asked(tmp_path, monkeypatch, fsync):
    synced = []
    monkeypatch.setattr(_rows.os, "fsync", synced.append)
    path = tmp_path / "new" / "rows.jsonl"
    _rows.append_jsonl(path, [{"a": 1}, {"b": [2.5, None]}], fsync=fsync)
    _rows.append_jsonl(path, [{"c": "x"}], fsync=fsync)
    assert _rows.read_jsonl(path) == [{"a": 1}, {"b": [2.5, None]}, {"c": "x"}]
    assert path.read_text() == '{"a": 1}\n{"b": [2.5, null]}\n{"c": "x"}\n'
    assert len(synced) == (2 if fsync else 0)


def test_a_broken_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"b": 2\n')
    with pytest.raises(ValueError, match=rf"{path}:3: not a JSON row"):
        _rows.read_jsonl(path)


@pytest.mark.parametrize("name", ROWS_BENCHMARKS)
def test_benchmark_imports_with_the_shared_rows_helpers(name):
    mod = importlib.import_module(name)
    assert mod.append_jsonl is _rows.append_jsonl and mod.read_jsonl is _rows.read_jsonl


def test_zeroshot_models_row_is_fsynced_before_its_partial_file_goes(tmp_path, monkeypatch):
    bz = importlib.import_module("bench_zeroshot_models")
    out = tmp_path / "zs.jsonl"
    part = bz.partial_path(out, "m")
    part.parent.mkdir()
    part.write_text("{}")
    row = {"label": "m", "path": "p", "sparsity": 0.5, "tasks": {"t": {"acc": 0.5, "acc_norm": None, "n": 4}},
           "mean": {"acc": 0.5, "acc_norm": 0.5}, "dtype": "float32", "date": "d", "commit": "c", "threads": 1,
           "cpu": "cpu", "isa": "isa", "model": "model", "command": "cmd", "wall_s": 1.0}
    monkeypatch.setattr(bz, "evaluate", lambda *a: row)
    synced: list[bool] = []  # whether the partial file still existed at each fsync (os.fsync, patched for all)
    monkeypatch.setattr(_rows.os, "fsync", lambda fd: synced.append(part.is_file()))
    monkeypatch.setattr(sys, "argv", ["bench_zeroshot_models.py", "m=p", "--out", str(out)])
    bz.main()
    assert synced == [True, False] and not part.exists()  # the row, then the markdown (atomic_write_text)
    assert [json.loads(x) for x in out.read_text().splitlines()] == [row]
    assert "| m | 0.5000 | float32 | 50.0 | 50.0 | 50.0 |" in out.with_suffix(".md").read_text()


def test_kernel_regression_rows_render_one_section_per_run(tmp_path):
    brk = importlib.import_module("bench_kernel_regression")
    base = {"commit": "c1", "base": "b0", "cpu": "cpu", "isa": "isa", "command": "cmd", "kernel_isa": "avx512",
            "shape": "8x32", "pattern": "70%", "inputs": "bfloat16", "threads": 1}
    rows = [{**base, "run": "r1", "base_ms": 2.0, "current_ms": 1.0, "speed": 2.0},
            {**base, "run": "r1", "base_ms": 1.0, "current_ms": 2.0, "speed": 0.5, "threads": 2},
            {**base, "run": "r2", "base_ms": 1.0, "current_ms": 1.0, "speed": 1.0}]
    _rows.append_jsonl(tmp_path / "k.jsonl", rows)
    brk.render(tmp_path / "k.jsonl", tmp_path / "k.md")
    md = (tmp_path / "k.md").read_text()
    assert md.count("## r") == 2 and "2 cases, speed 0.500-2.000, median 1.250" in md
    assert "| 2 | 8x32 | 70% | bfloat16 | 1.000 | 2.000 | 0.500 |" in md


def test_decode_attention_rows_render_speed_per_case(tmp_path):
    bda = importlib.import_module("bench_decode_attention")
    base = {"run": "r1", "commit": "c1", "cpu": "cpu", "isa": "isa", "command": "cmd", "threads": 2}
    _rows.append_jsonl(tmp_path / "d.jsonl", [{**base, "kind": "op", "case": "cache 128", "sdpa_ms": 3.0,
                                                "kernel_ms": 0.5}])
    bda.render(tmp_path / "d.jsonl", tmp_path / "d.md")
    assert "| op | cache 128 | 2 | 3.000 | 0.500 | 6.00x |" in (tmp_path / "d.md").read_text()


def test_provenance_command_names_the_forced_isa(monkeypatch):
    """A row measured with a forced ISA path says so in its command (and reruns as shown)."""
    import _provenance

    for name in _provenance.FORCING_ENV:
        monkeypatch.delenv(name, raising=False)
    assert _provenance.provenance(1, argv=["b.py", "--x", "a b"])["command"] == "python b.py --x 'a b'"
    monkeypatch.setenv("LOSA_SPARSE_ISA", "avx2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    row = _provenance.provenance(2, argv=["b.py"])
    assert row["command"] == "LOSA_SPARSE_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 python b.py" and row["threads"] == 2
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # torch's libraries restricted too
    assert _provenance.provenance(1, argv=["b.py"])["command"] == \
        "LOSA_SPARSE_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python b.py"


def test_run_sections_name_a_forced_isa_once():
    """Old rows carry the forced ISA only in a field, new rows also in their command: either way it shows once."""
    base = {"run": "r1", "commit": "c1", "base": "b0", "cpu": "cpu", "cpu_generation": "family 26, model 2",
            "isa": "avx512f", "LOSA_SPARSE_ISA": "avx2"}
    rows = [{**base, "command": "python b.py"}, {**base, "run": "r2", "command": "LOSA_SPARSE_ISA=avx2 python b.py"},
            {**base, "run": "r2", "command": "LOSA_SPARSE_ISA=avx2 python b.py"}]
    sections = list(_rows.run_sections(rows, with_base=True))
    assert [(t, w, len(rs)) for t, w, rs in sections] == [
        ("## r1, commit c1 vs base b0", "`LOSA_SPARSE_ISA=avx2 python b.py` on cpu (family 26, model 2) (avx512f)", 1),
        ("## r2, commit c1 vs base b0", "`LOSA_SPARSE_ISA=avx2 python b.py` on cpu (family 26, model 2) (avx512f)", 2)]
    assert next(_rows.run_sections([{**rows[0], "LOSA_SPARSE_ISA": ""}]))[0] == "## r1, commit c1"
