"""Data sources: the WikiText protocol, seeded calibration windows, self-generated text, errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model

from losa.data import eval_text, get_calibration, load_documents
from losa.errors import LosaError


class CharTok:
    """A character-level tokenizer: token id = byte value (independent of transformers)."""

    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text, return_tensors=None):
        texts = [text] if isinstance(text, str) else text
        ids = torch.tensor([[b % 128 for b in t.encode()] for t in texts])

        class Enc:
            input_ids = ids
            attention_mask = torch.ones_like(ids)
        return Enc


def test_wikitext_rows_follow_hf_layout(data_dir):
    rows = load_documents("wikitext2", "test", data_dir)
    raw = (data_dir / "wikitext-2-raw/wiki.test.raw").read_text()
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n" and rows[2] == ""
    assert len(rows) == raw.count("\n") == 4358
    text = eval_text("wikitext2", data_dir)
    assert text.startswith("\n\n = Robert Boulter = \n" + "\n\n" + "" + "\n\n" + " Robert Boulter is an English film")


def test_ptb_and_c4(data_dir):
    ptb = eval_text("ptb", data_dir)
    assert ptb.startswith("no it was n't black monday but while")
    c4 = load_documents("c4", "train", data_dir)
    assert len(c4) == 1041 and c4[0].startswith("Beginners BBQ Class Taking Place in Missoula!")


def test_calibration_windows_are_seeded_slices(tmp_path):
    text = "".join(chr(97 + (i * 7) % 26) for i in range(500))
    f = tmp_path / "t.txt"
    f.write_text(text)
    a = get_calibration(CharTok(), str(f), nsamples=4, seqlen=32, seed=1)
    b = get_calibration(CharTok(), str(f), nsamples=4, seqlen=32, seed=1)
    c = get_calibration(CharTok(), str(f), nsamples=4, seqlen=32, seed=2)
    assert a.shape == (4, 32) and torch.equal(a, b) and not torch.equal(a, c)
    full = CharTok()(text).input_ids[0]
    for row in a:  # every window is a contiguous slice of the token stream
        assert any(torch.equal(full[s:s + 32], row) for s in range(len(full) - 31))


def test_c4_protocol_windows_inside_one_document(data_dir):
    docs = load_documents("c4", "train", data_dir)
    ids = get_calibration(CharTok(), "c4", nsamples=3, seqlen=64, seed=0, data_dir=data_dir)
    for row in ids:
        s = bytes(row.tolist()).decode("latin-1")
        assert any(s in bytes(b % 128 for b in d.encode()).decode("latin-1") for d in docs)


def test_alpaca_json_as_text(tmp_path):
    f = tmp_path / "a.json"
    f.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "Hi!"}]))
    (doc,) = load_documents(str(f))
    assert "### Instruction:\nSay hi" in doc and doc.endswith("### Response:\nHi!")


def test_self_generated_reproducible():
    from transformers import AutoTokenizer  # noqa: F401 - only to check transformers imports

    model = make_tiny_model("llama", layers=1)

    class Tok(CharTok):
        pass

    a = get_calibration(Tok(), "self", nsamples=3, seqlen=12, seed=5, model=model, progress=False)
    b = get_calibration(Tok(), "self", nsamples=3, seqlen=12, seed=5, model=model, progress=False)
    c = get_calibration(Tok(), "self", nsamples=3, seqlen=12, seed=6, model=model, progress=False)
    assert a.shape == (3, 12) and torch.equal(a, b) and not torch.equal(a, c)


def test_errors(tmp_path, data_dir):
    with pytest.raises(LosaError, match="not found"):
        get_calibration(CharTok(), str(tmp_path / "missing.txt"), 2, 8)
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(LosaError, match="too short for seqlen 64"):
        get_calibration(CharTok(), str(short), 2, 64)
    empty = tmp_path / "empty.txt"  # said as such (it read "has only 1 tokens": the BOS token)
    empty.write_text("")
    with pytest.raises(LosaError, match=r"empty.txt holds no text \(an empty file\?\)"):
        get_calibration(CharTok(), str(empty), 2, 8)
    with pytest.raises(LosaError, match="wiki.train.raw is missing"):
        get_calibration(CharTok(), "wikitext2", 2, 8, data_dir=data_dir)
    with pytest.raises(LosaError, match="does not exist"):
        load_documents("c4", "train", tmp_path / "nodir")


def test_user_calib_ids_are_checked_before_pruning():
    """calib_ids of losa.prune (and losa.run): a 2-D integer tensor of ids in the model's vocabulary."""
    import re

    import losa
    from losa.data.calibration import check_calib_ids

    model = make_tiny_model("llama", layers=1, vocab=128)  # context: 256 positions
    good = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    bad = [
        (good.float(), "got float32 of shape (4, 16)"),
        (good[0], "got int64 of shape (16,)"),
        (good.bool(), "got bool of shape (4, 16)"),
        (good.tolist(), "got list"),
        (good[:0], "calib_ids is empty (shape (0, 16))"),
        (torch.full((4, 16), 128), "token id 128, outside the model's vocabulary [0, 128)"),
        (torch.full((4, 16), -1), "token id -1, outside the model's vocabulary [0, 128)"),
        (torch.zeros(2, 257, dtype=torch.long), "calibration window of 257 tokens exceeds the model's context of 256"),
    ]
    before = [p.detach().clone() for p in model.parameters()]
    for ids, msg in bad:
        with pytest.raises(LosaError, match=re.escape(msg)):
            check_calib_ids(model, ids)
        with pytest.raises(LosaError, match=re.escape(msg)):
            losa.prune(model, None, losa.PruneConfig(method="wanda", sparsity=0.5), calib_ids=ids, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert check_calib_ids(model, None) is None
    same = check_calib_ids(model, good.int())  # any integer dtype, as int64 with the same ids
    assert same.dtype == torch.int64 and torch.equal(same, good)
    assert losa.prune(model, None, losa.PruneConfig(method="wanda", sparsity=0.5), calib_ids=good.int(),
                      progress=False).sparsity.overall == pytest.approx(0.5, abs=0.01)


def test_unreachable_hub_for_a_named_dataset_fails_at_once(monkeypatch):
    """Without a data dir, an unreachable hub used to cost half a minute of printed retries (trial): one quick
    request finds it, then only datasets' cache is read (offline mode) before the failure is reported; a probe
    that got an answer is not repeated; offline mode is not probed."""
    import datasets
    import huggingface_hub

    from losa.data import sources

    monkeypatch.delenv("LOSA_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(sources, "_hub_reached", set())
    probes, loads = [], []

    def unreachable(*a, **k):
        probes.append(a)
        raise ConnectionError("[Errno -2] Name or service not known")

    def load(*a, **k):  # datasets' cache has nothing: it fails in offline mode, and may not go online at all
        loads.append(datasets.config.HF_HUB_OFFLINE)
        raise FileNotFoundError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    monkeypatch.setattr(datasets, "load_dataset", load)
    with pytest.raises(LosaError, match=r"^wikitext2 test: no data_dir \(--data-dir\) / LOSA_DATA_DIR given and the "
                                        r"HF hub failed \(ConnectionError\); pass data_dir"):
        load_documents("wikitext2", "test")
    assert len(probes) == 1 and loads == [True] and datasets.config.HF_HUB_OFFLINE is False
    # cached: the offline read succeeds
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: {"text": ["cached row"]})
    assert load_documents("wikitext2", "test") == ["cached row"]
    # the hub answers: probed once per repo, then the download goes on
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda *a, **k: probes.append(a))
    probes.clear()
    load_documents("wikitext2", "test")
    load_documents("wikitext2", "test")
    assert len(probes) == 1


