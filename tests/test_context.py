"""Windows longer than the model's context fail at once with one line naming the maximum and the flag."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

import losa
from losa.cli import main
from losa.errors import LosaError
from losa.eval.ppl import perplexity_from_ids


@pytest.fixture
def opt_dir(tmp_path):
    d = tmp_path / "opt"
    make_tiny_model("opt", layers=2).save_pretrained(d)  # 256 learned positions
    make_tiny_tokenizer().save_pretrained(d)
    return d


def test_the_failing_input_really_fails_deep_inside_torch_without_the_check():
    """The reference behaviour the check replaces: OPT's learned positions end in an IndexError."""
    model = make_tiny_model("opt", layers=1)
    with pytest.raises(IndexError):
        model(torch.randint(4, 128, (1, 512)))


def test_prune_calibration_window_beyond_context(opt_dir, capsys):
    rc = main(["prune", str(opt_dir), "--seqlen", "512", "--nsamples", "2", "--calib", "c4", "--eval", "none",
               "--no-save", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err == ("error: calibration window of 512 tokens exceeds the model's context of 256 positions; "
                   "set seqlen (--seqlen) to 256 or lower")


def test_engine_and_losa_refuse_long_windows():
    model = make_tiny_model("gpt2", layers=1)  # n_positions = 256
    ids = torch.randint(4, 128, (2, 300))
    with pytest.raises(LosaError, match="calibration window of 300 tokens exceeds the model's context of 256"):
        losa.prune(model, None, losa.PruneConfig(method="wanda"), calib_ids=ids, progress=False)
    with pytest.raises(LosaError, match=r"fine-tuning example of 512 tokens .* set finetune\.max_length \(--max-length\) to 256 or "
                                        "lower"):
        losa.run(make_tiny_model("llama", layers=1), make_tiny_tokenizer(),
                 {"calib": "c4", "nsamples": 2, "seqlen": 16, "recon_nsamples": 2, "finetune": {"distill": True,
                                                                                                "max_length": 512}},
                 calib_ids=torch.randint(4, 128, (2, 16)), progress=False)


def test_perplexity_window_beyond_context(opt_dir, capsys, data_dir):
    model = make_tiny_model("opt", layers=1)
    with pytest.raises(LosaError, match=r"evaluation window of 1024 tokens .* set seqlen \(--seqlen\) to 256 or lower"):
        perplexity_from_ids(model, torch.randint(4, 128, (4096,)), seqlen=1024, progress=False)
    rc = main(["eval", "ppl", str(opt_dir), "--datasets", "wikitext2", "--seqlen", "1024", "--data-dir", str(data_dir)])
    assert rc == 2 and "set seqlen (--seqlen) to 256 or lower" in capsys.readouterr().err
