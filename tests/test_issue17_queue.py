"""benchmarks/issue17_queue.py: which steps of issue 17's comparison are done, read from results rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import issue17_queue as iq  # noqa: E402


def _args(tmp_path: Path):
    return type("A", (), {"models_dir": str(tmp_path / "m"), "threads": 2, "data_dir": str(tmp_path)})()


def _row(variant: str, target: str, **extra) -> str:
    return json.dumps({"variant": variant, "target": target, **extra}) + "\n"


@pytest.fixture()
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    monkeypatch.setattr(iq, "RESULTS", folder)
    return folder


def test_nothing_measured_means_every_step_to_do_in_value_order(tmp_path: Path, results: Path) -> None:
    st = iq.steps(_args(tmp_path))
    assert not any(s.done for s in st)
    names = [s.name for s in st]
    assert names[0] == "70 %: training-free rows" and names[1] == "70 %: losa-wanda, 1024 examples"
    # every run saves its model, so a fresh queue needs no "again, saved" step before a zero-shot one
    assert all("--save-dir" in s.argv for s in st if s.name.startswith("50 %") or "1024 examples" in s.name)
    assert not any("again" in n for n in names)
    # the 1024-example protocol is in every fine-tuned command, and only there
    for s in st:
        ft = "--ft-examples" in s.argv
        assert ft == ("1024 examples" in s.name), s.name
        if ft:
            assert s.argv[s.argv.index("--ft-examples") + 1] == "1024" and "--distill" in s.argv


def test_rows_and_saved_models_mark_steps_done(tmp_path: Path, results: Path) -> None:
    m = (tmp_path / "m").resolve()
    (m / "losa-wanda@0.7").mkdir(parents=True)
    (m / "losa-wanda@0.7" / "config.json").write_text("{}")
    (results / "quality70_ft1024.jsonl").write_text(_row("losa-wanda", "0.7") + _row("losa-no-sra", "0.7")
                                                    + _row("wanda+lora", "0.7"))
    (results / "quality70.jsonl").write_text(_row("wanda", "0.7"))
    (results / "quality70_ft1024_rerun.jsonl").write_text(_row("losa-wanda", "0.7", saved_to=str(m / "losa-wanda@0.7")))
    (results / "zeroshot_models.jsonl").write_text(
        json.dumps({"label": "dense", "path": "smollm2-135m", "limit": 500}) + "\n"
        + json.dumps({"label": "wanda@0.7", "path": str(m / "wanda@0.7"), "limit": 50}) + "\n")
    st = {s.name: s for s in iq.steps(_args(tmp_path))}
    assert st["70 %: losa-wanda, 1024 examples"].done and st["70 %: losa-no-sra, 1024 examples"].done
    assert not st["70 %: losa-no-lsr, 1024 examples"].done
    assert "70 %: losa-wanda again, saved for zero-shot" not in st  # its saved model is on disk, with a row
    assert st["zero-shot: dense"].done
    # a 50-item row is not the protocol's 500, and the benchmark would skip its label: the user must remove it
    assert not st["zero-shot: wanda @ 0.7"].done and "remove it" in st["zero-shot: wanda @ 0.7"].blocked
    # measured but not saved: trained again with the same protocol into the rerun files, then evaluated
    again = st["70 %: wanda again, saved for zero-shot"].argv
    assert again[again.index("--out") + 1].endswith("quality70_rerun.jsonl") and "--ft-examples" not in again
    again = st["70 %: wanda+lora again, saved for zero-shot"].argv
    assert again[again.index("--out") + 1].endswith("quality70_ft1024_rerun.jsonl") and "--ft-examples" in again
    assert "70 %: wanda+atp again, saved for zero-shot" not in st  # no row yet: the first run will save it
    assert st["zero-shot: losa-wanda @ 0.7"].argv[-1] == f"losa-wanda@0.7={m / 'losa-wanda@0.7'}"
    # a row that names the folder but without the model files on disk does not count as saved
    (m / "losa-wanda@0.7" / "config.json").unlink()
    assert "70 %: losa-wanda again, saved for zero-shot" in {s.name for s in iq.steps(_args(tmp_path))}


def test_list_prints_status_and_a_wrong_data_dir_is_one_line(tmp_path: Path, results: Path, capsys) -> None:
    (tmp_path / "README.md").write_text("data")
    iq.main(["--models-dir", str(tmp_path / "m"), "--data-dir", str(tmp_path), "--list"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[to do] 70 %: training-free rows" and len(out) == len(iq.steps(_args(tmp_path)))
    with pytest.raises(SystemExit, match="not the shared data folder"):
        iq.main(["--models-dir", str(tmp_path / "m"), "--data-dir", str(tmp_path / "nope"), "--list"])


def test_only_runs_the_matching_missing_steps(tmp_path: Path, results: Path, monkeypatch) -> None:
    (tmp_path / "README.md").write_text("data")
    ran: list[list[str]] = []

    def fake_run(argv, check=False):
        ran.append(argv)
        if "bench_zeroshot_models.py" in argv[1]:  # the zero-shot benchmark writes its row
            with (results / "zeroshot_models.jsonl").open("a") as f:
                label, _, path = argv[-1].partition("=")
                f.write(json.dumps({"label": label, "path": path, "limit": 500}) + "\n")
        return type("P", (), {"returncode": 0})()

    monkeypatch.setattr(iq.subprocess, "run", fake_run)
    iq.main(["--models-dir", str(tmp_path / "m"), "--data-dir", str(tmp_path), "--only", "zero-shot: dense"])
    assert [Path(a[1]).name for a in ran] == ["bench_zeroshot_models.py", "quality_summary.py"]
    assert ran[0][-1] == "dense=smollm2-135m"
    iq.main(["--models-dir", str(tmp_path / "m"), "--data-dir", str(tmp_path), "--only", "zero-shot: dense"])
    assert len(ran) == 2  # done now: nothing runs again


def _flags(command: str) -> dict[str, str | None]:
    """The protocol flags of a bench_losa.py command line (the --note text is left out: it holds spaces)."""
    keys = ("--threads", "--nsamples", "--seqlen", "--recon-nsamples", "--ft-examples", "--ft-max-length",
            "--batch-size", "--eval-windows", "--eval-seqlen")
    words = command.split(" --note ")[0].split()
    out: dict[str, str | None] = {k: words[words.index(k) + 1] for k in keys if k in words}
    out["--distill"] = "yes" if "--distill" in words else None
    return out


def test_commands_repeat_the_protocol_of_the_committed_rows(tmp_path: Path) -> None:
    """Rows written by the queue must be comparable with the rows already measured by hand-typed commands."""
    real = Path(iq.__file__).resolve().parent / "results"
    st = {s.name: s for s in iq.steps(_args(tmp_path))}
    for name, variant in (("quality70_ft1024.jsonl", "losa-wanda"), ("quality70.jsonl", "wanda+atp")):
        row = next(json.loads(x) for x in (real / name).read_text().splitlines()
                   if json.loads(x)["variant"] == variant)
        step = st["70 %: losa-wanda, 1024 examples" if variant == "losa-wanda" else "70 %: training-free rows"]
        assert _flags(" ".join(step.argv)) == _flags(row["command"]), variant


def test_a_step_that_writes_no_row_stops_the_queue_with_one_line(tmp_path: Path, results: Path, monkeypatch) -> None:
    (tmp_path / "README.md").write_text("data")
    monkeypatch.setattr(iq.subprocess, "run", lambda argv, check=False: type("P", (), {"returncode": 0})())
    with pytest.raises(SystemExit, match="finished without writing its rows"):
        iq.main(["--models-dir", str(tmp_path / "m"), "--data-dir", str(tmp_path), "--only", "zero-shot: dense"])


def test_only_also_runs_the_step_that_saves_the_model_it_reads(tmp_path: Path, results: Path, monkeypatch) -> None:
    (tmp_path / "README.md").write_text("data")
    m = (tmp_path / "m").resolve()
    (results / "quality70_ft1024.jsonl").write_text(_row("losa-wanda", "0.7"))  # measured, never saved
    ran: list[str] = []

    def fake_run(argv, check=False):
        ran.append(Path(argv[1]).name)
        if ran[-1] == "bench_losa.py":  # writes the rerun row after saving the model, as bench_losa does
            (m / "losa-wanda@0.7").mkdir(parents=True)
            (m / "losa-wanda@0.7" / "config.json").write_text("{}")
            out = argv[argv.index("--out") + 1]
            Path(out).write_text(_row("losa-wanda", "0.7", saved_to=str(m / "losa-wanda@0.7")))
        if ran[-1] == "bench_zeroshot_models.py":
            label, _, path = argv[-1].partition("=")
            (results / "zeroshot_models.jsonl").write_text(json.dumps({"label": label, "path": path, "limit": 500}))
        return type("P", (), {"returncode": 0})()

    monkeypatch.setattr(iq.subprocess, "run", fake_run)
    iq.main(["--models-dir", str(m), "--data-dir", str(tmp_path), "--only", "zero-shot: losa-wanda @ 0.7"])
    assert ran == ["bench_losa.py", "quality_summary.py", "bench_zeroshot_models.py", "quality_summary.py"]
    assert (results / "quality70_ft1024_rerun.jsonl").is_file()
