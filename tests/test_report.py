"""Run reports and comparison tables from the recorded run directories in tests/fixtures/runs."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from losa.errors import LosaError
from losa.report import compare, load_run, write_report
from losa.report.schema import RunReport, save_report

RUNS = Path(__file__).parent / "fixtures" / "runs"
LOSA, WANDA, DENSE = RUNS / "losa_smollm2_50", RUNS / "wanda_smollm2_50", RUNS / "dense_smollm2"
TASKS = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa"]
# the tables print 2 (ppl, %), 4 (loss) or 1 (seconds) decimals: a cell equals the fixture's value
# when they differ by at most half a unit of the last printed digit
HALF2, HALF4, HALF1 = 0.5e-2 + 1e-9, 0.5e-4 + 1e-9, 0.5e-1 + 1e-9
HEADERS = ["BoolQ", "RTE", "HellaSwag", "WinoGrande", "ARC-e", "ARC-c", "OBQA", "PIQA"]


def md_tables(md: str) -> list[list[dict[str, str]]]:
    """Every markdown table as a list of {header: cell} rows."""
    tables, cur = [], None
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cur is None:
                cur = {"header": cells, "rows": []}
            elif not set("".join(cells)) <= set("-:"):
                cur["rows"].append(dict(zip(cur["header"], cells)))
        elif cur is not None:
            tables.append(cur["rows"])
            cur = None
    if cur is not None:
        tables.append(cur["rows"])
    return tables


@pytest.fixture(scope="module")
def losa_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("losa_report")
    md_path, html_path = write_report(LOSA, out)
    return out, md_path, html_path


def test_images_exist_are_png_and_not_blank(losa_report):
    out, md_path, _ = losa_report
    md = md_path.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(Path(p).stem for p in links) == sorted(
        ["layer_sparsity", "lora_ranks", "cka", "recon_error", "train_loss", "ppl_per_step"])
    for rel in links:
        path = out / rel
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = np.asarray(Image.open(path).convert("L"), dtype=float)
        assert img.shape[0] > 300 and img.shape[1] > 500
        assert img.std() > 10  # a blank or single-colour image has (near) zero spread
        assert (img < 128).mean() > 0.005  # some dark ink: axes, text, data


def test_results_table_numbers_equal_the_fixture(losa_report):
    _, md_path, _ = losa_report
    fx = json.loads((LOSA / "report.json").read_text())
    tables = md_tables(md_path.read_text())
    row = tables[0][0]
    res = fx["results"]
    assert float(row["WikiText-2 ppl"]) == pytest.approx(res["ppl"]["wikitext2"], abs=HALF2)
    assert float(row["PTB ppl"]) == pytest.approx(res["ppl"]["ptb"], abs=HALF2)
    for task, head in zip(TASKS, HEADERS):
        assert float(row[head]) == pytest.approx(100 * res["zeroshot"][task]["acc"], abs=HALF2)
    accs = [res["zeroshot"][t]["acc"] for t in TASKS]
    assert float(row["Mean"]) == pytest.approx(100 * sum(accs) / 8, abs=HALF2)
    assert float(row["Sparsity (%)"]) == pytest.approx(100 * res["sparsity"], abs=HALF2)
    steps = tables[1]
    assert [int(s["step"]) for s in steps] == [1, 2, 3]
    for s, f in zip(steps, fx["steps"]):
        assert float(s["target S_t (%)"]) == pytest.approx(100 * f["target_sparsity"], abs=HALF2)
        ach = f["layer_achieved_sparsity"]
        assert float(s["achieved, layer mean (%)"]) == pytest.approx(100 * sum(ach) / len(ach), abs=HALF2)
        assert float(s["WikiText-2 ppl"]) == pytest.approx(f["ppl"]["wikitext2"], abs=HALF2)
        assert float(s["mean rank"]) == pytest.approx(sum(f["ranks"]) / len(f["ranks"]), abs=HALF2)
        assert float(s["final train loss"]) == pytest.approx(f["train_loss"][-1], abs=HALF4)
        assert float(s["wall time (s)"]) == pytest.approx(f["wall_time_s"], abs=HALF1)


def test_html_is_self_contained_with_the_same_images(losa_report):
    out, md_path, html_path = losa_report
    page = html_path.read_text()
    assert "<img" in page and 'src="report_files' not in page and "http" not in page
    blobs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    files = sorted((out / "report_files").glob("*.png"))
    assert len(blobs) == len(files) == 6
    assert sorted(base64.b64decode(b) for b in blobs) == sorted(f.read_bytes() for f in files)
    assert "31.47" in page and "66.32" in page


def test_one_shot_prune_dir_with_only_losa_json(tmp_path):
    md_path, _ = write_report(WANDA, tmp_path)
    md = md_path.read_text()
    assert sorted(p.name for p in (tmp_path / "report_files").iterdir()) == ["layer_sparsity.png"]
    manifest = json.loads((WANDA / "losa.json").read_text())
    zs = json.loads((WANDA / "zeroshot.json").read_text())
    row = md_tables(md)[0][0]
    assert float(row["WikiText-2 ppl"]) == pytest.approx(manifest["results"]["ppl"]["wikitext2"], abs=HALF2)
    assert float(row["PIQA"]) == pytest.approx(100 * zs["tasks"]["piqa"]["acc"], abs=HALF2)
    assert float(row["Sparsity (%)"]) == pytest.approx(100 * manifest["sparsity"]["overall"], abs=HALF2)
    r = load_run(WANDA)
    assert r.meta.method == "wanda" and r.meta.sparsity == 0.5 and r.meta.finetune == "none"
    assert r.results.layer_achieved_sparsity == [x["sparsity"] for x in manifest["sparsity"]["layers"]]


def test_plots_without_data_are_skipped(tmp_path):
    md_path, html_path = write_report(DENSE, tmp_path)
    assert not (tmp_path / "report_files").exists()
    assert "![" not in md_path.read_text() and "<img" not in html_path.read_text()


def test_compare_two_runs_paper_layout():
    md, text = compare([WANDA, DENSE])
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["Method"] for r in rows] == ["Dense", "Wanda"]  # dense first, whatever the argument order
    assert [r["Sparsity"] for r in rows] == ["0%", "50%"]
    assert list(rows[0]) == ["Sparsity", "Method", "WikiText-2 ppl", *HEADERS, "Mean"]
    dense = json.loads((DENSE / "report.json").read_text())["results"]
    wanda_zs = json.loads((WANDA / "zeroshot.json").read_text())["tasks"]
    assert float(rows[0]["WikiText-2 ppl"]) == pytest.approx(dense["ppl"]["wikitext2"], abs=HALF2)
    assert float(rows[1]["WikiText-2 ppl"]) == pytest.approx(44.83, abs=HALF2)
    for task, head in zip(TASKS, HEADERS):
        assert float(rows[0][head]) == pytest.approx(100 * dense["zeroshot"][task]["acc"], abs=HALF2)
        assert float(rows[1][head]) == pytest.approx(100 * wanda_zs[task]["acc"], abs=HALF2)
    wanda_mean = sum(wanda_zs[t]["acc"] for t in TASKS) / 8
    assert float(rows[1]["Mean"]) == pytest.approx(100 * wanda_mean, abs=HALF2)
    assert md_tables(md)[0] == rows  # markdown and CSV carry the same cells


def test_compare_a_run_given_twice_is_one_row_and_acc_norm_without_zero_shot_warns(tmp_path):
    with pytest.warns(UserWarning, match="1 run directory given more than once; each run is one row"):
        _, twice = compare([WANDA, DENSE, Path(str(WANDA) + "/")])
    assert twice == compare([WANDA, DENSE])[1]
    no_zs = tmp_path / "wanda"  # the same prune before losa eval zeroshot added its accuracies
    shutil.copytree(WANDA, no_zs)
    (no_zs / "zeroshot.json").unlink()
    assert not load_run(no_zs).results.zeroshot
    with pytest.warns(UserWarning, match="metric acc_norm chooses the zero-shot accuracy, and no run has"):
        compare([no_zs], metric="acc_norm")


def test_compare_orders_method_lora_losa_and_acc_norm():
    md, text = compare([LOSA, DENSE, WANDA], metric="acc_norm")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["Method"] for r in rows] == ["Dense", "Wanda", "Wanda + LoSA"]
    losa = json.loads((LOSA / "report.json").read_text())["results"]["zeroshot"]
    assert float(rows[2]["HellaSwag"]) == pytest.approx(100 * losa["hellaswag"]["acc_norm"], abs=HALF2)
    assert float(rows[2]["BoolQ"]) == pytest.approx(100 * losa["boolq"]["acc"], abs=HALF2)  # no acc_norm


def test_report_roundtrip_and_bad_inputs(tmp_path):
    r = load_run(LOSA)
    save_report(r, tmp_path)
    assert RunReport.model_validate_json((tmp_path / "report.json").read_text()) == r
    with pytest.raises(LosaError, match="neither report.json nor losa.json"):
        load_run(tmp_path / "..")
    with pytest.raises(LosaError, match="does not exist"):
        load_run(tmp_path / "missing")
    bad = tmp_path / "bad"
    shutil.copytree(LOSA, bad)
    data = json.loads((bad / "report.json").read_text())
    data["steps"][0]["ranks"] = [1, 2]
    (bad / "report.json").write_text(json.dumps(data))
    with pytest.raises(LosaError, match=r"steps\.0.*ranks has 2 layers, expected 8"):
        load_run(bad)
    (bad / "report.json").write_text("{not json")
    with pytest.raises(LosaError, match="not valid JSON"):
        load_run(bad)
    with pytest.raises(LosaError, match="at least one run"):
        compare([])


def test_cli_report_and_compare(tmp_path, capsys):
    from losa.cli import main

    run = tmp_path / "run"
    shutil.copytree(LOSA, run)
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").is_file() and (run / "report.html").is_file()
    out_md, out_csv = tmp_path / "t.md", tmp_path / "t.csv"
    assert main(["compare", str(WANDA), str(DENSE), "--out-md", str(out_md), "--out-csv", str(out_csv)]) == 0
    assert out_md.read_text() == compare([WANDA, DENSE])[0]
    assert out_csv.read_text() == compare([WANDA, DENSE])[1]
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _prune_run(tmp_path, name, **results):
    """A copy of the Wanda fixture with its losa.json's results (and source model / recipe) changed."""
    d = tmp_path / name
    shutil.copytree(WANDA, d)
    (d / "zeroshot.json").unlink()
    manifest = json.loads((d / "losa.json").read_text())
    manifest["source_model"] = results.pop("model", manifest["source_model"])
    manifest["recipe"].update(results.pop("recipe", {}))
    manifest["nm"] = results.pop("nm", manifest["nm"])
    manifest["results"].update(results)
    (d / "losa.json").write_text(json.dumps(manifest))
    return d


