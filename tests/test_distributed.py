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
    proc = _torchrun(workdir, "run", "tiny", *ARGS, "--batch-size", "4", "--out", "two")
    # one process speaks (the trial saw every line, bar and DDP's unused-parameters note twice)
    assert proc.stdout.count("losa run: tiny |") == 1 and proc.stdout.count("  step 2/2: ") == 1, proc.stdout
    assert "find_unused_parameters" not in proc.stderr, proc.stderr[-2000:]
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


def test_two_processes_with_rank_zero_adapters(workdir):
    """Data-parallel training is told about unused parameters only when an adapter sits at rank 0 (its forward
    skips it): such a run still trains (DDP would stop on the parameters without gradients otherwise)."""
    make_tiny_model("llama", layers=6).save_pretrained(workdir / "tiny6")
    make_tiny_tokenizer().save_pretrained(workdir / "tiny6")
    _torchrun(workdir, "run", "tiny6", *ARGS, "--batch-size", "4", "--r-min", "0", "--r-max", "8", "--omega-first", "1",
              "--omega-last", "1", "--out", "rank0")
    steps = json.loads((workdir / "rank0" / "report.json").read_text())["steps"]
    assert all(0 in s["ranks"] and s["train_loss"] for s in steps), [s["ranks"] for s in steps]


def test_two_processes_with_an_expert_no_token_reaches(workdir):
    """An expert that a batch does not reach leaves its adapters without gradients: data-parallel training of a
    mixture-of-experts model is told so (review: it stopped with 'Expected to have finished reduction')."""
    from test_moe import make_moe, starve_expert

    model = make_moe("mixtral")
    starve_expert(model)
    model.save_pretrained(workdir / "moe")
    make_tiny_tokenizer().save_pretrained(workdir / "moe")
    _torchrun(workdir, "run", "moe", *ARGS, "--batch-size", "4", "--out", "moe-run")
    steps = json.loads((workdir / "moe-run" / "report.json").read_text())["steps"]
    assert len(steps) == 2 and all(s["train_loss"] for s in steps)


