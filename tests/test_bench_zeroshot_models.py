"""benchmarks/bench_zeroshot_models.py: task-by-task evaluation that resumes after a kill."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import make_tiny_model

from losa.eval import zeroshot as zs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_zeroshot_models as bz  # noqa: E402

TASKS = ["rte", "winogrande"]


@pytest.fixture(scope="module")
def tiny_dir(smollm2, tmp_path_factory):
    """A tiny random llama with SmolLM2's tokenizer, saved as a model directory."""
    _, tok = smollm2
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_model("llama", seed=0, layers=2, hidden=64, vocab=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _args(data_dir: Path) -> SimpleNamespace:
    # batch size 1: no padding, so scoring tasks together or apart gives the same log-likelihoods
    return SimpleNamespace(threads=0, tasks=",".join(TASKS), limit=3, dtype="float32", batch_size=1, quiet=True,
                           data_dir=str(data_dir))


def test_killed_run_resumes_at_the_next_task_with_the_all_at_once_scores(tiny_dir, data_dir, tmp_path, monkeypatch):
    import losa

    model, tok = losa.load_model(str(tiny_dir))
    # the independent expectation: lm-eval scoring every task in one call
    expected = zs.run_zeroshot(model, tok, TASKS, limit=3, data_dir=data_dir, batch_size=1, seed=0, offline=True,
                               quiet=True)
    out = tmp_path / "zs.jsonl"
    real = zs.run_zeroshot
    calls: list[list[str]] = []

    def killed_after_one(*a, **k):
        calls.append(list(k["tasks"]))
        if len(calls) > 1:
            raise KeyboardInterrupt  # the run is killed while evaluating the second task
        return real(*a, **k)

    monkeypatch.setattr(zs, "run_zeroshot", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        bz.evaluate("tiny", str(tiny_dir), _args(data_dir), out)
    part = bz.partial_path(out, "tiny")
    assert list(json.loads(part.read_text())["tasks"]) == [TASKS[0]]

    calls.clear()
    monkeypatch.setattr(zs, "run_zeroshot", lambda *a, **k: (calls.append(list(k["tasks"])), real(*a, **k))[1])
    row = bz.evaluate("tiny", str(tiny_dir), _args(data_dir), out)
    assert calls == [[TASKS[1]]]  # only the task the killed run had not finished
    assert list(row["tasks"]) == TASKS
    for t in TASKS:
        assert row["tasks"][t]["acc"] == pytest.approx(expected["tasks"][t]["acc"])
        assert row["tasks"][t]["n"] == expected["tasks"][t]["n"] == 3
    assert row["mean"] == pytest.approx(expected["mean"])


@pytest.mark.parametrize("field", ["weights", "limit", "lm_eval", "cpu"])
def test_partial_file_of_another_checkpoint_or_setting_is_not_reused(field, tiny_dir, data_dir, tmp_path,
                                                                     monkeypatch):
    import torch

    args = _args(data_dir)
    out = tmp_path / "zs.jsonl"
    key = bz.partial_key(str(tiny_dir), args, bz.provenance(torch.get_num_threads()))
    key[field] = "something else"  # e.g. the checkpoint retrained into the same folder
    stale = {"acc": 1.0, "acc_stderr": 0.0, "acc_norm": None, "acc_norm_stderr": None, "n": 3}
    part = bz.partial_path(out, "tiny")
    part.parent.mkdir(parents=True)
    part.write_text(json.dumps({"key": key, "tasks": {TASKS[0]: stale}, "wall_s": 1.0, "sessions": []}))
    calls: list[list[str]] = []
    real = zs.run_zeroshot
    monkeypatch.setattr(zs, "run_zeroshot", lambda *a, **k: (calls.append(list(k["tasks"])), real(*a, **k))[1])
    row = bz.evaluate("tiny", str(tiny_dir), args, out)
    assert calls == [[TASKS[0]], [TASKS[1]]]  # every task runs again
    assert len(row["sessions"]) == 1


def test_partial_files_of_labels_that_clean_to_the_same_name_differ(tmp_path):
    assert bz.partial_path(tmp_path / "zs.jsonl", "wanda+lora@0.7") != bz.partial_path(tmp_path / "zs.jsonl",
                                                                                         "wanda lora@0.7")


def test_task_mean_matches_the_mixed_convention():
    per_task = {"a": {"acc": 0.5, "acc_norm": 0.7}, "b": {"acc": 0.25, "acc_norm": None}}
    assert zs.task_mean(per_task) == {"acc": pytest.approx(0.375), "acc_norm": pytest.approx(0.475)}
    assert zs.task_mean({"a": {"acc": None, "acc_norm": None}}) == {"acc": None, "acc_norm": None}