def test_compare_says_when_perplexity_windows_differ_and_tells_rows_apart(tmp_path):
    """The trial mixed runs evaluated at other windows in one table without a word: now a warning and a column
    say so; two rows that would read the same get a Run column; a recorded --compare-dense perplexity is the
    Dense row; runs of different models get a Model column; a mixed N:M run is labelled mixed."""
    a = _prune_run(tmp_path, "a", ppl={"wikitext2": 40.0}, dense_ppl={"wikitext2": 30.0}, eval_seqlen=512,
                   max_windows=None)
    b = _prune_run(tmp_path, "b", ppl={"wikitext2": 38.0}, eval_seqlen=256, max_windows=40)
    with pytest.warns(UserWarning, match=r"measured with different windows \(256 tokens, first 40 windows; 512 "
                                         r"tokens, all windows\): they are not comparable"):
        md, text = compare([a, b])
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["Run", "Sparsity", "Method", "WikiText-2 ppl", "ppl windows"]  # no zero-shot: no Mean
    assert [(r["Run"], r["Method"], r["WikiText-2 ppl"], r["ppl windows"]) for r in rows] == [
        ("a (--compare-dense)", "Dense", "30.00", "512 tokens, all windows"),
        ("a", "Wanda", "40.00", "512 tokens, all windows"), ("b", "Wanda", "38.00", "256 tokens, first 40 windows")]
    assert md_tables(md)[0] == rows
    c = _prune_run(tmp_path, "c", ppl={"wikitext2": 41.0}, eval_seqlen=512, max_windows=None, model="other-model",
                   recipe={"nm": "2:8", "nm_n": [1, 3, 2, 2, 2, 2, 2, 2]}, nm=[2, 8])
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("error")  # same windows: no warning
        _, text = compare([a, c])
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0])[:3] == ["Model", "Sparsity", "Method"] and "ppl windows" not in rows[0]
    assert [(r["Model"], r["Sparsity"], r["Method"]) for r in rows] == [
        ("smollm2-135m", "0%", "Dense"), ("smollm2-135m", "50%", "Wanda"), ("other-model", "mixed 2:8", "Wanda")]


