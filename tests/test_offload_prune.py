"""Offloaded pruning gives the same masks as in-memory pruning.

A tiny random Llama is saved, then loaded twice: fully in memory, and with accelerate offloading its
decoder layers to disk under a small CPU memory cap. Both are pruned from the same calibration ids;
the masks, the pruned weights (read back from the offload folder by accelerate's own loader) and the
logits of a fresh forward must match the in-memory result.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.utils import has_offloaded_params
from accelerate.utils.offload import OffloadedWeightsLoader
from conftest import make_tiny_model, make_tiny_tokenizer
from transformers import AutoModelForCausalLM

import losa
from losa.errors import LosaError
from losa.models.linear import get_weight
from losa.models.offload import is_offloaded, onloaded
from losa.models.registry import get_arch, get_decoder_layers, linear_modules
from losa.pipelines.oneshot import PruneConfig, PruneVisitor

LAYERS = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", seed=3, layers=LAYERS, hidden=64, vocab=128).save_pretrained(path)
    return path


def _offloaded(checkpoint: Path, folder: Path):
    """The checkpoint with everything beyond a small CPU budget offloaded to ``folder`` on disk."""
    model, _ = losa.load_model(str(checkpoint), device_map="auto", max_memory={"cpu": 100_000},
                               offload_folder=str(folder))
    layers = get_decoder_layers(model)
    offloaded = [m for layer in layers for m in linear_modules(layer, get_arch(model)).values()]
    assert "disk" in set(model.hf_device_map.values()), model.hf_device_map
    assert all(has_offloaded_params(m) and m.weight.device.type == "meta" for m in offloaded)
    return model


def _calib_ids() -> torch.Tensor:
    return torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def _prune(model, method: str, **options) -> dict[tuple[int, str], torch.Tensor]:
    config = PruneConfig(method=method, sparsity=0.5, device="cpu", **options)
    visitor = PruneVisitor(config.pruner(), config.layer_targets(LAYERS), keep_masks=True)
    report = losa.prune(model, config=config, calib_ids=_calib_ids(), progress=False, visitor=visitor)
    assert report.sparsity.overall == pytest.approx(0.5, abs=0.02)
    return visitor.masks


def _weights(model) -> dict[str, torch.Tensor]:
    """Every prunable weight of an in-memory model by its state-dict name."""
    return {f"{name}.weight": mod.weight.detach().clone() for name, mod in model.named_modules()
            if any(name.endswith(f".{k}") for k in linear_modules(get_decoder_layers(model)[0]))}


@pytest.mark.parametrize(("method", "options"), [("wanda", {}), ("sparsegpt", {}),
                                                 ("sparsegpt", {"sequential": "layer"})])
def test_offloaded_pruning_matches_in_memory(checkpoint: Path, tmp_path: Path, method: str, options: dict) -> None:
    dense, _ = losa.load_model(str(checkpoint))
    expected_masks = _prune(dense, method, **options)
    expected = _weights(dense)

    folder = tmp_path / "offload"
    model = _offloaded(checkpoint, folder)
    masks = _prune(model, method, **options)

    assert masks.keys() == expected_masks.keys()
    for key, mask in expected_masks.items():
        assert torch.equal(masks[key], mask), f"mask of {key} differs"
    # the pruned weights were written to the offload folder: accelerate's own loader reads them back
    stored = OffloadedWeightsLoader(save_folder=str(folder))
    assert set(stored) == set(expected)
    for key, weight in expected.items():
        assert torch.equal(stored[key], weight), f"{key} differs from the in-memory pruning"
    assert is_offloaded(model)  # still offloaded after pruning
    ids = _calib_ids()[:2]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_cpu_offloaded_magnitude_pruning_matches_in_memory(tiny_model) -> None:
    """The CPU-offload map (a state dict) gets the pruned weights too (data-free pruner path)."""
    from accelerate import cpu_offload

    dense = tiny_model("llama", seed=4, layers=LAYERS)
    model = tiny_model("llama", seed=4, layers=LAYERS)
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert is_offloaded(model)
    expected_masks = _prune(dense, "magnitude")
    masks = _prune(model, "magnitude")
    assert all(torch.equal(masks[k], m) for k, m in expected_masks.items())
    for layer, ref in zip(get_decoder_layers(model), get_decoder_layers(dense)):
        with onloaded(layer):
            for name, mod in linear_modules(layer, get_arch(model)).items():
                assert torch.equal(get_weight(mod), get_weight(ref.get_submodule(name)))


def test_onloaded_writes_back_only_changed_weights(checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "offload"
    model = _offloaded(checkpoint, folder)
    layer = get_decoder_layers(model)[1]
    with onloaded(layer), torch.no_grad():
        assert layer.mlp.up_proj.weight.device.type == "cpu"
        layer.mlp.up_proj.weight.zero_()
    assert layer.mlp.up_proj.weight.device.type == "meta"
    stored = OffloadedWeightsLoader(save_folder=str(folder))
    assert list(stored) == ["model.layers.1.mlp.up_proj.weight"]
    assert not stored["model.layers.1.mlp.up_proj.weight"].any()
    with onloaded(layer):
        assert not layer.mlp.up_proj.weight.any()


def test_dispatched_model_on_another_device_is_a_clear_error(checkpoint: Path, tmp_path: Path) -> None:
    model = _offloaded(checkpoint, tmp_path / "offload")
    with pytest.raises(LosaError, match="dispatched by accelerate to compute on cpu"):
        losa.prune(model, config=PruneConfig(method="wanda", device="cuda:1"), calib_ids=_calib_ids(),
                   progress=False)


def test_offloaded_model_loads_from_directory(checkpoint: Path, tmp_path: Path) -> None:
    model = _offloaded(checkpoint, tmp_path / "offload")
    ref = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ids = _calib_ids()[:1]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_sparsify_for_inference_refuses_an_offloaded_model(checkpoint, tmp_path):
    """It reads every weight (it failed on a meta tensor's .item())."""
    from losa.inference import sparsify_for_inference

    model = _offloaded(checkpoint, tmp_path / "off")
    with pytest.raises(LosaError, match="this model is offloaded by accelerate; load it without offloading"):
        sparsify_for_inference(model)


def test_perplexity_of_an_offloaded_model_matches_the_model_in_memory(checkpoint, tmp_path):
    """Its first parameter is on meta; the inputs go to the CPU and accelerate's hooks take them on (it failed
    with 'Cannot copy out of meta tensor')."""
    from losa.eval.ppl import perplexity

    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 37}" for i in range(400)))
    tok = make_tiny_tokenizer()
    dense, _ = losa.load_model(str(checkpoint))
    want = perplexity(dense, tok, str(text), seqlen=32, max_windows=3, progress=False)
    got = perplexity(_offloaded(checkpoint, tmp_path / "off"), tok, str(text), seqlen=32, max_windows=3,
                     progress=False)
    assert got == pytest.approx(want, rel=1e-5)


