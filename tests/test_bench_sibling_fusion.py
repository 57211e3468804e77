"""benchmarks/bench_sibling_fusion.py: the fused packs hold the stacked weights; a quick run checks and times."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from losa.inference import kernel_available
from losa.inference.formats import pack, unpack

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


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.skipif(not kernel_available(), reason="needs the compiled sparse kernel")
def test_quick_run_prints_rows_without_writing(capsys, monkeypatch, tmp_path, keep_threads):
    out = tmp_path / "sibling_fusion.jsonl"
    monkeypatch.setattr(bsf, "OUT", out)
    bsf.main(["--quick", "--shapes", "tiny", "--threads", "1", "--note", "a b"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and rows[0]["calls_separate"] == 7 * 2 and rows[0]["calls_fused"] == 4 * 2
    assert rows[0]["cpu"] and rows[0]["isa"] and rows[0]["commit"] and rows[0]["kernel_isa"]
    assert rows[0]["command"].endswith("--note 'a b'")  # quoted: runs again as recorded
    assert not out.exists()  # --quick writes nothing


@pytest.mark.skipif(not kernel_available(), reason="needs the compiled sparse kernel")
def test_a_fused_pack_that_differs_stops_the_run(monkeypatch, keep_threads):
    real = bsf.build

    def swapped(shape, sparsity, seed=0):  # k and v stacked in the wrong order in every fused qkv
        layers = real(shape, sparsity, seed)
        for layer in layers:
            q, k, v = (unpack(p) for p in layer["separate"][0])
            layer["fused"][0] = [pack(torch.cat([q, v, k]), torch.bfloat16, "bitmask")]
        return layers

    monkeypatch.setattr(bsf, "build", swapped)
    with pytest.raises(SystemExit, match="do not reproduce the separate ones bit for bit"):
        bsf.main(["--quick", "--shapes", "tiny", "--threads", "1"])


@pytest.mark.parametrize("argv,message", [(["--reps", "0"], "at least 1"), (["--threads", "0"], "pick 1.."),
                                          (["--sparsities", "1.0"], "fraction in")])
def test_bad_arguments_are_one_line_errors(argv, message):
    with pytest.raises(SystemExit, match=message):
        bsf.main(["--shapes", "tiny", *argv])


def test_render_writes_every_row(tmp_path):
    row = {"date": "2026-12-02T03:51:00+00:00", "commit": "abc1234", "cpu": "AMD EPYC", "isa": "avx2+f16c",
           "threads": 2, "shape": "tiny", "layers": 2, "sparsity": 0.7, "calls_separate": 14, "calls_fused": 8,
           "separate_ms": 1.5, "fused_ms": 1.25, "saved_ms": 0.25, "ratio": 1.2, "command": "python x.py"}
    new = {**row, "threads": 1, "kernel_isa": "avx2", "loadavg": [0.5, 1.0, 1.25], "note": "queue paused"}
    jsonl, md = tmp_path / "r.jsonl", tmp_path / "r.md"
    jsonl.write_text(json.dumps(row) + "\n" + json.dumps(new) + "\n")
    bsf.render(jsonl, md)
    text = md.read_text()
    assert ("| 2026-12-02T03:51 | abc1234 | AMD EPYC (avx2+f16c) |  | 2 |  | tiny | 2 | 0.7 | 14 -> 8 | 1.500 | 1.250 "
            "| 0.250 | 1.200 | `python x.py` |  |") in text  # a row from before the kernel / load fields
    assert "| avx2 | 1 | 0.5/1/1.25 | tiny |" in text and text.endswith("| queue paused |\n")
    assert text.count("| tiny |") == 2