def test_cli_compare_prints_the_windows_warning_as_one_line(tmp_path):
    """The command line shows a warning as one 'warning: ...' line (not Python's file:line: UserWarning format)."""
    import subprocess
    import sys

    a = _prune_run(tmp_path, "a", ppl={"wikitext2": 40.0}, eval_seqlen=512, max_windows=None)
    b = _prune_run(tmp_path, "b", ppl={"wikitext2": 38.0}, eval_seqlen=512, max_windows=40)
    res = subprocess.run([sys.executable, "-m", "losa", "compare", str(a), str(b)], capture_output=True,
                         text=True, check=True)
    assert res.stderr == ("warning: the perplexities were measured with different windows (512 tokens, all windows; "
                          "512 tokens, first 40 windows): they are not comparable; rerun losa prune / losa run with the "
                          "same --eval-seqlen and --max-windows\n")
    assert "| ppl windows |" in res.stdout.splitlines()[0]


def test_report_of_a_prune_dir_says_what_it_has(tmp_path):
    """A prune directory's report is titled as one, shows the --compare-dense row and how the perplexity was
    measured, and does not mention zero-shot accuracy when there is none (trial findings)."""
    d = _prune_run(tmp_path, "p", ppl={"wikitext2": 40.0}, dense_ppl={"wikitext2": 30.0}, eval_seqlen=256,
                   max_windows=40)
    md = write_report(d)[0].read_text()
    assert md.startswith("# losa prune report: smollm2-135m\n")
    results = md_tables(md)[0]
    assert [(r["Model"], r["WikiText-2 ppl"], r["Sparsity (%)"]) for r in results] == [
        ("dense", "30.00", "0.00"), ("pruned", "40.00", "49.95")]
    assert "Perplexity (lower is better, 256 tokens, first 40 windows); Sparsity is the verified overall sparsity." in md
    assert "zero-shot" not in md
    assert write_report(LOSA, tmp_path / "l")[0].read_text().startswith("# losa run report: ")


