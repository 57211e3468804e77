"""benchmarks/bench_sibling_fusion.py: the fused packs hold the stacked weights; a quick run checks and times."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from losa.inference import kernel_available
from losa.inference.formats import unpack

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_sibling_fusion as bsf  # noqa: E402


def test_fused_packs_are_the_separate_weights_stacked():
    layers = bsf.build("tiny", 0.7)
    assert len(layers) == bsf.SHAPES["tiny"][0]
    for layer in layers:
        sep = [[unpack(p) for p in g] for g in layer["separate"]]
        fus = [[unpack(p) for p in g] for g in layer["fused"]]
        assert [len(g) for g in sep] == [3, 1, 2, 1] and [len(g) for g in fus] == [1, 1, 1, 1]
        for s, f in zip(sep, fus):
            assert torch.equal(torch.cat(s), f[0])
        assert abs((torch.cat(sep[0]) == 0).float().mean().item() - 0.7) < 0.05


@pytest.mark.skipif(not kernel_available(), reason="needs the compiled sparse kernel")
def test_quick_run_checks_bit_equality_and_prints_rows_without_writing(capsys, monkeypatch, tmp_path):
    out = tmp_path / "sibling_fusion.jsonl"
    monkeypatch.setattr(bsf, "OUT", out)
    bsf.main(["--quick", "--shapes", "tiny", "--threads", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and rows[0]["calls_separate"] == 7 * 2 and rows[0]["calls_fused"] == 4 * 2
    assert rows[0]["cpu"] and rows[0]["isa"] and rows[0]["commit"]
    assert not out.exists()  # --quick writes nothing


def test_render_writes_every_row(tmp_path):
    row = {"date": "2026-12-02T03:51:00+00:00", "commit": "abc1234", "cpu": "AMD EPYC", "isa": "avx2+f16c",
           "threads": 2, "shape": "tiny", "layers": 2, "sparsity": 0.7, "calls_separate": 14, "calls_fused": 8,
           "separate_ms": 1.5, "fused_ms": 1.25, "saved_ms": 0.25, "ratio": 1.2, "command": "python x.py"}
    jsonl, md = tmp_path / "r.jsonl", tmp_path / "r.md"
    jsonl.write_text(json.dumps(row) + "\n" + json.dumps({**row, "threads": 1}) + "\n")
    bsf.render(jsonl, md)
    text = md.read_text()
    assert "| 2026-12-02T03:51 | abc1234 | AMD EPYC (avx2+f16c) | 2 | tiny | 2 | 0.7 | 14 -> 8 | 1.500 | 1.250 | 0.250 " \
           "| 1.200 |" in text
    assert text.count("| tiny |") == 2