def test_losa_run_refuses_an_offloaded_model_before_any_work(checkpoint, tmp_path):
    """losa.run on an offloaded model failed deep in torch ("Cannot copy out of meta tensor") (trial)."""
    model = _offloaded(checkpoint, tmp_path / "offload")
    with pytest.raises(LosaError, match=r"^losa.run needs every weight in memory .* offloaded by accelerate; load it "
                                        r"without CPU/disk offloading"):
        losa.run(model, make_tiny_tokenizer(), {"sparsity": 0.5, "steps": 1, "device": "cpu"},
                 out_dir=tmp_path / "run", calib_ids=_calib_ids(), progress=False)
    assert not (tmp_path / "run").exists()


def test_prune_and_eval_from_the_command_line_with_offloading(checkpoint, tmp_path, capsys):
    """--max-memory / --offload-folder reach accelerate's device map from the command line (only Python could):
    the saved checkpoint is the in-memory prune's, weight for weight, and eval ppl measures what it measures in
    memory; weights sent to disk without a folder, and a malformed budget, are one-line errors before pruning."""
    from losa.cli import main

    make_tiny_tokenizer().save_pretrained(checkpoint)
    common = ["--calib", "self", "--nsamples", "4", "--seqlen", "32", "--eval", "none", "--quiet"]
    assert main(["prune", str(checkpoint), *common, "--out", str(tmp_path / "mem")]) == 0
    assert main(["prune", str(checkpoint), *common, "--max-memory", "cpu=100KB", "--offload-folder",
                 str(tmp_path / "off"), "--out", str(tmp_path / "disk")]) == 0
    log = capsys.readouterr().out
    assert f"  accelerate's device map: the whole model on disk (offload folder {tmp_path / 'off'})" in log
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / d, dtype=torch.float32) for d in ("mem", "disk"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"word{(i * 7) % 50 + 4}" for i in range(400)))
    ppl = []
    for extra in ([], ["--max-memory", "cpu=100KB", "--offload-folder", str(tmp_path / "off2")]):
        assert main(["eval", "ppl", str(tmp_path / "disk"), "--datasets", str(text), "--seqlen", "32", "--quiet",
                     *extra]) == 0
        ppl.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert ppl[0] == ppl[1] and "perplexity" in ppl[0]
    rc = main(["prune", str(checkpoint), *common, "--max-memory", "cpu=100KB", "--no-save"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == ("error: the model does not fit in --max-memory cpu=100KB: 1 of its modules go "
                                       "to disk, which needs --offload-folder DIR")
    rc = main(["prune", str(checkpoint), *common, "--max-memory", "cpu=100", "--no-save"])
    assert rc == 2 and capsys.readouterr().err.startswith("error: --max-memory entry 'cpu=100' is not DEVICE=SIZE")


def test_max_memory_budgets_are_bytes_and_name_real_devices(monkeypatch):
    """Budgets go to accelerate in bytes, computed here (accelerate refused TB and read a lowercase gb as
    gigabits, review); a GPU the machine does not have is named before loading."""
    import argparse

    from losa.cli.common import offload_kwargs

    def budgets(text: str) -> dict:
        return offload_kwargs(argparse.Namespace(max_memory=text, offload_folder=None))["max_memory"]

    assert budgets("cpu=1TB") == {"cpu": 10**12} and budgets("cpu=70gb") == {"cpu": 70 * 10**9}
    assert budgets("cpu=1.5KiB") == {"cpu": 1536} and budgets("cpu=512 MiB") == {"cpu": 512 * 2**20}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert budgets("0=70GiB, 1=70GiB, cpu=200GiB") == {0: 70 * 2**30, 1: 70 * 2**30, "cpu": 200 * 2**30}
    with pytest.raises(LosaError, match=r"^--max-memory names GPU 2, and this machine has 2 GPUs; give budgets"):
        budgets("2=10GiB")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(LosaError, match=r"^--max-memory names GPU 0, and this machine has no GPUs"):
        budgets("0=10GiB")