def test_eval_uses_the_data_dir_a_checkpoint_recorded(tmp_path, monkeypatch, capsys):
    """eval ppl of a losa checkpoint without --data-dir / $LOSA_DATA_DIR reads its named datasets from the data dir
    the checkpoint recorded, only when that directory (absolute, as prune and run now record it) holds them all."""
    import argparse
    import json

    from losa.cli.common import recipe_for_manifest, recorded_data_dir
    from losa.data.sources import NAMED_FILES

    monkeypatch.delenv("LOSA_DATA_DIR", raising=False)
    ckpt, data = tmp_path / "ckpt", tmp_path / "data"
    ckpt.mkdir()
    (data / NAMED_FILES["wikitext2"]["test"]).parent.mkdir(parents=True)
    (data / NAMED_FILES["wikitext2"]["test"]).write_text("x")
    (ckpt / "losa.json").write_text(json.dumps({"recipe": {"data_dir": str(data)}}))

    def resolved(datasets, data_dir=None):
        args = argparse.Namespace(model=str(ckpt), data_dir=data_dir)
        recorded_data_dir(args, datasets)
        return args.data_dir

    assert resolved(["wikitext2"]) == str(data)
    assert capsys.readouterr().err == f"data dir: {data} (recorded in {ckpt}/losa.json; --data-dir overrides)\n"
    assert resolved(["wikitext2", "c4"]) is None  # c4 is not there: the hub, as without a recorded dir
    assert resolved(["notes.txt"]) is None  # a file needs no data dir
    assert resolved(["wikitext2"], "/elsewhere") == "/elsewhere"
    monkeypatch.setenv("LOSA_DATA_DIR", "")  # set, even empty: the user's choice
    assert resolved(["wikitext2"]) is None
    monkeypatch.delenv("LOSA_DATA_DIR")
    (ckpt / "losa.json").write_text(json.dumps({"recipe": {"data_dir": "data"}}))  # relative: unknown base
    monkeypatch.chdir(tmp_path)
    assert resolved(["wikitext2"]) is None
    assert recipe_for_manifest({"data_dir": "data", "seed": 0}) == {"data_dir": str(data), "seed": 0}
