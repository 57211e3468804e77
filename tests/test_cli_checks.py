"""`losa prune` / `losa run`: bad settings fail in one line before any work, ignored options are refused,
and a run that fine-tunes nothing says so (in its log, report.json, losa report and losa compare)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

import losa
from losa.cli import main
from losa.errors import LosaError
from losa.finetune.config import FinetuneConfig
from losa.pipelines.losa import LoSAConfig
from losa.pipelines.losa.loop import run

SMALL_RUN = ["--sparsity", "0.5", "--steps", "1", "--nsamples", "4", "--seqlen", "16", "--recon-nsamples", "2",
             "--calib", "self", "--eval", "none", "--quiet"]


@pytest.fixture
def tiny_dir(tmp_path):
    d = tmp_path / "tiny"
    make_tiny_model("llama", layers=2).save_pretrained(d)  # context of 256 positions
    make_tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if pruning or a LoSA run starts."""
    def boom(*a, **k):
        raise AssertionError("the expensive work started before the check")

    monkeypatch.setattr(losa, "prune", boom)
    monkeypatch.setattr("losa.pipelines.losa.loop.run", boom)


def _one_line_error(capsys, rc: int, msg: str) -> None:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and msg in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------------------------------- prune
def test_a_conflict_with_a_recipe_key_says_the_recipe_sets_it(tmp_path, capsys, no_work):
    """The trial passed --nm over a recipe with sparsity: the error named --sparsity, which it never typed."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: sparsegpt\nsparsity: 0.6\noptions: {blocksize: 64}\n")
    rc = main(["prune", "no-such-model", "--recipe", str(recipe), "--nm", "2:4", "--no-save"])
    _one_line_error(capsys, rc, f"sparsity (--sparsity) has no effect with nm (--nm): the 2:4 pattern sets it; drop "
                                f"one of them (sparsity is set by the recipe {recipe})")
    rc = main(["prune", "no-such-model", "--recipe", str(recipe), "--method", "wanda", "--no-save"])
    _one_line_error(capsys, rc, f"it is an option of sparsegpt; drop it or change the method (options.blocksize is "
                                f"set by the recipe {recipe})")
    rc = main(["prune", "no-such-model", "--recipe", str(recipe), "--nm", "2:4", "--sparsity", "0.7", "--no-save"])
    err = capsys.readouterr().err  # typed on the command line: no recipe note
    assert rc == 2 and "drop one of them" in err and "set by the recipe" not in err


def test_prune_refuses_an_existing_out_before_pruning(tiny_dir, tmp_path, capsys, no_work):
    out = tmp_path / "p1"
    out.mkdir()
    rc = main(["prune", str(tiny_dir), "--method", "magnitude", "--eval", "none", "--out", str(out), "--quiet"])
    _one_line_error(capsys, rc, f"output directory {out} already exists; pass overwrite=True (--overwrite) or "
                                "choose another --out")
    rc = main(["prune", str(tiny_dir), "--eval", "none", "--no-save", "--out", str(out), "--quiet"])
    _one_line_error(capsys, rc, "--out has no effect with --no-save")



@pytest.mark.parametrize("cmd", ["prune", "run"])
@pytest.mark.parametrize("case", ["out is a file", "parent is a file", "bad device"])
def test_bad_out_path_or_device_fails_before_the_model_loads(cmd, case, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(losa, "load_model", boom)
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = {"out is a file": afile, "parent is a file": afile / "sub", "bad device": tmp_path / "new"}[case]
    extra = ["--device", "foo"] if case == "bad device" else []
    rc = main([cmd, "no-such-model", "--eval", "none", "--out", str(out), "--quiet", *extra])
    _one_line_error(capsys, rc, {"out is a file": f"--out {afile} is a file; give the path of a directory",
                                 "parent is a file": f"{afile} is a file, not a directory",
                                 "bad device": "device 'foo' is not a device; set device (--device) to auto, cpu, "
                                               "cuda or cuda:N"}[case])

@pytest.mark.parametrize("argv,msg", [
    (["--eval", "no_such_file.txt"], "--eval no_such_file.txt: no such file, and not wikitext2, c4 or ptb"),
    (["--eval-seqlen", "1000"], "evaluation window of 1000 tokens exceeds the model's context of 256 positions; "
                                "set --eval-seqlen to 256 or lower"),
    (["--eval-seqlen", "0"], "--eval-seqlen 0 must be at least 2"),
    (["--max-windows", "0"], "--max-windows 0 must be at least 1"),
    (["--max-windows", "-1"], "--max-windows -1 must be at least 1"),
])
def test_prune_eval_settings_fail_before_pruning(tiny_dir, tmp_path, capsys, no_work, argv, msg):
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"word{i % 50}" for i in range(400)))
    evals = [] if "--eval" in argv else ["--eval", str(text)]
    rc = main(["prune", str(tiny_dir), "--method", "magnitude", "--no-save", "--quiet", *evals, *argv])
    _one_line_error(capsys, rc, msg)


def test_mixed_nm_whose_mean_n_is_not_the_pattern_s_is_refused(tiny_dir, capsys, no_work):
    """--nm 2:8 --nm-n 3,4 would prune to a mean 3.5:8 (56 % sparse) while the run is labelled 2:8 (75 %)."""
    rc = main(["prune", str(tiny_dir), "--method", "magnitude", "--nm", "2:8", "--nm-n", "3,4", "--quiet"])
    _one_line_error(capsys, rc, "nm_n (--nm-n) averages N=3.5 over its 2 layers, but nm (--nm) 2:8 has N=2: mixed N:M "
                                "keeps the mean N of its pattern (its sparsity, for layers of one size); give N values "
                                "averaging 2")
    rc = main(["prune", str(tiny_dir), "--method", "magnitude", "--nm", "2:8", "--nm-n", "3,5", "--quiet"])
    _one_line_error(capsys, rc, "give N values averaging 2 or nm (--nm) 4:8")
    assert losa.PruneConfig(nm="2:8", nm_n=[1, 3]).nm_n == [1, 3]


def test_prune_named_eval_dataset_missing_from_the_data_dir(tiny_dir, tmp_path, capsys, no_work):
    rc = main(["prune", str(tiny_dir), "--method", "magnitude", "--no-save", "--quiet", "--data-dir", str(tmp_path),
               "--eval", "ptb"])
    _one_line_error(capsys, rc, "--eval ptb: ")


@pytest.mark.parametrize("fields,msg", [
    ({"atp_beta": 0.01}, r"atp_beta only applies to allocator atp; add allocator='atp' \(--allocator atp\) or drop "
                         r"atp_beta \(--atp-beta\)"),
    ({"atp_grid_points": 4}, r"or drop atp_grid_points \(--atp-grid-points\)"),
    ({"allocator": "atp", "atp_beta": 0.01, "atp_grid_points": 4}, "a fixed atp_beta skips"),
    ({"method": "magnitude", "nm": "2:4", "options": {"per_row": True}},
     r"drop options\['per_row'\] \(--per-row\) or nm \(--nm\)"),
])
def test_prune_options_that_would_be_ignored_are_refused(fields, msg):
    with pytest.raises(LosaError, match=msg):
        losa.PruneConfig(**fields)
    losa.PruneConfig(allocator="atp", atp_beta=0.01)  # what they belong to still works
    losa.PruneConfig(method="magnitude", options={"per_row": True})


def test_calib_help_states_the_command_line_default():
    from losa.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for cmd in ("prune", "run"):
        flag = next(a for a in sub[cmd]._actions if "--calib" in a.option_strings)
        assert "(default: c4 with a data dir (--data-dir or $LOSA_DATA_DIR), else self)" in flag.help


# --------------------------------------------------------------------------------------------- run
def test_run_records_each_layer_s_n_for_inspect(tiny_dir, tmp_path, capsys):
    """The merged model of an N:M run records N per decoder layer, which losa inspect checks without --nm."""
    out = tmp_path / "run"
    argv = [a for a in SMALL_RUN if a not in ("--sparsity", "0.5")]
    assert main(["run", str(tiny_dir), *argv, "--nm", "2:4", "--out", str(out)]) == 0
    assert json.loads((out / "model" / "losa.json").read_text())["nm_n"] == [2, 2]
    capsys.readouterr()
    assert main(["inspect", str(out / "model")]) == 0
    log = capsys.readouterr().out
    assert "checking the 2:4 pattern recorded in" in log and "2:4 pattern: satisfied by every module" in log
    # the merged model's directory reads as the LoSA run it came from (the trial's compare called it a prune)
    from losa.report import compare

    rows = list(csv.DictReader(io.StringIO(compare([out / "model"])[1])))
    assert [(r["Sparsity"], r["Method"]) for r in rows] == [("2:4", "Wanda + LoSA (no fine-tuning)")]


def test_run_prints_each_step_as_it_ends_and_says_how_to_resume(tiny_dir, tmp_path, capsys, monkeypatch):
    """A step's line is printed when the step is saved (not at the end: the trial's --quiet run showed nothing for
    11 minutes); Ctrl-C says what was kept and how to continue; --resume says where it continues; a finished run
    resumed again does nothing (it used to redo the merge and the evaluation)."""
    from losa.pipelines.losa.loop import LoSARun

    step = LoSARun.step

    def step_then_stop_at(stop):
        def wrapped(self, t):
            if t == stop:
                raise KeyboardInterrupt
            return step(self, t)
        return wrapped

    out = tmp_path / "run"
    argv = ["run", str(tiny_dir), *SMALL_RUN, "--steps", "2", "--out", str(out)]
    monkeypatch.setattr(LoSARun, "step", step_then_stop_at(1))
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().endswith(
        f"interrupted; no step had finished, so there is nothing to resume; rerun the same command (--out {out})")
    monkeypatch.setattr(LoSARun, "step", step_then_stop_at(2))
    assert main(argv) == 130  # the same command: nothing was saved, so it is not refused
    log = capsys.readouterr()
    assert "  step 1/2: S_t=0.4375 " in log.out and "step 2/2" not in log.out  # 0.5 - 0.5 (1 - 1/2)^3
    assert log.err.strip().endswith(f"interrupted; step 1 is saved in {out}; run the same command with --resume "
                                    "to continue from step 2")
    monkeypatch.setattr(LoSARun, "step", step)
    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(losa, "save_checkpoint", stop)  # interrupted after the merge, while saving the model
    assert main([*argv, "--resume"]) == 130
    log = capsys.readouterr()
    assert f"  resuming after step 1/2 saved in {out / 'state'}" in log.out
    assert "  step 1/2:" not in log.out and "  step 2/2: S_t=0.5000 " in log.out
    assert log.err.strip().endswith(f"interrupted; all 2 steps are saved in {out}; run the same command with --resume "
                                    "to merge, verify, evaluate and save")
    monkeypatch.undo()  # save_checkpoint and the step again as they are
    def no_targets(*a, **k):
        raise AssertionError("dense targets computed for a run with no step left")

    monkeypatch.setattr("losa.pipelines.losa.loop.DenseTargets.compute", no_targets)  # only merging is left to do
    assert main([*argv, "--resume"]) == 0
    log = capsys.readouterr().out
    assert f"  all 2 steps are saved in {out / 'state'}: merging, verifying and saving" in log  # no eval datasets
    assert "  step 2/2:" not in log and "saved merged model" in log
    report = (out / "report.json").read_text()
    assert main([*argv, "--resume"]) == 0
    assert f"  {out} holds the finished run (all 2 steps, report.json, model/): nothing to do" in (
        capsys.readouterr().out)
    assert (out / "report.json").read_text() == report
    data = tmp_path / "other.json"  # a finished run resumed with data it was not made with: said, not silent
    data.write_text(json.dumps([{"instruction": "say hi", "input": "", "output": "hi"}]))
    assert main([*argv, "--resume", "--finetune-data", str(data)]) == 0
    log = capsys.readouterr()
    assert "nothing to do" in log.out and log.err == (
        f"warning: the finished run in {out} was made with no --finetune-data; this command's --finetune-data {data} "
        "was not used (a new --out starts a run with it)\n")
    assert (out / "report.json").read_text() == report


def test_run_without_fine_tuning_says_so_everywhere(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(tiny_dir), *SMALL_RUN, "--out", str(out), "--no-save"]) == 0
    log = capsys.readouterr().out
    assert log.count("warning: no finetune_data (--finetune-data) and no finetune.distill (--distill): the "
                     "adapters will not be fine-tuned") == 1
    assert "not fine-tuned" in log and "nan" not in log
    rep = json.loads((out / "report.json").read_text())
    assert rep["meta"]["notes"] and "will not be fine-tuned" in rep["meta"]["notes"][0]
    assert main(["report", str(out)]) == 0
    assert "Warning: no finetune_data (--finetune-data) and no finetune.distill (--distill)" in (
        out / "report.md").read_text()
    capsys.readouterr()
    assert main(["compare", str(out)]) == 0
    assert "Wanda + LoSA (no fine-tuning)" in capsys.readouterr().out


def test_compare_labels_an_older_report_without_fine_tuning_from_its_recipe():
    from losa.report.schema import FinalResults, RunMeta, RunReport
    from losa.report.tables import row_label

    cfg = LoSAConfig(calib="c4").model_dump(mode="json")
    meta = RunMeta(model="m", method="wanda", finetune="losa", sparsity=0.5, config=cfg)  # no notes field then
    done = FinalResults(sparsity=0.5)  # a finished run (an unfinished one says so too)
    assert row_label(RunReport(meta=meta, results=done)) == "Wanda + LoSA (no fine-tuning)"
    cfg["finetune"]["distill"] = True
    assert row_label(RunReport(meta=meta.model_copy(update={"config": cfg}), results=done)) == "Wanda + LoSA"


@pytest.mark.parametrize("argv,msg", [
    (["--lr", "0.01", "--epochs", "2"], "--lr, --epochs have no effect without finetune_data (--finetune-data) or "
                                        "finetune.distill (--distill)"),
    (["--max-examples", "8"], "--max-examples has no effect without finetune_data (--finetune-data) or "
                              "finetune.distill (--distill)"),
    (["--finetune-data", "x.jsonl", "--temperature", "2"], "--temperature has no effect without finetune.distill "
                                                           "(--distill); add finetune.distill=True (--distill)"),
    (["--nm", "2:8", "--mixed-nm", "--no-layerwise-sparsity", "--distill"],
     "--mixed-nm has no effect with layerwise_sparsity=False (--no-layerwise-sparsity) or allocator='uniform' "
     "(--allocator uniform): the uniform allocator moves no layer's N"),
    (["--nm", "2:8", "--mixed-nm", "--allocator", "uniform", "--distill"], "use allocator='rmi' (--allocator rmi) or "
                                                                           "allocator='owl' (--allocator owl), or drop "
                                                                           "mixed_nm (--mixed-nm)"),
    (["--nm-max-pairs", "2", "--distill"], "--nm-max-pairs has no effect without mixed_nm (--mixed-nm); add "
                                           "mixed_nm=True (--mixed-nm) or drop it"),
    (["--allocator", "owl", "--beta", "2", "--rmi-features", "outputs", "--distill"],
     "--rmi-features, --beta have no effect with allocator='owl' (--allocator owl): only allocator='rmi' "
     "(--allocator rmi) reads it"),
    (["--owl-lambda", "0.1", "--distill"], "--owl-lambda has no effect with allocator='rmi' (--allocator rmi)"),
    (["--allocator", "owl", "--delta", "0.1", "--distill"], "--delta has no effect with allocator='owl' (--allocator "
                                                            "owl), whose band is owl_lambda (--owl-lambda)"),
    (["--no-layerwise-sparsity", "--beta", "2", "--distill"], "--beta has no effect with uniform sparsity"),
    (["--no-layerwise-sparsity", "--allocator", "owl", "--distill"], "--allocator has no effect with "
                                                                     "layerwise_sparsity=False "
                                                                     "(--no-layerwise-sparsity), i.e. uniform "
                                                                     "sparsity; drop one of them"),
    (["--nm", "2:4", "--allocator", "owl", "--distill"], "--allocator has no effect with nm (--nm) without mixed_nm "
                                                         "(--mixed-nm)"),
    (["--nm", "2:4", "--no-layerwise-sparsity", "--distill"],
     "--no-layerwise-sparsity has no effect with nm (--nm) without mixed_nm (--mixed-nm)"),
    (["--nm", "2:8", "--mixed-nm", "--allocator", "owl", "--owl-lambda", "0.1", "--distill"],
     "--owl-lambda has no effect with mixed_nm (--mixed-nm)"),
    (["--nm", "2:8", "--mixed-nm", "--nm-max-pairs", "1", "--delta", "0.05", "--distill"],
     "--delta has no effect with nm_max_pairs (--nm-max-pairs)"),
    (["--nm", "2:8", "--nm-max-dev", "2", "--distill"], "--nm-max-dev has no effect without mixed_nm (--mixed-nm)"),
    (["--distill", "--max-grad-norm", "-1"], "invalid config: max_grad_norm: -1 must be at least 0"),
    (["--distill", "--lr-scheduler", "bogus"], "lr_scheduler 'bogus' is not a transformers learning-rate schedule; "
                                               "choose one of linear, cosine"),
    (["--distill", "--lr-scheduler", "reduce_lr_on_plateau"], "needs an eval strategy"),
    (["--distill", "--eval-every-step", "--eval", "typo"], "--eval typo: no such file"),
    (["--distill", "--eval-seqlen", "0"], "--eval-seqlen 0 must be at least 2"),
    (["--distill", "--eval", "none", "--eval-every-step"], "--eval-every-step has no effect with --eval none; drop "
                                                           "--eval-every-step, or evaluate with --eval wikitext2"),
    (["--distill", "--fsdp-config", "fsdp.json"], "invalid config: fsdp_config (--fsdp-config) has no effect "
                                                  "without fsdp (--fsdp)"),
    (["--distill", "--delta", "0.6"], "delta (--delta) 0.6 lets a layer reach sparsity 1.1 around the 0.5 target"),
    # a wrong fine-tuning data path fails before the model loads (the trial waited for calibration first)
    (["--finetune-data", "missing.jsonl"], "fine-tuning data missing.jsonl not found; give a .json/.jsonl path"),
    (["--finetune-data", "empty"], "no .json/.jsonl files in empty; point finetune_data (--finetune-data) at"),
    (["--finetune-data", "./data/train"], "fine-tuning data ./data/train not found"),  # a path, not 'org/name'
    (["--finetune-data", "/no/such/dir"], "fine-tuning data /no/such/dir not found"),
    (["--finetune-data", "a/b/c"], "fine-tuning data a/b/c not found"),
])
def test_run_bad_or_ignored_settings_fail_before_the_run(tmp_path, capsys, no_work, monkeypatch, argv, msg):
    monkeypatch.chdir(tmp_path)  # the x.jsonl above is a name only: the run never starts
    (tmp_path / "x.jsonl").write_text('{"text": "word4 word5"}\n')
    (tmp_path / "empty").mkdir()
    rc = main(["run", "no-such-model", "--calib", "c4", "--quiet", *argv])
    _one_line_error(capsys, rc, msg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="--fsdp is valid with GPUs")
def test_run_fsdp_without_gpus_fails_at_start(capsys, no_work):
    rc = main(["run", "no-such-model", "--calib", "c4", "--distill", "--fsdp", "full_shard", "--quiet"])
    _one_line_error(capsys, rc, "fsdp (--fsdp) needs GPUs")


def test_valid_schedulers_and_no_clipping_are_accepted():
    assert FinetuneConfig(lr_scheduler="cosine", max_grad_norm=0).lr_scheduler == "cosine"


def test_lr_scheduler_help_lists_exactly_the_accepted_schedules():
    """The help text is static (no transformers import to build the CLI); it must not drift from what the
    validator accepts (transformers' SchedulerType minus the schedules that need more arguments)."""
    import re

    from losa.finetune.config import lr_schedulers

    listed = re.findall(r"[a-z_]+", FinetuneConfig.model_fields["lr_scheduler"].description.split(":", 1)[1])
    assert sorted(n for n in listed if n != "or") == sorted(lr_schedulers())
    for name in lr_schedulers():
        assert FinetuneConfig(lr_scheduler=name).lr_scheduler == name


def test_resume_checks_the_state_before_any_work(tmp_path):
    tok = make_tiny_tokenizer()
    calib = torch.randint(4, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = LoSAConfig(sparsity=0.5, steps=1, nsamples=4, seqlen=16, recon_nsamples=2, r_max=8, r_min=1,
                     omega_first=4, omega_last=6, device="cpu", calib="c4", finetune={"distill": True, "lr": 1e-3})
    with pytest.raises(LosaError, match=r"resume \(--resume\): .*none holds no finished LoSA step"):
        run(make_tiny_model("llama", layers=2), tok, cfg, out_dir=tmp_path / "none", resume=True, calib_ids=calib,
            progress=False)
    assert not (tmp_path / "none").exists()
    # a finished run of another learning rate and teacher cache size: refused naming the fields, nothing written
    done = tmp_path / "done"
    (done / "state").mkdir(parents=True)
    old = cfg.model_dump()
    old["finetune"].update(lr=1e-2, teacher_topk=4)
    (done / "state" / "state.json").write_text(json.dumps({"format": 2, "step": 1, "recipe": old, "rows": []}))
    before = sorted(p.relative_to(done) for p in done.rglob("*"))
    with pytest.raises(LosaError, match=r"differs from this run's in finetune\.lr \(saved 0\.01, now 0\.001\), "
                                        r"finetune\.teacher_topk \(saved 4, now 0\); use the same settings"):
        run(make_tiny_model("llama", layers=2), tok, cfg, out_dir=done, resume=True, calib_ids=calib, progress=False)
    assert sorted(p.relative_to(done) for p in done.rglob("*")) == before


def test_the_python_api_warns_about_a_run_without_fine_tuning(tmp_path):
    calib = torch.randint(4, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = LoSAConfig(sparsity=0.5, steps=1, nsamples=4, seqlen=16, recon_nsamples=2, r_max=8, r_min=1,
                     omega_first=4, omega_last=6, device="cpu", calib="c4", max_examples=8)
    with pytest.warns(UserWarning) as w:
        rep = run(make_tiny_model("llama", layers=2), make_tiny_tokenizer(), cfg, calib_ids=calib, progress=False)
    messages = [str(x.message) for x in w]
    assert any(m.startswith("no finetune_data (--finetune-data) and no finetune.distill (--distill)")
               for m in messages)
    assert any(m.startswith("max_examples has no effect") for m in messages)
    assert rep.meta.notes and not rep.meta.fine_tuned


def test_a_recipe_that_lists_defaults_is_not_refused():
    """A saved recipe (every field, most at their defaults) loads again: only values other than the default
    count as set (pydantic's model_fields_set alone counts every key given)."""
    prune = losa.PruneConfig(sparsity=0.5)
    assert losa.PruneConfig(**prune.model_dump()).allocator == "uniform"  # atp_grid_points listed, at default
    assert losa.PruneConfig(method="magnitude", nm="2:4", options={"per_row": False}).nm == "2:4"
    cfg = LoSAConfig()
    assert LoSAConfig(**cfg.model_dump()).ignored_fields() == []  # nm_max_dev, finetune.* listed at defaults
    with pytest.raises(LosaError, match="per_row applies to unstructured targets only"):
        losa.PruneConfig(method="magnitude", nm="2:4", options={"per_row": True})
    assert [p for p, _ in LoSAConfig(**{**cfg.model_dump(), "nm_max_dev": 2}).ignored_fields()] == [("nm_max_dev",)]


def test_check_output_dir_probes_an_existing_run_dir_itself(tmp_path, monkeypatch):
    """A run writes only inside an existing --out: that folder must be writable, not its parent (a volume
    mounted at /out under a read-only /)."""
    from losa.utils import io

    probed = []
    real = io.tempfile.mkdtemp
    monkeypatch.setattr(io.tempfile, "mkdtemp", lambda **k: probed.append(Path(k["dir"])) or real(**k))
    out = tmp_path / "run"
    out.mkdir()
    io.check_output_dir(out, "--out", exists_ok=True)
    io.check_output_dir(tmp_path / "new" / "run", "--out", exists_ok=False)
    assert probed == [out, tmp_path]
    with pytest.raises(LosaError, match=r"already exists; pass overwrite=True \(--overwrite\) or choose another "
                                        "--out"):
        io.check_output_dir(out, "--out", exists_ok=False)


def test_an_unreadable_ancestor_is_one_line(tmp_path, monkeypatch):
    from losa.utils import io

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io.Path, "exists", denied)
    with pytest.raises(LosaError, match=r"--out .*: cannot access it \(Permission denied\)"):
        io.check_output_file(tmp_path / "x.json", "--out")


def test_run_refuses_an_existing_run_or_a_bad_resume_before_loading_the_model(tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(losa, "load_model", boom)
    done = tmp_path / "done"
    (done / "state").mkdir(parents=True)
    rc = main(["run", "no-such-model", "--eval", "none", "--out", str(done), "--quiet"])
    _one_line_error(capsys, rc, f"{done} already holds a LoSA run; pass resume=True (--resume) to continue it or "
                                f"choose another out_dir (--out) (or delete {done} to start it over)")
    rc = main(["run", "no-such-model", "--eval", "none", "--out", str(tmp_path / "none"), "--resume", "--quiet"])
    _one_line_error(capsys, rc, "holds no finished LoSA step")
    # a flag refused now may have started a run with an older version: with --resume it is a warning, and
    # the resume check (against the recipe the run was started with) decides
    with pytest.warns(UserWarning, match=r"--owl-lambda has no effect with allocator='rmi' \(--allocator rmi\)"):
        rc = main(["run", "no-such-model", "--eval", "none", "--out", str(tmp_path / "none"), "--resume",
                   "--distill", "--owl-lambda", "0.1", "--quiet"])
    _one_line_error(capsys, rc, "holds no finished LoSA step")
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("argv,msg", [
    (["--max-windows", "0"], "--max-windows 0 must be at least 1"),
    (["--max-windows", "-1"], "--max-windows -1 must be at least 1"),
    (["--seqlen", "1"], "--seqlen 1 must be at least 2"),
    (["--datasets", ","], "--datasets is empty"),
    (["--datasets", "no_such_file.txt"], "--datasets no_such_file.txt: no such file, and not wikitext2, c4 or ptb"),
    (["--datasets", "wikitext2,c4", "--data-dir", "EMPTY"], "--datasets wikitext2: EMPTY/"),
    (["--datasets", "FILE.csv"], "--datasets FILE.csv: unsupported file type '.csv'"),
])
def test_eval_ppl_bad_settings_fail_before_loading(argv, msg, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(losa, "load_model", boom)
    (tmp_path / "FILE.csv").write_text("a,b\n")
    (tmp_path / "EMPTY").mkdir()
    subst = {"EMPTY": str(tmp_path / "EMPTY"), "FILE.csv": str(tmp_path / "FILE.csv")}
    rc = main(["eval", "ppl", "no-such-model", *[subst.get(a, a) for a in argv]])
    _one_line_error(capsys, rc, msg.replace("EMPTY", str(tmp_path / "EMPTY")).replace("FILE.csv", str(tmp_path / "FILE.csv")))


@pytest.mark.parametrize("cmd", ["prune", "run"])
def test_evaluation_flags_without_evaluation_data_are_refused(cmd, tiny_dir, capsys, no_work, monkeypatch):
    rc = main([cmd, str(tiny_dir), "--eval", "none", "--max-windows", "4", "--eval-seqlen", "32", "--quiet"])
    _one_line_error(capsys, rc, "--eval-seqlen, --max-windows have no effect with --eval none; drop --eval-seqlen "
                                "and --max-windows, or evaluate with --eval wikitext2 (c4, ptb) or --eval FILE")
    if cmd == "prune":
        rc = main([cmd, str(tiny_dir), "--eval", "none", "--compare-dense", "--quiet"])
        _one_line_error(capsys, rc, "--compare-dense has no effect with --eval none")
    monkeypatch.delenv("LOSA_DATA_DIR", raising=False)
    rc = main([cmd, str(tiny_dir), "--max-windows", "4", "--quiet"])
    _one_line_error(capsys, rc, "--max-windows has no effect without evaluation data (no data dir, so no default "
                                "--eval); pass --data-dir, --eval FILE or --eval wikitext2 (from the HF hub), or drop "
                                "--max-windows")


def test_run_refuses_sparsity_with_nm(tiny_dir, capsys, no_work):
    rc = main(["run", str(tiny_dir), "--nm", "2:4", "--sparsity", "0.7", "--eval", "none", "--quiet"])
    _one_line_error(capsys, rc, "--sparsity has no effect with nm (--nm): the N:M pattern sets the sparsity")
    assert LoSAConfig(nm="2:4", sparsity=0.5).ignored_fields() == []  # the default value is not "set"


def test_cli_warnings_are_one_line_and_other_categories_keep_their_source():
    from losa.cli import _one_line_warning

    assert _one_line_warning(UserWarning("x happened"), UserWarning, "/a/b/loop.py", 12) == "warning: x happened\n"
    assert _one_line_warning(FutureWarning("old API"), FutureWarning, "/site/lib/mod.py", 3) == (
        "warning (FutureWarning from mod.py:3): old API\n")


def test_prune_names_the_calibration_window_and_a_mixed_default_out(tiny_dir, tmp_path, capsys, no_work, monkeypatch):
    """--seqlen beyond the context is the calibration window's error (it also sets the evaluation window, whose
    error the trial got); a mixed N:M prune's default directory differs from the uniform one's."""
    from losa.cli.prune import _default_out

    rc = main(["prune", str(tiny_dir), "--method", "wanda", "--seqlen", "300", "--eval", "none", "--no-save",
               "--quiet"])
    _one_line_error(capsys, rc, "calibration window of 300 tokens exceeds the model's context of 256 positions")
    mixed, uniform = (_default_out("m", losa.PruneConfig(nm="2:8", nm_n=n)) for n in ([1, 3], None))
    assert (mixed.name, uniform.name) == ("m-wanda-mixed2of8", "m-wanda-2of8")
    assert _default_out("m", losa.PruneConfig(allocator="atp")).name == "m-wanda-50-atp"


def test_prune_saves_before_evaluating_and_records_the_perplexity_after(tiny_dir, tmp_path, capsys, monkeypatch):
    """The checkpoint is written before the pruned model's evaluation, which on a large model takes long: Ctrl-C or
    an error there kept nothing (trial); a finished evaluation is recorded in losa.json, as the prune printed it."""
    import losa.eval.ppl as ppl

    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"word{(i * 7) % 50 + 4}" for i in range(600)))
    argv = ["prune", str(tiny_dir), "--calib", "self", "--nsamples", "2", "--seqlen", "16", "--eval", str(text),
            "--eval-seqlen", "32", "--quiet"]
    measure = ppl.perplexity

    second = tmp_path / "second.txt"
    second.write_text(text.read_text())

    def stopped(model, tok, d, **k):  # the first dataset is measured, Ctrl-C during the second
        if d == str(second):
            raise KeyboardInterrupt
        return measure(model, tok, d, **k)

    monkeypatch.setattr(ppl, "perplexity", stopped)
    out = tmp_path / "stopped"
    two = [a if a != str(text) else f"{text},{second}" for a in argv]
    assert main([*two, "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip() == (f"interrupted; the pruned model is saved in {out}, without its {second} "
                                               f"perplexity; `losa eval ppl {out}` measures it")
    model, _ = losa.load_model(str(out))  # a whole checkpoint, half of its weights zero
    assert losa.sparsity_report(model).overall == pytest.approx(0.5, abs=1e-3)
    assert list(json.loads((out / "losa.json").read_text())["results"]["ppl"]) == [str(text)]  # the one measured
    monkeypatch.setattr(ppl, "perplexity", measure)
    out = tmp_path / "done"
    assert main([*argv, "--out", str(out)]) == 0
    log = capsys.readouterr().out
    recorded = json.loads((out / "losa.json").read_text())["results"]["ppl"][str(text)]
    want = float(measure(*losa.load_model(str(out)), str(text), seqlen=32, progress=False))  # measured here again
    assert recorded == pytest.approx(want, rel=1e-6) and f"perplexity (seqlen 32, windows all): {recorded:.3f}" in log
    assert log.index("saved checkpoint to") < log.index("pruned ") and f"perplexities recorded in {out}" in log


def test_prune_of_a_model_without_tokenizer_files_names_the_fix(tmp_path, capsys):
    """'calibration needs a tokenizer; load the model with one' gave a command-line user no way on (trial)."""
    d = tmp_path / "notok"
    make_tiny_model("llama", layers=2).save_pretrained(d)  # weights and config only
    capsys.readouterr()
    rc = main(["prune", str(d), "--calib", "self", "--nsamples", "2", "--seqlen", "16", "--eval", "none", "--no-save",
               "--quiet"])
    _one_line_error(capsys, rc, "calibration needs a tokenizer, and the model was loaded without one (no tokenizer "
                                "files beside its weights); copy the original model's tokenizer files into its directory")


@pytest.mark.parametrize("argv,err", [
    (["prune", "m", "--sparsty", "0.5"],
     "error: unrecognized arguments: --sparsty 0.5 (did you mean --sparsity?); see `losa prune --help`"),
    (["eval", "ppl", "m", "--eval-seqlen", "5"],
     "error: unrecognized arguments: --eval-seqlen 5 [--eval-seqlen is an option of `losa prune` and `losa run`] "
     "(did you mean --seqlen?); see `losa eval ppl --help`"),
    (["run", "m", "--prompt-format", "alpacca"],
     "error: argument --prompt-format: invalid choice: 'alpacca' (choose from 'auto', 'alpaca', 'chat', 'plain'); "
     "see `losa run --help`"),
    (["inspect", "m", "--zzz"], "error: unrecognized arguments: --zzz; see `losa inspect --help`"),
    (["--quiet", "prune", "m"],  # a command's option before the command (it was blamed on `losa prune`)
     "error: --quiet before the command: put command options after it (`losa prune --quiet ...`); see "
     "`losa prune --help`"),
    (["eval", "--quiet", "ppl", "m"],  # and before a subcommand (review: it named --quiet as eval ppl's unknown)
     "error: --quiet before the command: put command options after it (`losa eval ppl --quiet ...`); see "
     "`losa eval ppl --help`"),
    (["--zzz"], "error: unrecognized arguments: --zzz; see `losa --help`"),
    (["--zzz", "prune", "m"], "error: unrecognized arguments: --zzz; see `losa prune --help`"),  # no command has it
    (["run", "m", "--nm-n", "1,3"],  # another command's option (trial: only "did you mean --nm?")
     "error: unrecognized arguments: --nm-n 1,3 [--nm-n is an option of `losa prune`] (did you mean --nm?); see "
     "`losa run --help`"),
    (["eval", "ppl", "m", "--tasks", "boolq"],
     "error: unrecognized arguments: --tasks boolq [--tasks is an option of `losa eval zeroshot`]; see "
     "`losa eval ppl --help`"),
])
def test_argument_errors_are_one_line_from_the_command_with_a_suggestion(capsys, argv, err):
    """A typo in a flag was reported by the top-level parser after its usage block, with no suggestion (trial)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and capsys.readouterr().err == err + "\n"


def test_run_compare_dense_records_the_dense_perplexity_for_compare(tiny_dir, tmp_path, capsys):
    """losa run --compare-dense measures the unpruned model's perplexity first (the trial found only prune had it),
    records it beside the merged model's and compare shows it as the Dense row."""
    from losa.report import compare

    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"word{(i * 7) % 50 + 4}" for i in range(600)))
    out = tmp_path / "run"
    argv = [a for a in SMALL_RUN if a not in ("--eval", "none")]
    assert main(["run", str(tiny_dir), *argv, "--eval", str(text), "--eval-seqlen", "32", "--compare-dense",
                 "--out", str(out), "--no-save"]) == 0
    log = capsys.readouterr().out
    results = json.loads((out / "report.json").read_text())["results"]
    model, tok = losa.load_model(str(tiny_dir))  # the dense model, measured here on its own
    want = float(losa.perplexity(model, tok, str(text), seqlen=32))
    assert results["dense_ppl"][str(text)] == pytest.approx(want, rel=1e-5)
    assert f"  dense {text} perplexity: {want:.3f}" in log and f"  merged {text} perplexity: " in log
    rows = list(csv.DictReader(io.StringIO(compare([out])[1])))
    assert [r["Method"] for r in rows] == ["Dense", "Wanda + LoSA (no fine-tuning)"]
