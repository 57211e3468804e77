"""Zero-shot evaluation through lm-eval on the offline tasks (tiny random model, then SmolLM2-135M)."""

from __future__ import annotations

import logging
import random

import pytest
from conftest import make_tiny_model

from losa.errors import LosaError
from losa.eval import zeroshot as zs

ALL = list(zs.DEFAULT_TASKS)
NO_ACC_NORM = {"boolq", "rte", "winogrande"}  # lm-eval defines only acc for these


@pytest.fixture(scope="module")
def tiny_run(smollm2, data_dir):
    """All eight tasks, 3 seeded documents each, on a tiny random llama with SmolLM2's tokenizer."""
    _, tok = smollm2
    model = make_tiny_model("llama", seed=0, layers=2, hidden=64, vocab=len(tok))
    return zs.run_zeroshot(model, tok, ALL, limit=3, data_dir=data_dir, batch_size=16, seed=0, offline=True,
                           quiet=True)


def test_every_task_scores_in_unit_interval(tiny_run):
    assert list(tiny_run["tasks"]) == ALL
    for task, s in tiny_run["tasks"].items():
        assert s["n"] == 3
        assert 0.0 <= s["acc"] <= 1.0
        # 3 documents: accuracy is a multiple of 1/3
        assert round(3 * s["acc"], 6) == round(3 * s["acc"])
        if task in NO_ACC_NORM:
            assert s["acc_norm"] is None
        else:
            assert 0.0 <= s["acc_norm"] <= 1.0
    accs = [s["acc"] for s in tiny_run["tasks"].values()]
    assert tiny_run["mean"]["acc"] == pytest.approx(sum(accs) / len(accs))
    mixed = [s["acc_norm"] if s["acc_norm"] is not None else s["acc"] for s in tiny_run["tasks"].values()]
    assert tiny_run["mean"]["acc_norm"] == pytest.approx(sum(mixed) / len(mixed))


def test_limit_is_a_seeded_random_subset(tiny_run):
    cfg = tiny_run["config"]
    assert cfg["source"] == "local files" and cfg["limit"] == 3
    sizes = {"boolq": 3270, "rte": 277, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
             "arc_challenge": 1172, "openbookqa": 500, "piqa": 1838}
    for task, n in sizes.items():
        assert cfg["subset_indices"][task] == sorted(random.Random(f"0:{task}").sample(range(n), 3))


def test_seeded_subset_rules():
    assert zs.seeded_subset(10, None, 0, "piqa") is None
    assert zs.seeded_subset(10, 10, 0, "piqa") is None  # limit >= size: every document
    a = zs.seeded_subset(1000, 50, 1, "piqa")
    assert a == zs.seeded_subset(1000, 50, 1, "piqa") and len(set(a)) == 50 and a == sorted(a)
    assert a != zs.seeded_subset(1000, 50, 2, "piqa") and a != zs.seeded_subset(1000, 50, 1, "rte")
    with pytest.raises(LosaError, match="--limit"):
        zs.seeded_subset(1000, 0, 0, "piqa")


def test_progress_disabled_turns_every_tqdm_off_and_restores():
    from tqdm import tqdm
    from tqdm.auto import tqdm as auto_tqdm

    with zs.progress_disabled(True):
        assert tqdm(range(3)).disable and auto_tqdm(range(3)).disable
        assert tqdm(range(3), "d", 3, True, None, None, 0.1, 10.0, 0, None, False).disable  # positional disable
    assert not tqdm(range(3), disable=False).disable
    with zs.progress_disabled(False):
        assert not tqdm(range(3), disable=False).disable
        # lm-eval's INFO lines are hidden with the bars on too (a trial found them noisy); warnings still show
        assert not logging.getLogger("lm_eval").isEnabledFor(logging.INFO)
        assert logging.getLogger("lm_eval").isEnabledFor(logging.WARNING)
    with zs.progress_disabled(True):
        assert not logging.getLogger("lm_eval").isEnabledFor(logging.WARNING)
    assert logging.getLogger("lm_eval").level == logging.NOTSET  # restored


def test_bad_input_is_a_clear_error(smollm2, data_dir, tmp_path):
    model, tok = smollm2
    with pytest.raises(LosaError, match="tokenizer"):
        zs.run_zeroshot(model, None, ["piqa"], data_dir=data_dir)
    with pytest.raises(LosaError, match="no offline version of task.*mmlu"):
        zs.run_zeroshot(model, tok, ["mmlu"], data_dir=data_dir, offline=True)
    with pytest.raises(LosaError, match="no zero-shot tasks"):
        zs.parse_tasks(" , ")
    with pytest.raises(LosaError, match=r"file piqa/valid\.jsonl not found in data directory"):
        zs.run_zeroshot(model, tok, ["piqa"], data_dir=tmp_path, offline=True)


