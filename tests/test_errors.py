"""Errors that the Python API and the command line share name the API parameter, then the flag.

Each test makes the mistake the way a Python user would (no command line involved) and checks that the
fix names what that user typed: ``calib``, ``data_dir``, ``out_dir``, ``resume=True``, ``batch_size`` ...
(the flag may follow in parentheses, for the command-line user).
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

import losa
from losa.errors import LosaError, option


def _names_param(msg: str, name: str) -> bool:
    """Whether ``msg`` names ``name`` as itself, not only inside a flag (``--name``) or a dotted path."""
    return re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", msg) is not None


def _text(tmp_path, words: int) -> str:
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"word{i % 50}" for i in range(words)))
    return str(path)


def test_option_renders_the_parameter_then_the_flag():
    assert option("calib") == "calib (--calib)"
    assert option("data_dir") == "data_dir (--data-dir)"
    assert option("out_dir", "--out") == "out_dir (--out)"
    assert option("method='magnitude'", "--method magnitude") == "method='magnitude' (--method magnitude)"


def test_wanda_without_calibration_data_names_calib():
    from losa.pruning import get_pruner
    from losa.pruning.target import Target

    for method in ("wanda", "sparsegpt"):
        with pytest.raises(LosaError) as e:
            get_pruner(method).prune(torch.randn(4, 8), None, Target(sparsity=0.5))
        msg = str(e.value)
        assert _names_param(msg, "calib") and "--calib" in msg and "method='magnitude'" in msg, msg


def test_prune_without_calibration_files_names_data_dir(tmp_path):
    model = make_tiny_model("llama", layers=1)
    cfg = {"method": "wanda", "calib": "c4", "nsamples": 2, "seqlen": 16}
    with pytest.raises(LosaError) as e:  # an empty data directory: no c4 there
        losa.prune(model, make_tiny_tokenizer(), {**cfg, "data_dir": str(tmp_path)}, progress=False)
    assert "c4 train split not found" in str(e.value) and _names_param(str(e.value), "data_dir"), str(e.value)
    with pytest.raises(LosaError) as e:
        losa.prune(model, make_tiny_tokenizer(), {**cfg, "data_dir": str(tmp_path / "nowhere")}, progress=False)
    assert "does not exist" in str(e.value) and _names_param(str(e.value), "data_dir"), str(e.value)


def test_calibration_text_shorter_than_a_window_names_seqlen(tmp_path):
    cfg = losa.PruneConfig(method="wanda", calib=_text(tmp_path, 20), nsamples=2, seqlen=64)
    with pytest.raises(LosaError) as e:
        losa.prune(make_tiny_model("llama", layers=1), make_tiny_tokenizer(), cfg, progress=False)
    assert "too short for seqlen 64" in str(e.value) and "shorter seqlen (--seqlen)" in str(e.value)


def test_calibration_window_beyond_the_context_names_seqlen():
    cfg = losa.PruneConfig(method="wanda", calib="self", nsamples=2, seqlen=512)  # the model has 256 positions
    with pytest.raises(LosaError) as e:
        losa.prune(make_tiny_model("gpt2", layers=1), make_tiny_tokenizer(), cfg, progress=False)
    assert str(e.value).endswith("set seqlen (--seqlen) to 256 or lower"), str(e.value)


def test_pruner_option_of_another_method_names_method():
    with pytest.raises(LosaError) as e:
        losa.PruneConfig(method="wanda", options={"percdamp": 0.1})
    assert _names_param(str(e.value), "method='wanda'") and "sparsegpt" in str(e.value), str(e.value)


@pytest.mark.filterwarnings("ignore:no finetune_data")
def test_run_resume_without_out_dir_and_into_an_existing_run(tmp_path):
    calib = torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = {"calib": "c4", "nsamples": 2, "seqlen": 16, "recon_nsamples": 2, "steps": 1}
    with pytest.raises(LosaError) as e:
        losa.run(make_tiny_model("llama", layers=1), make_tiny_tokenizer(), cfg, resume=True, calib_ids=calib,
                 progress=False)
    msg = str(e.value)
    assert _names_param(msg, "resume=True") and _names_param(msg, "out_dir"), msg
    (tmp_path / "done" / "state").mkdir(parents=True)
    with pytest.raises(LosaError) as e:
        losa.run(make_tiny_model("llama", layers=1), make_tiny_tokenizer(), cfg, out_dir=tmp_path / "done",
                 calib_ids=calib, progress=False)
    msg = str(e.value)
    assert "already holds a LoSA run" in msg and _names_param(msg, "resume=True") and _names_param(msg, "out_dir")
    with pytest.raises(LosaError) as e:  # resume where nothing finished
        losa.run(make_tiny_model("llama", layers=1), make_tiny_tokenizer(), cfg, out_dir=tmp_path / "none",
                 resume=True, calib_ids=calib, progress=False)
    msg = str(e.value)
    assert "holds no finished LoSA step" in msg and _names_param(msg, "resume") and _names_param(msg, "out_dir")


def test_run_warnings_name_the_config_fields():
    calib = torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = losa.LoSAConfig(calib="c4", nsamples=2, seqlen=16, recon_nsamples=2, steps=1, nm="2:4", sparsity=0.7)
    with pytest.warns(UserWarning) as w:
        losa.run(make_tiny_model("llama", layers=1), make_tiny_tokenizer(), cfg, calib_ids=calib, progress=False)
    messages = [str(x.message) for x in w]
    no_ft = next(m for m in messages if m.startswith("no "))
    assert _names_param(no_ft, "finetune_data") and _names_param(no_ft, "finetune.distill"), no_ft
    ignored = next(m for m in messages if m.startswith("sparsity has no effect"))
    assert _names_param(ignored, "nm"), ignored


def test_perplexity_batch_size_and_window_name_the_arguments(tmp_path):
    model, tok = make_tiny_model("gpt2", layers=1), make_tiny_tokenizer()
    text = _text(tmp_path, 300)
    with pytest.raises(LosaError) as e:
        losa.perplexity(model, tok, text, seqlen=32, batch_size=0, progress=False)
    assert _names_param(str(e.value), "batch_size"), str(e.value)
    with pytest.raises(LosaError) as e:
        losa.perplexity(model, tok, text, seqlen=512, progress=False)
    assert str(e.value).endswith("set seqlen (--seqlen) to 256 or lower"), str(e.value)
    short = tmp_path / "short.txt"
    short.write_text(" ".join(["word5"] * 100))
    with pytest.raises(LosaError) as e:  # fewer tokens than one window
        losa.perplexity(model, tok, str(short), seqlen=200, progress=False)
    assert "fewer than one window" in str(e.value) and _names_param(str(e.value), "seqlen"), str(e.value)


def test_bad_device_and_existing_checkpoint_name_the_arguments(tmp_path):
    with pytest.raises(LosaError) as e:
        losa.prune(make_tiny_model("llama", layers=1), None, losa.PruneConfig(method="wanda", device="foo"),
                   calib_ids=torch.randint(4, 128, (2, 8)), progress=False)
    assert "set device (--device) to auto, cpu, cuda or cuda:N" in str(e.value), str(e.value)
    (tmp_path / "ck").mkdir()
    with pytest.raises(LosaError) as e:
        losa.save_checkpoint(make_tiny_model("llama", layers=1), None, tmp_path / "ck")
    msg = str(e.value)
    assert _names_param(msg, "overwrite=True") and _names_param(msg, "out") and "--overwrite" in msg, msg
