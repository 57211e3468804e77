"""Pure logic of benchmarks/quality_summary.py: joining results rows and checking issue 17's targets."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality_summary as qs  # noqa: E402

FT = "python bench_losa.py --ft-examples 1024 --distill"


def _ppl(variant: str, target: str, ppl: float, ft: int = 0, command: str = FT, windows: int = 40) -> dict:
    return {"variant": variant, "target": target, "ppl": ppl, "sparsity": float(target), "finetune_tokens": ft,
            "wall_s": 1.0, "eval_windows": windows, "eval_seqlen": 512, "command": command, "date": "2026-12-01"}


def _write(folder: Path, name: str, rows: list[dict]) -> None:
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _status(results: Path) -> dict[str, tuple[str, str]]:
    return {name: (status, ev) for name, status, ev in qs.targets(qs.collect(results))}


def test_gap_and_orderings_from_rows(tmp_path: Path) -> None:
    _write(tmp_path, "quality70.jsonl", [_ppl("dense", "0", 30.0), _ppl("wanda", "0.7", 1000.0),
                                         _ppl("wanda+atp", "0.7", 400.0)])
    _write(tmp_path, "quality70_ft1024.jsonl", [
        _ppl("losa-wanda", "0.7", 150.0, 100), _ppl("losa-no-sra", "0.7", 140.0, 100),
        _ppl("losa-no-lsr", "0.7", 160.0, 100),
        _ppl("wanda+lora", "0.7", 10.0, 100, command="python bench_losa.py --ft-examples 256 --distill"),
        _ppl("wanda+masked-lora", "0.7", 10.0, 100, windows=8)])
    st = _status(tmp_path)
    # hand computation: (ln 1000 - ln 150) / (ln 1000 - ln 30)
    want = (math.log(1000) - math.log(150)) / (math.log(1000) - math.log(30))
    status, ev = st["LoSA(Wanda) closes >= 0.6 of the Wanda-to-dense log-perplexity gap at 70%"]
    assert status == ("met" if want >= 0.6 else "NOT met") and ev.startswith(f"{want:.2f}")
    assert st["70 %: LoSA(Wanda) perplexity below Wanda + ATP"][0] == "met"
    assert st["70 %: switching off LSR costs perplexity"][0] == "met"
    assert st["70 %: switching off SRA costs perplexity"][0] == "NOT met"
    assert st["70 %: switching off DSA costs perplexity"][0] == "not measured yet"
    # rows of another budget or other windows are not comparable: those baselines count as missing
    assert st["70 %: LoSA(Wanda) perplexity below Wanda + dense LoRA"][0] == "not measured yet"
    assert st["70 %: LoSA(Wanda) perplexity below Wanda + masked LoRA"][0] == "not measured yet"
    assert st["LoSA(Wanda) closes >= 0.67 of the Wanda-to-dense log-perplexity gap at 50%"][0] == "not measured yet"


def test_zero_shot_and_full_set_rows_join_by_saved_path(tmp_path: Path) -> None:
    _write(tmp_path, "quality70_ft1024.jsonl", [_ppl("losa-wanda", "0.7", 150.0, 100),
                                                _ppl("wanda+masked-lora", "0.7", 170.0, 100)])
    _write(tmp_path, "zeroshot_models.jsonl", [
        {"label": "a", "path": "/m/losa-wanda@0.7", "limit": 500, "mean": {"acc": 0.40, "acc_norm": 0.41}},
        {"label": "b", "path": "/m/wanda+masked-lora@0.7", "limit": 500, "mean": {"acc": 0.42, "acc_norm": 0.40}},
        {"label": "c", "path": "/m/wanda+atp@0.7", "limit": 50, "mean": {"acc": 0.1, "acc_norm": 0.1}}])
    _write(tmp_path, "full_ppl.jsonl", [{"spec": "saved:/m/losa-wanda@0.7", "ppl_full": 170.5}])
    table = qs.collect(tmp_path)
    assert table[("losa-wanda", "0.7")]["full"]["ppl_full"] == 170.5
    assert ("wanda+atp", "0.7") not in table  # a 50-item zero-shot row is not the protocol's 500
    st = _status(tmp_path)
    assert st["70 %: LoSA(Wanda) mean zero-shot acc above Wanda + masked LoRA"] == ("NOT met", "40.0 % vs 42.0 %")
    assert st["70 %: LoSA(Wanda) mean zero-shot acc_norm above Wanda + masked LoRA"][0] == "met"
    page = qs.render(table)
    assert "| 70% | LoSA(Wanda) | 150.00 | 170.50 |" in page


def test_saved_key_parses_variant_and_target() -> None:
    assert qs.saved_key("/work/models17/losa-wanda@0.7") == ("losa-wanda", "0.7")
    assert qs.saved_key("smollm2-135m") == ("dense", "0")
    assert qs.saved_key("/somewhere/my-model") is None


def test_rows_from_different_cpus_are_flagged(tmp_path: Path) -> None:
    rows = [_ppl("losa-wanda", "0.7", 150.0, 100) | {"cpu": "Xeon"}, _ppl("losa-no-dsa", "0.7", 160.0, 100) | {"cpu": "EPYC"},
            _ppl("losa-no-lsr", "0.7", 170.0, 100) | {"cpu": "Xeon"}]
    _write(tmp_path, "quality70_ft1024.jsonl", rows)
    st = _status(tmp_path)
    assert st["70 %: switching off DSA costs perplexity"][1].endswith("(rows from different CPUs: EPYC / Xeon)")
    assert st["70 %: switching off LSR costs perplexity"][1] == "170.00 without vs 150.00 with"


def test_nested_provenance_of_full_set_rows_is_shown(tmp_path: Path) -> None:
    _write(tmp_path, "full_ppl.jsonl", [{"spec": "saved:/m/losa-wanda@0.7", "ppl_full": 170.5, "machine": "x86_64",
                                         "provenance": {"date": "2026-12-01T10:00", "commit": "abc1234",
                                                        "cpu": "AMD EPYC", "isa": "avx2+f16c", "threads": 2,
                                                        "command": "python bench_full_ppl.py saved:/m/losa-wanda@0.7"}}])
    page = qs.render(qs.collect(tmp_path))
    assert ("- LoSA(Wanda) @ 0.7, full: 2026-12-01T10:00, abc1234, AMD EPYC (avx2+f16c), 2 threads; "
            "`python bench_full_ppl.py saved:/m/losa-wanda@0.7`") in page


def test_a_rerun_on_another_cpu_keeps_both_rows_and_targets_pair_same_cpu_rows(tmp_path: Path) -> None:
    _write(tmp_path, "quality70.jsonl", [_ppl("dense", "0", 30.0) | {"cpu": "Xeon"},
                                         _ppl("wanda", "0.7", 1000.0) | {"cpu": "Xeon"}])
    _write(tmp_path, "quality70_ft1024.jsonl", [
        _ppl("losa-wanda", "0.7", 150.0, 100) | {"cpu": "Xeon", "date": "2026-12-01T06:00"},
        _ppl("losa-no-sra", "0.7", 145.0, 100) | {"cpu": "EPYC", "date": "2026-12-01T13:00"},
        _ppl("wanda+lora", "0.7", 155.0, 100) | {"cpu": "Xeon", "date": "2026-12-01T06:30"}])
    _write(tmp_path, "quality70_ft1024_rerun.jsonl", [
        _ppl("losa-wanda", "0.7", 140.0, 100) | {"cpu": "EPYC", "date": "2026-12-01T17:00"}])
    table = qs.collect(tmp_path)
    assert [r["ppl"] for r in table[("losa-wanda", "0.7")]["ppl_rows"]] == [150.0, 140.0]
    st = _status(tmp_path)
    # the ablation (EPYC) is compared with LoSA's EPYC rerun: 145 > 140, switching SRA off costs perplexity
    assert st["70 %: switching off SRA costs perplexity"] == ("met", "145.00 without vs 140.00 with")
    # the Xeon baselines with LoSA's Xeon row: 150 < 155, no CPU flag
    assert st["70 %: LoSA(Wanda) perplexity below Wanda + dense LoRA"] == ("met", "150.00 vs 155.00")
    # the gap uses the LoSA row from Wanda's CPU: hand computation (ln 1000 - ln 150) / (ln 1000 - ln 30)
    want = (math.log(1000) - math.log(150)) / (math.log(1000) - math.log(30))
    assert st["LoSA(Wanda) closes >= 0.6 of the Wanda-to-dense log-perplexity gap at 70%"][1].startswith(
        f"{want:.2f} (LoSA 150.00,")
    page = qs.render(table)
    assert page.count("| 70% | LoSA(Wanda) |") == 2 and "| 140.00 |" in page and "| 150.00 |" in page
    # where there is no row from the same CPU, the latest is used and the evidence says the CPUs differ
    _write(tmp_path, "quality70_ft1024_rerun.jsonl", [])
    _write(tmp_path, "quality70_ft1024.jsonl", [
        _ppl("losa-wanda", "0.7", 150.0, 100) | {"cpu": "Xeon"}, _ppl("losa-no-sra", "0.7", 145.0, 100) | {"cpu": "EPYC"}])
    assert _status(tmp_path)["70 %: switching off SRA costs perplexity"] == (
        "NOT met", "145.00 without vs 150.00 with (rows from different CPUs: EPYC / Xeon)")
