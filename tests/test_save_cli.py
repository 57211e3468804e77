"""Checkpoint round trip, atomic output, CLI commands and one-line errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

import losa
from losa.cli import main
from losa.models.linear import get_weight
from losa.models.registry import get_decoder_layers, linear_modules
from losa.utils.io import atomic_directory


@pytest.fixture
def tiny_dir(tmp_path):
    model = make_tiny_model("llama", layers=2)
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    return d


def test_save_load_keeps_zeros(tmp_path):
    model = make_tiny_model("qwen2", layers=2)
    ids = torch.randint(3, 128, (2, 16))
    rep = losa.prune(model, None, losa.PruneConfig(method="wanda", nm="2:4"), calib_ids=ids, progress=False)
    out = losa.save_checkpoint(model, None, tmp_path / "ck", {"recipe": rep.recipe, "sparsity": rep.sparsity.model_dump()})
    loaded, _ = losa.load_model(str(out))
    for a, b in zip(get_decoder_layers(model), get_decoder_layers(loaded)):
        for (_, ma), (_, mb) in zip(linear_modules(a).items(), linear_modules(b).items()):
            assert torch.equal(get_weight(ma), get_weight(mb))
            assert torch.equal(get_weight(mb) == 0, get_weight(ma) == 0)
    manifest = json.loads((out / "losa.json").read_text())
    assert manifest["recipe"]["nm"] == "2:4" and "torch" in manifest["versions"]
    assert losa.sparsity_report(loaded).overall == pytest.approx(0.5)


def test_atomic_directory_leaves_nothing_on_crash(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(losa.LosaError, match="already exists"):
        target.mkdir()
        with atomic_directory(target):
            pass


def test_cli_prune_inspect_eval(tiny_dir, tmp_path, capsys, data_dir):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 50}" for i in range(3000)))
    out = tmp_path / "pruned"
    rc = main(["prune", str(tiny_dir), "--method", "magnitude", "--sparsity", "0.6", "--eval", "none",
               "--out", str(out), "--quiet"])
    assert rc == 0
    assert "overall sparsity 0.60" in capsys.readouterr().out  # round(numel·0.6) per matrix
    rc = main(["inspect", str(out), "--min-sparsity", "0.59", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["overall"] == pytest.approx(0.6, abs=1e-3)
    assert main(["inspect", str(out), "--min-sparsity", "0.7"]) == 1
    capsys.readouterr()
    assert main(["inspect", str(out), "--min-sparsity", "1.5"]) == 2  # a percentage or a typo, before the model loads
    assert capsys.readouterr().err.strip() == ("error: --min-sparsity 1.5 is outside [0, 1]; give a fraction, e.g. "
                                               "0.5 for 50 %")
    # Wanda with calibration from a local text file, then perplexity on the same file
    rc = main(["prune", str(tiny_dir), "--method", "wanda", "--sparsity", "0.5", "--calib", str(text),
               "--nsamples", "4", "--seqlen", "32", "--eval", str(text), "--max-windows", "3", "--compare-dense",
               "--out", str(tmp_path / "w"), "--quiet"])
    assert rc == 0
    manifest = json.loads((tmp_path / "w" / "losa.json").read_text())
    ppl = manifest["results"]["ppl"][str(text)]
    assert ppl > 1 and manifest["results"]["dense_ppl"][str(text)] != ppl
    capsys.readouterr()
    assert main(["eval", "ppl", str(tmp_path / "w"), "--datasets", str(text), "--seqlen", "32", "--max-windows", "3",
                 "--quiet"]) == 0
    assert f"perplexity {ppl:.4f}" in capsys.readouterr().out


def test_cli_recipe_yaml(tiny_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: magnitude\nnm: '2:4'\n")
    out = tmp_path / "nm"
    assert main(["prune", str(tiny_dir), "--recipe", str(recipe), "--eval", "none", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--nm", "2:4"]) == 0
    assert "satisfied by every module" in capsys.readouterr().out


def test_inspect_checks_the_pattern_the_checkpoint_records(tiny_dir, tmp_path, capsys):
    """Without --nm, inspect checks the (mixed) N:M pattern recorded in losa.json, per layer for mixed N:M (the
    trial's mixed checkpoint was reported as 'no N:8 pattern'); a record the weights do not satisfy exits 1."""
    from losa.cli.inspect import recorded_pattern

    out = tmp_path / "mixed"
    assert main(["prune", str(tiny_dir), "--method", "magnitude", "--nm", "2:8", "--nm-n", "1,3", "--eval", "none",
                 "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    log = capsys.readouterr().out
    assert log.startswith(f"checking the mixed 2:8 pattern recorded in {out}/losa.json (--nm checks another)\n")
    assert "mixed 2:8 pattern: satisfied by every module" in log
    assert main(["inspect", str(out), "--nm", "2:8"]) == 1  # layer 1 keeps 3 of 8: not 2:8 everywhere
    log = capsys.readouterr().out
    assert log.startswith(f"note: {out}/losa.json records the mixed 2:8 pattern; --nm 2:8 checks 2:8 on every layer")
    assert "2:8 pattern: VIOLATED in" in log
    manifest = json.loads((out / "losa.json").read_text())
    manifest["recipe"]["nm_n"] = [3, 1]  # layer 1 holds 3 non-zeros per group of 8: not 1:8
    (out / "losa.json").write_text(json.dumps(manifest))
    assert main(["inspect", str(out)]) == 1
    assert "mixed 2:8 pattern: VIOLATED in" in capsys.readouterr().out
    # a LoSA run's merged model records its per-layer N beside the recipe; without it mixed N:M is not checked
    run_model = tmp_path / "run"
    run_model.mkdir()
    (run_model / "losa.json").write_text(json.dumps({"recipe": {"nm": "2:8", "mixed_nm": True}, "nm_n": [2, 2, 1, 3]}))
    assert recorded_pattern(str(run_model)) == ("mixed 2:8", [(2, 8), (2, 8), (1, 8), (3, 8)])
    manifest["recipe"]["nm_n"] = [1, 3, 2]  # a record for another depth: one line naming the file and --nm
    (out / "losa.json").write_text(json.dumps(manifest))
    assert main(["inspect", str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{out}/losa.json records N for 3 decoder layers but the model "
                                                    "has 2; check a pattern with --nm instead")
    (run_model / "losa.json").write_text(json.dumps({"recipe": {"nm": "2:8", "mixed_nm": True}}))
    assert recorded_pattern(str(run_model)) is None and recorded_pattern(str(tiny_dir)) is None


@pytest.mark.parametrize("argv,msg", [
    (["--sparsity", "1.2"], "outside [0, 1)"),
    (["--nm", "4:4"], "1 <= N < M"),
    (["--nm", "two:four"], "write it as N:M"),
    (["--method", "obs"], "unknown method 'obs'"),
    (["--calib", "/nonexistent/file.txt", "--method", "wanda"], "no such file exists"),
])
def test_cli_bad_input_one_line(tiny_dir, capsys, argv, msg):
    rc = main(["prune", str(tiny_dir), "--eval", "none", "--no-save", "--quiet", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and msg in err and len(err.strip().splitlines()) == 1


def test_unknown_architecture(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, BloomConfig

    m = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4))
    m.save_pretrained(tmp_path / "bloom")
    rc = main(["inspect", str(tmp_path / "bloom")])
    err = capsys.readouterr().err
    assert rc == 2 and "unsupported architecture model_type='bloom'" in err and "register_arch" in err


def test_missing_model_path(capsys):
    assert main(["inspect", "./no/such/dir"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_atomic_writers_name_a_bad_destination_in_one_line(tmp_path):
    from losa.utils.io import atomic_write_json, atomic_write_text

    (tmp_path / "file").write_text("x")
    with pytest.raises(losa.LosaError, match=f"cannot write {tmp_path}: it is a directory; give the path of a file"):
        atomic_write_json(tmp_path, {"a": 1})
    with pytest.raises(losa.LosaError, match=f"{tmp_path / 'file'} is a file, not a directory; choose another path"):
        atomic_write_text(tmp_path / "file" / "sub" / "x.md", "text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no temp file left behind
    atomic_write_text(tmp_path / "new" / "dir" / "x.md", "ok")  # missing folders are still created
    assert (tmp_path / "new" / "dir" / "x.md").read_text() == "ok"


def test_check_output_file(tmp_path):
    from losa.utils.io import check_output_file

    (tmp_path / "file").write_text("x")
    assert check_output_file(tmp_path / "a" / "b.json", "--out") == tmp_path / "a" / "b.json"
    assert not (tmp_path / "a").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert check_output_file(tmp_path / "file", "--out") == tmp_path / "file"  # an existing file is replaced
    with pytest.raises(losa.LosaError, match=f"--json {tmp_path} is a directory"):
        check_output_file(tmp_path, "--json")
    with pytest.raises(losa.LosaError, match=f"--out {tmp_path / 'file' / 'x' / 'r.json'}: {tmp_path / 'file'} is a "
                                             "file, not a directory"):
        check_output_file(tmp_path / "file" / "x" / "r.json", "--out")
    with pytest.raises(losa.LosaError, match="--out /proc/nope/x.json: cannot create files in /proc"):
        check_output_file("/proc/nope/x.json", "--out")


@pytest.mark.parametrize("argv", [["eval", "ppl", "MODEL", "--out", "DIR"], ["inspect", "MODEL", "--json", "DIR"],
                                  ["eval", "ppl", "MODEL", "--out", "/proc/nope/x.json"]])
def test_cli_bad_output_path_fails_before_loading_the_model(tmp_path, capsys, argv):
    argv = [str(tmp_path / "missing") if a == "MODEL" else str(tmp_path) if a == "DIR" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {argv[-2]} {argv[-1]}") and len(err.splitlines()) == 1, err


def test_cli_bad_device_is_one_line(tmp_path, capsys):
    from losa.utils.device import resolve_device

    for bad in ("foo", "cuda:x", ""):
        with pytest.raises(losa.LosaError, match=rf"device '{bad}' is not a device; set device \(--device\) to auto, "
                                                 "cpu, cuda or cuda:N"):
            resolve_device(bad)
    assert resolve_device("cpu") == torch.device("cpu")
    assert main(["eval", "ppl", str(tmp_path / "missing"), "--device", "foo"]) == 2  # before loading the model
    assert capsys.readouterr().err == ("error: device 'foo' is not a device; set device (--device) to auto, cpu, "
                                       "cuda or cuda:N\n")


def test_inspect_help_and_patterns(tiny_dir, capsys):
    from losa.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["inspect"]
    assert "(default: None)" not in sub.format_help()
    assert main(["inspect", str(tiny_dir)]) == 0  # dense: no N:M pattern at all (4:4 / 8:8 are not patterns)
    out = capsys.readouterr().out
    assert "no N:4 pattern: some group of 4 has no zero" in out and "no N:8 pattern" in out
    assert "4:4" not in out and "8:8" not in out


def test_saved_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through tempfile (files 0600, folders 0700); what they leave gets the mode a plain
    open()/mkdir() would (0644 / 0755 under umask 022), so a checkpoint can be shared like any other files."""
    import stat

    from conftest import make_tiny_model, make_tiny_tokenizer

    import losa
    from losa.utils.io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        losa.save_checkpoint(make_tiny_model("llama"), make_tiny_tokenizer(), tmp_path / "ckpt", {"recipe": {}})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    assert "model.safetensors" in modes and "losa.json" in modes
    assert set(modes.values()) == {0o644}, modes
