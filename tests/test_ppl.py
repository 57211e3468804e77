"""Perplexity protocol against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

from losa.errors import LosaError
from losa.eval.ppl import perplexity, perplexity_from_ids


def test_ppl_hand_computation():
    model = make_tiny_model("llama", layers=1)
    ids = torch.randint(3, 128, (23,), generator=torch.Generator().manual_seed(4))
    seqlen = 5  # 4 full windows, 3 tokens dropped
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(4):
            win = ids[w * seqlen:(w + 1) * seqlen]
            logp = torch.log_softmax(model(win[None]).logits[0].double(), -1)
            for t in range(seqlen - 1):
                total -= float(logp[t, win[t + 1]])
                count += 1
    res = perplexity_from_ids(model, ids, seqlen=seqlen, batch_size=3, progress=False)
    assert res.windows == 4 and res.tokens == count == 16
    assert math.isclose(res.ppl, math.exp(total / count), rel_tol=1e-5)
    res2 = perplexity_from_ids(model, ids, seqlen=seqlen, max_windows=2, progress=False)
    assert res2.windows == 2 and res2.tokens == 8


def test_batch_size_below_one_is_a_clear_error(tmp_path, capsys):
    import pytest

    from losa.cli import main
    from losa.errors import LosaError

    model = make_tiny_model("llama", layers=1)
    ids = torch.randint(3, 128, (23,), generator=torch.Generator().manual_seed(4))
    for bad in (0, -1):  # range() refused 0; -1 evaluated nothing and divided by zero
        with pytest.raises(LosaError, match=rf"got {bad}; set batch_size \(--batch-size\) to 1 or more"):
            perplexity_from_ids(model, ids, seqlen=5, batch_size=bad, progress=False)
        # the CLI refuses it before loading the model (the model path does not exist)
        assert main(["eval", "ppl", str(tmp_path / "missing"), "--batch-size", str(bad)]) == 2
        assert capsys.readouterr().err == f"error: --batch-size {bad} must be at least 1\n"


def test_max_windows_below_one_is_a_clear_error(tmp_path):
    model = make_tiny_model("llama", layers=1)
    ids = torch.randint(3, 128, (23,), generator=torch.Generator().manual_seed(4))
    for bad in (0, -1):  # used to report "fewer tokens than one window", which is not the problem
        with pytest.raises(LosaError, match=f"max_windows must be at least 1, got {bad}; pass None"):
            perplexity_from_ids(model, ids, seqlen=5, max_windows=bad, progress=False)
        # checked before the text is read: the file does not exist
        with pytest.raises(LosaError, match=f"max_windows must be at least 1, got {bad}"):
            perplexity(model, make_tiny_tokenizer(), str(tmp_path / "missing.txt"), seqlen=5, max_windows=bad,
                       progress=False)
    assert perplexity_from_ids(model, ids, seqlen=5, max_windows=1, progress=False).windows == 1
