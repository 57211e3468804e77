"""`losa run` under several processes (torchrun, gloo on the CPU standing in for several GPUs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_model, make_tiny_tokenizer
from safetensors.torch import load_file

from losa.cli import main

BIN = Path(sys.executable).parent
TORCHRUN = shutil.which("torchrun", path=str(BIN)) or shutil.which("torchrun")
LOSA = shutil.which("losa", path=str(BIN)) or shutil.which("losa")
pytestmark = pytest.mark.skipif(TORCHRUN is None or LOSA is None, reason="torchrun / losa entry points not installed")

ARGS = ["--calib", "c4.txt", "--finetune-data", "ft.jsonl", "--sparsity", "0.5", "--steps", "2", "--nsamples", "4",
        "--seqlen", "16", "--recon-nsamples", "2", "--max-length", "24", "--lr", "0.01", "--eval", "none", "--quiet"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    make_tiny_model("llama", layers=2).save_pretrained(d / "tiny")
    make_tiny_tokenizer().save_pretrained(d / "tiny")
    (d / "ft.jsonl").write_text("\n".join(json.dumps({"text": " ".join(f"word{(i * 7 + j * 3) % 90 + 4}"
                                                                           for j in range(24))}) for i in range(32)))
    (d / "c4.txt").write_text(" ".join(f"word{(i * 13) % 100 + 4}" for i in range(4000)))
    return d


def _torchrun(cwd: Path, *argv: str, python: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2"]
    cmd += [*argv] if python else ["--no-python", LOSA, *argv]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _weights(run: Path) -> dict:
    return load_file(str(run / "model" / "model.safetensors"))


def test_two_processes_agree_with_one(workdir):
    _torchrun(workdir, "run", "tiny", *ARGS, "--batch-size", "4", "--out", "two")
    cwd = Path.cwd()
    try:  # the same global batch in one process: 4 examples x 2 accumulation steps
        os.chdir(workdir)
        assert main(["run", "tiny", *ARGS, "--batch-size", "4", "--grad-accum", "2", "--out", "one"]) == 0
    finally:
        os.chdir(cwd)
    one, two = _weights(workdir / "one"), _weights(workdir / "two")
    for k in one:
        if k.endswith("proj.weight"):
            assert ((one[k] == 0) == (two[k] == 0)).all(), f"mask of {k}"
            # data-parallel averaging and accumulation both halve exactly: same adapters up to float order
            assert (one[k] - two[k]).abs().max() <= 1e-6, k
    r1, r2 = (json.loads((workdir / r / "report.json").read_text()) for r in ("one", "two"))
    assert [s["ranks"] for s in r1["steps"]] == [s["ranks"] for s in r2["steps"]]
    assert [s["layer_target_sparsity"] for s in r1["steps"]] == [s["layer_target_sparsity"] for s in r2["steps"]]
    # one set of files, written once (no second writer, no temporary leftovers)
    assert sorted(p.name for p in (workdir / "two").iterdir()) == ["details.json", "model", "report.json", "state"]
    assert sorted(p.name for p in (workdir / "two" / "state").iterdir()) == [
        "adapters.safetensors", "state.json", "weights.safetensors"]


def test_resume_under_two_processes(workdir):
    if not (workdir / "two").is_dir():
        _torchrun(workdir, "run", "tiny", *ARGS, "--batch-size", "4", "--out", "two")
    # a run stopped after its first step (as if killed during step 2), in two processes
    script = workdir / "first_step.py"
    script.write_text(
        "import sys\n"
        "from losa.cli import build_parser\n"
        "from losa.cli.common import config_from_args\n"
        "from losa.models.loading import load_model\n"
        "from losa.pipelines.losa.loop import LoSARun\n"
        "from pathlib import Path\n"
        "args = build_parser().parse_args(['run', *sys.argv[1:]])\n"
        "model, tok = load_model('tiny')\n"
        "job = LoSARun(model, tok, config_from_args(args), Path(args.out), progress=False)\n"
        "job.setup()\n"
        "job.step(1)\n")
    _torchrun(workdir, str(script), *ARGS, "--batch-size", "4", "--out", "resumed", python=True)
    state = json.loads((workdir / "resumed" / "state" / "state.json").read_text())
    assert state["step"] == 1
    _torchrun(workdir, "run", "tiny", *ARGS, "--batch-size", "4", "--out", "resumed", "--resume")
    a, b = _weights(workdir / "two"), _weights(workdir / "resumed")
    for k in a:
        assert (a[k] == b[k]).all(), k  # bit for bit the uninterrupted two-process run