def test_cli_missing_task_file_fails_before_loading_model(tmp_path, capsys):
    from losa.cli import main

    (tmp_path / "rte").mkdir()
    rc = main(["eval", "zeroshot", "does-not-exist-model", "--tasks", "rte", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "rte/val.jsonl not found" in err and str(tmp_path) in err


def test_auto_mode_picks_local_files_when_a_data_dir_is_known(monkeypatch):
    for k in ("LOSA_DATA_DIR", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    assert not zs.use_local_tasks("auto", None)
    assert zs.use_local_tasks("auto", "/data")
    assert zs.use_local_tasks(True, None) and not zs.use_local_tasks(False, "/data")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert zs.use_local_tasks("auto", None)


@pytest.mark.slow
def test_smollm2_beats_chance_on_piqa_and_arc_easy(smollm2, data_dir):
    """50 seeded items each. Measured (float32, seed 0): PIQA acc 0.64 (chance 0.5), ARC-e acc 0.54 (chance 0.25)."""
    model, tok = smollm2
    r = zs.run_zeroshot(model, tok, ["piqa", "arc_easy"], limit=50, data_dir=data_dir, batch_size=32, seed=0,
                        offline=True, quiet=True)
    assert r["tasks"]["piqa"]["n"] == 50 and r["tasks"]["arc_easy"]["n"] == 50
    # binomial standard deviation of chance at n=50: 0.071 (PIQA), 0.061 (ARC-e)
    assert r["tasks"]["piqa"]["acc"] >= 0.60  # > chance + 1.4 sd (measured 0.64 = chance + 2 sd)
    assert r["tasks"]["arc_easy"]["acc"] >= 0.45  # > chance + 3 sd (measured 0.54)


def test_cli_quiet_run_writes_results_without_progress_bars(smollm2, data_dir, tmp_path, capfd, monkeypatch):
    """--quiet draws no bar, and outside a git checkout nothing of lm-eval's git probe reaches stderr."""
    import json

    from losa.cli import main

    _, tok = smollm2
    model_dir = tmp_path / "tiny"
    make_tiny_model("llama", seed=1, layers=1, hidden=64, vocab=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "zs.json"
    capfd.readouterr()  # drop the bars of the set-up above
    monkeypatch.chdir(tmp_path)  # not a git checkout
    rc = main(["eval", "zeroshot", str(model_dir), "--tasks", "rte", "--limit", "2", "--data-dir", str(data_dir),
               "--quiet", "--out", str(out)])
    captured = capfd.readouterr()
    assert rc == 0
    assert "%|" not in captured.err and "it/s" not in captured.err  # no tqdm bar was drawn
    assert "git" not in captured.err, captured.err
    result = json.loads(out.read_text())
    assert result["tasks"]["rte"]["n"] == 2 and 0.0 <= result["tasks"]["rte"]["acc"] <= 1.0
    assert "| rte |" in captured.out


def test_unreachable_hub_is_one_line_naming_offline_mode():
    """lm-eval's own tasks download their datasets in ``TaskManager.load``; offline that was a traceback."""

    class OfflineTaskManager:
        def load(self, names):
            try:
                raise OSError("offline mode is enabled")
            except OSError as e:  # datasets raises a ConnectionError with the hub's error as its context
                raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)") from e

    with pytest.raises(LosaError, match=r"task\(s\) rte from the Hugging Face hub \(ConnectionError\); use "
                                        r"offline=True \(--offline\) with data_dir \(--data-dir DIR\)"):
        zs._load_tasks(OfflineTaskManager(), ["rte"])

    class BrokenTaskManager:
        def load(self, names):
            raise KeyError("not a network failure")

    with pytest.raises(KeyError):  # anything else is not hidden
        zs._load_tasks(BrokenTaskManager(), ["rte"])


def test_cli_bad_flags_fail_before_loading_model(tmp_path, capsys):
    from losa.cli import main

    missing = str(tmp_path / "missing")
    for flags, err in [(["--batch-size", "0"], "error: --batch-size must be >= 1, got 0\n"),
                       (["--device", "foo"], "error: device 'foo' is not a device; set device (--device) to auto, "
                                             "cpu, cuda or cuda:N\n"),
                       (["--out", str(tmp_path)], f"error: --out {tmp_path} is a directory; give the path of a file "
                                                  "(e.g. inside it)\n")]:
        assert main(["eval", "zeroshot", missing, "--tasks", "rte", *flags]) == 2
        assert capsys.readouterr().err == err


def test_no_git_probe_keeps_git_quiet_and_restores():
    """Outside a git checkout lm-eval's ``git describe`` printed ``fatal: not a git repository`` even with --quiet."""
    import lm_eval.evaluator as evaluator

    original = evaluator.get_git_commit_hash
    with zs.no_git_probe():
        assert evaluator.get_git_commit_hash() is None
    assert evaluator.get_git_commit_hash is original


def test_table_says_which_tasks_the_acc_norm_mean_takes_acc_for():
    """lm-eval has no acc_norm for boolq: the acc_norm mean takes its acc, and the table says so."""
    from losa.eval.zeroshot import format_table, task_mean

    tasks = {"boolq": {"acc": 0.6, "acc_norm": None, "n": 10}, "piqa": {"acc": 0.7, "acc_norm": 0.8, "n": 10}}
    table = format_table({"tasks": tasks, "mean": task_mean(tasks)})
    assert "| **mean** | 65.00 | 70.00* | |" in table  # (0.6 + 0.8) / 2
    assert table.endswith("\\* the acc_norm mean takes acc for boolq (no acc_norm in lm-eval)")
    tasks["boolq"]["acc_norm"] = 0.5
    assert "*" not in format_table({"tasks": tasks, "mean": task_mean(tasks)}).replace("**mean**", "")


def test_lm_eval_warnings_about_losa_s_integration_are_dropped_others_kept():
    """lm-eval warns on every run that losa's tasks use custom datasets and that the model is an object: nothing
    a user can act on (trial finding); any other lm-eval warning still shows."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Collect()
    logging.getLogger().addHandler(handler)
    try:
        with zs.progress_disabled(False):
            log = logging.getLogger("lm_eval.api.task")
            log.warning("rte: Custom kwargs can be passed to `--metadata` in console (as json string)")
            log.warning("`pretrained` model kwarg is not of type `str`. Many other model arguments may be ignored.")
            log.warning("something the user should see")
        logging.getLogger("lm_eval.api.task").warning("rte: Custom kwargs can be passed to `--metadata` later")
    finally:
        logging.getLogger().removeHandler(handler)
    assert seen == ["something the user should see", "rte: Custom kwargs can be passed to `--metadata` later"]