def test_prune_refuses_several_processes_in_one_line(workdir):
    """Under torchrun every process pruned and wrote the same --out (trial)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "--no-python", LOSA, "prune", "tiny",
                           "--calib", "c4.txt", "--nsamples", "2", "--seqlen", "16", "--eval", "none", "--no-save"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and not (workdir / "runs").exists()
    assert proc.stderr.count("error: losa prune runs in one process") == 1, proc.stderr[-2000:]


def test_resume_under_two_processes(workdir, capsys):
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
    assert state["step"] == 1 and state["processes"] == 2
    shutil.copytree(workdir / "resumed", workdir / "resumed_one")
    _torchrun(workdir, "run", "tiny", *ARGS, "--batch-size", "4", "--out", "resumed", "--resume")
    a, b = _weights(workdir / "two"), _weights(workdir / "resumed")
    for k in a:
        assert (a[k] == b[k]).all(), k  # bit for bit the uninterrupted two-process run
    # the same run continued in one process: refused at half the global batch (it used to go on silently, with
    # twice the optimizer steps), continued with the grad_accum that keeps it (it used to be refused)
    cwd = Path.cwd()
    try:
        os.chdir(workdir)
        argv = ["run", "tiny", *ARGS, "--batch-size", "4", "--out", "resumed_one", "--resume"]
        assert main(argv) == 2
        assert capsys.readouterr().err == (
            "error: resume (--resume): the run in resumed_one/state fine-tunes with a global batch of 8 examples "
            "(batch size 4 x grad_accum 1 x 2 processes), this one with 4 (4 x 1 x 1); pass finetune.grad_accum "
            "(--grad-accum) 2 to keep it\n")
        assert main([*argv, "--grad-accum", "2"]) == 0
    finally:
        os.chdir(cwd)
    one = _weights(workdir / "resumed_one")
    for k in a:  # data-parallel averaging and accumulation both halve exactly: the same up to float order
        assert ((one[k] == 0) == (a[k] == 0)).all() and (one[k] - a[k]).abs().max() <= 1e-6, k


FSDP_SCRIPT = '''
import sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, sys.argv[1])
from conftest import make_tiny_model
from losa.lora import SparseLoRAConfig, add_sparse_lora, sparse_lora_modules

dist.init_process_group("gloo")

def build():
    m = make_tiny_model("llama", layers=2)
    add_sparse_lora(m, SparseLoRAConfig(r_max=4, rank=4, init_seed=0), mask_from_weights=False)
    for mod in sparse_lora_modules(m).values():
        torch.nn.init.normal_(mod.lora_B, generator=torch.Generator().manual_seed(1))
    return m

from losa.lora import SparseLoRALinear

ids = torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(0))
refs = {}
auto = SparseLoRALinear.__dict__["split_forward"]  # the staticmethod itself
for mode, split in (("layer", False), ("module", True)):
    # unsharded reference in the same arithmetic form: whole FSDP layers see a plain float32 W (fused
    # form); a sharded base linear is called by the adapter (split form)
    SparseLoRALinear.split_forward = staticmethod(lambda w, split=split: split)
    ref_model = build()
    ref = ref_model(ids).logits
    ref.sum().backward()
    refs[mode] = (ref.detach(), ref_model.model.layers[0].self_attn.q_proj.lora_B.grad)
SparseLoRALinear.split_forward = auto
for mode in ("layer", "module"):
    ref, ref_grad = refs[mode]
    m = build()
    if mode == "layer":  # FSDP units = decoder layers
        for layer in m.model.layers:
            fully_shard(layer)
    else:  # every base linear its own unit (like ZeRO-3): W exists only inside the base layer's call
        for mod in sparse_lora_modules(m).values():
            fully_shard(mod.base)
    fully_shard(m)
    w = m.model.layers[0].self_attn.q_proj.base.weight
    assert type(w).__name__ == "DTensor" and w.to_local().shape[0] == w.shape[0] // 2, (mode, w.to_local().shape)
    out = m(ids).logits
    assert torch.allclose(out.detach(), ref, atol=1e-5), (mode, float((out - ref).abs().max()))
    out.sum().backward()
    g = m.model.layers[0].self_attn.q_proj.lora_B.grad
    g = g.full_tensor() if hasattr(g, "full_tensor") else g
    tol = 1e-6 * float(ref_grad.abs().max())
    assert torch.allclose(g, ref_grad, rtol=1e-5, atol=tol), (mode, float((g - ref_grad).abs().max()), tol)
print("FSDP-OK", dist.get_rank())
'''


def test_fsdp2_shards_and_the_masked_lora_layer_gathers_through_its_base(tmp_path):
    """torch's FSDP (fully_shard) over 2 CPU processes: sharded weights, the same logits and adapter
    gradients as the unsharded model, with decoder layers or every base linear as FSDP units."""
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT)
    proc = _torchrun(tmp_path, str(script), str(Path(__file__).parent), python=True)
    assert proc.stdout.count("FSDP-OK") == 2


def test_trainer_fsdp_on_cpu_is_refused_not_silently_ignored(tmp_path):
    from losa.errors import LosaError
    from losa.finetune.config import FinetuneConfig
    from losa.finetune.train import finetune
    from losa.lora import SparseLoRAConfig, add_sparse_lora

    model = make_tiny_model("llama", layers=1)
    add_sparse_lora(model, SparseLoRAConfig(r_max=2, rank=2), mask_from_weights=False)
    examples = [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}] * 4
    with pytest.raises(LosaError, match=r"fsdp \(--fsdp\) needs GPUs"):
        finetune(model, examples, FinetuneConfig(batch_size=2, fsdp="full_shard auto_wrap"), 0, progress=False)