def test_cli_report_to_an_unwritable_dir_is_one_line(capsys):
    from losa.cli import main

    assert main(["report", str(DENSE), "--out-dir", "/proc/losa-report"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out-dir /proc/losa-report: cannot create files in /proc") and err.count("\n") == 1


def test_an_unfinished_run_says_so_in_compare_and_report(tmp_path):
    """A run stopped after step 1 of 8 has no verified final model: its row and its report say it is unfinished
    (the trial's compare showed it like a finished run)."""
    d = tmp_path / "stopped"
    shutil.copytree(LOSA, d)
    data = json.loads((d / "report.json").read_text())
    steps = data["meta"]["config"]["steps"]
    data["steps"] = data["steps"][:1]
    data["results"] = {}
    (d / "report.json").write_text(json.dumps(data))
    rows = list(csv.DictReader(io.StringIO(compare([d])[1])))
    assert rows[0]["Method"] == f"Wanda + LoSA (unfinished: 1/{steps} steps)"
    # the merged model of a run from before losa.json recorded its sparsity: finished, not "0/T steps"
    merged = tmp_path / "merged"
    merged.mkdir()
    recipe = {"method": "wanda", "sparsity": 0.5, "nm": None, "steps": 5, "omega_first": 8, "finetune": {}}
    (merged / "losa.json").write_text(json.dumps({"source_model": "m", "recipe": recipe, "results": {"ppl": {}}}))
    assert [r["Method"] for r in csv.DictReader(io.StringIO(compare([merged])[1]))] == ["Wanda + LoSA (no fine-tuning)"]
    md = write_report(d, tmp_path / "r")[0].read_text()
    assert f"Unfinished: 1/{steps} steps are saved; run the same `losa run` command with --resume" in md
    assert "unfinished" not in compare([LOSA])[1]


def test_compare_says_when_zero_shot_items_differ(tmp_path):
    """A run scored on --limit 100 items per task beside one scored on all items: a warning and a column (the trial's
    subsets sat beside full-set numbers without a word); the report's caption says how many items."""
    a = _prune_run(tmp_path, "a", ppl={"wikitext2": 40.0}, eval_seqlen=512)
    b = _prune_run(tmp_path, "b", ppl={"wikitext2": 41.0}, eval_seqlen=512, model="other")
    tasks = json.loads((WANDA / "zeroshot.json").read_text())
    (a / "zeroshot.json").write_text(json.dumps(tasks))  # the fixture's config: limit 100
    tasks["config"]["limit"] = None
    (b / "zeroshot.json").write_text(json.dumps(tasks))
    with pytest.warns(UserWarning, match=r"zero-shot accuracies were measured on different items \(100 items per "
                                         r"task; all items\): they are not comparable"):
        _, text = compare([a, b])
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["Model"], r["zero-shot items"]) for r in rows] == [("other", "all items"),
                                                                  ("smollm2-135m", "100 items per task")]
    assert "(lm-eval acc, 100 items per task)" in write_report(a, tmp_path / "r")[0].read_text()
