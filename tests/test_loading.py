"""Model loading failures: hub auth / not-found / network errors and broken tokenizers keep their meaning."""

from __future__ import annotations

import pytest
from conftest import make_tiny_model, make_tiny_tokenizer

import losa
from losa.errors import LosaError

httpx2 = pytest.importorskip("httpx2")  # huggingface_hub's HTTP client
from huggingface_hub import errors as hub_errors  # noqa: E402
from huggingface_hub.utils import hf_raise_for_status  # noqa: E402

URL = "https://huggingface.co/org/name/resolve/main/config.json"


def _http_error(status: int, code: str | None) -> Exception:
    """The exception huggingface_hub itself raises for this HTTP answer (no network involved)."""
    headers = {"X-Error-Code": code} if code else {}
    try:
        hf_raise_for_status(httpx2.Response(status, headers=headers, request=httpx2.Request("GET", URL)))
    except Exception as e:  # noqa: BLE001
        return e
    raise AssertionError("hf_raise_for_status did not raise")


def _offline() -> Exception:
    try:
        try:
            raise httpx2.ConnectError("[Errno 111] Connection refused")
        except httpx2.ConnectError as inner:
            raise hub_errors.LocalEntryNotFoundError(
                "An error happened while trying to locate the file on the Hub and we cannot find the requested "
                "files in the local cache.") from inner
    except Exception as e:  # noqa: BLE001
        return e


AUTH = r"refused access to 'org/name'.*log in with `hf auth login`"
MISSING = r"not found for 'org/name'.*check the model name"
NETWORK = r"could not reach the Hugging Face hub for 'org/name'.*check the network.*local model directory"

CASES = {
    "gated": (lambda: _http_error(403, "GatedRepo"), hub_errors.GatedRepoError, AUTH),
    "private-401": (lambda: _http_error(401, "RepoNotFound"), hub_errors.RepositoryNotFoundError, AUTH),
    "repo-404": (lambda: _http_error(404, "RepoNotFound"), hub_errors.RepositoryNotFoundError, MISSING),
    "entry-404": (lambda: _http_error(404, "EntryNotFound"), hub_errors.EntryNotFoundError, MISSING),
    "offline": (_offline, hub_errors.LocalEntryNotFoundError, NETWORK),
    "refused": (lambda: httpx2.ConnectError("[Errno 111] Connection refused"), httpx2.TransportError, NETWORK),
}


@pytest.fixture(autouse=True)
def no_probe(request, monkeypatch):
    """The tests below fake transformers' downloads; the quick hub probe before them is tested on its own."""
    if "probe" not in request.node.name:
        monkeypatch.setattr("losa.models.loading._probe_hub", lambda *a, **k: None)


def _check(exc_info, pattern: str) -> None:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    import re

    assert re.search(pattern, msg), msg
    others = {AUTH, MISSING, NETWORK} - {pattern}
    assert not any(re.search(p, msg) for p in others), msg  # each failure has its own message


@pytest.mark.parametrize("case", [c for c in CASES if c != "entry-404"])
def test_hub_errors_through_transformers(monkeypatch, case):
    """huggingface_hub's own exceptions, raised where transformers downloads, wrapped as transformers wraps them.

    (A missing config.json, entry-404, is turned by transformers into its own ValueError; see the next tests.)"""
    import transformers.utils.hub as th

    make, cls, pattern = CASES[case]
    err = make()
    assert isinstance(err, cls)

    def download(*args, **kwargs):
        raise err

    monkeypatch.setattr(th, "hf_hub_download", download)
    with pytest.raises(LosaError) as exc_info:
        losa.load_model("org/name")
    _check(exc_info, pattern)


def test_a_missing_path_under_a_local_folder_is_named_as_a_path_before_the_hub(monkeypatch, tmp_path):
    """``models/nonexistent`` beside a local ``models/`` folder was reported as a network error only (trial)."""
    from transformers import AutoModelForCausalLM

    def fail(cls, *args, **kwargs):
        raise CASES["refused"][0]()

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(fail))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    with pytest.raises(LosaError, match=r"^model path org/name does not exist \(the folder org/ does\); as a hub "
                                        r"id: could not reach the Hugging Face hub for 'org/name'"):
        losa.load_model("org/name")
    (tmp_path / "org").rmdir()
    with pytest.raises(LosaError, match=r"^could not reach the Hugging Face hub for 'org/name'"):
        losa.load_model("org/name")


@pytest.mark.parametrize("case", list(CASES))
def test_hub_errors_raised_directly_by_the_loaders(monkeypatch, case):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make, _, pattern = CASES[case]

    def fail(cls, *args, **kwargs):
        raise make()

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(fail))
    with pytest.raises(LosaError, match="model weights") as exc_info:
        losa.load_model("org/name")
    _check(exc_info, pattern)
    # the weights download but the tokenizer's download fails the same way
    def weights(cls, *a, **k):
        model = make_tiny_model("llama", layers=1)
        return (model, {"missing_keys": set()}) if k.get("output_loading_info") else model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(weights))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(fail))
    with pytest.raises(LosaError, match="tokenizer") as exc_info:
        losa.load_model("org/name")
    _check(exc_info, pattern)


def test_repo_without_model_config_is_one_line(monkeypatch):
    import transformers.utils.hub as th

    err = CASES["entry-404"][0]()

    def download(*args, **kwargs):
        raise err

    monkeypatch.setattr(th, "hf_hub_download", download)
    with pytest.raises(LosaError, match=r"model 'org/name' is neither a local directory.*nor a reachable hub id") as e:
        losa.load_model("org/name")
    assert "\n" not in str(e.value)


def test_corrupt_tokenizer_is_an_error_and_a_missing_one_is_not(tmp_path):
    model = make_tiny_model("llama", layers=1)
    bad = tmp_path / "bad"
    model.save_pretrained(bad)
    make_tiny_tokenizer().save_pretrained(bad)
    (bad / "tokenizer.json").write_text("{oops")
    with pytest.raises(LosaError) as exc_info:
        losa.load_model(str(bad))
    msg = str(exc_info.value)
    assert "\n" not in msg and str(bad) in msg
    assert "tokenizer" in msg and "failed to load" in msg and "replace its tokenizer files" in msg

    good = tmp_path / "good"  # the same directory with an intact tokenizer loads
    model.save_pretrained(good)
    make_tiny_tokenizer().save_pretrained(good)
    _, tok = losa.load_model(str(good))
    assert tok is not None and tok("word5")["input_ids"] == [9]

    weights_only = tmp_path / "weights-only"  # a checkpoint saved without a tokenizer has none
    model.save_pretrained(weights_only)
    _, tok = losa.load_model(str(weights_only))
    assert tok is None


def test_model_names_that_cannot_load_fail_before_anything_slow(tmp_path, capsys, monkeypatch):
    """A missing path, a directory without config.json and a typo of a built-in alias are one-line errors
    before any network or weights (losa generate prints nothing else first); hub-like names pass the check."""
    from losa.cli import main
    from losa.models.loading import check_model_name

    (tmp_path / "empty").mkdir()
    cases = {str(tmp_path / "nope"): "does not exist; check the path",
             str(tmp_path / "empty"): "directory without config.json",
             "smollm2-135": "did you mean 'smollm2-135m'?",
             "SmolLM2-135M ": "did you mean 'smollm2-135m'?"}
    for name, why in cases.items():
        with pytest.raises(LosaError, match=why.replace("?", r"\?")):
            check_model_name(name)
        assert main(["generate", name, "--prompt", "hi", "--max-new-tokens", "2"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("error: ") and why in err and err.count("\n") == 1
    for ok in ("smollm2-135m", "gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "x.gguf"):
        check_model_name(ok)  # aliases, hub ids (checked by the hub later) and GGUF paths (checked on load)
    # 'runs/nothere' where runs/ is a local directory is a path, not a hub id (the trial got the network hint)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "r" / "model").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "model" / "config.json").write_text("{}")
    (tmp_path / "runs" / "r" / "report.json").write_text("{}")
    (tmp_path / "Qwen" / "other").mkdir(parents=True)  # a local folder named like a hub org: still a hub id
    check_model_name("Qwen/Qwen2.5-0.5B")
    with pytest.raises(LosaError, match=r"^model path runs/nothere does not exist; check the path$"):
        check_model_name("runs/nothere")
    with pytest.raises(LosaError, match=r"^runs/r is a losa run directory; its merged model is runs/r/model$"):
        check_model_name("runs/r")


@pytest.mark.parametrize("case", ["refused", "repo-404", "private-401"])
def test_hub_probe_reports_at_once_before_any_download(monkeypatch, case):
    """An unreachable hub used to take about 50 s of huggingface_hub's retries per load; one quick request
    now reports it (and a missing or refused repo) before transformers downloads anything."""
    import huggingface_hub
    from transformers import AutoModelForCausalLM

    make, _, pattern = CASES[case]
    asked = []

    seen = []

    def info(name, timeout=None, token=None, revision=None):
        asked.append((name, timeout))
        seen.append((token, revision))
        raise make()

    def download(cls, *a, **k):
        raise AssertionError("transformers downloaded after the probe failed")

    monkeypatch.setattr(huggingface_hub, "model_info", info)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(download))
    with pytest.raises(LosaError, match="model config") as exc_info:
        losa.load_model("org/name")
    _check(exc_info, pattern)
    assert asked == [("org/name", 10)]
    # a token and a revision reach the probe; a load from its own cache (or local files only) is not probed
    asked.clear()
    seen.clear()
    with pytest.raises(LosaError):
        losa.load_model("org/name", token="hf_x", revision="v2")
    assert asked == [("org/name", 10)] and seen == [("hf_x", "v2")]
    for kw in ({"local_files_only": True}, {"cache_dir": "/somewhere"}):
        with pytest.raises(AssertionError, match="transformers downloaded"):
            losa.load_model("org/name", **kw)
    assert len(asked) == 1


def test_hub_probe_skipped_offline_and_passes_on_an_answer(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from losa.models.loading import _probe_hub

    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: object())  # the hub answers
    _probe_hub("org/name")

    def unreachable(*a, **k):
        raise httpx2.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _probe_hub("org/name")  # offline mode: transformers reads the cache, nothing is probed
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(LosaError, match="could not reach the Hugging Face hub"):
        _probe_hub("org/name")
    # an answer other than the ones _hub_error names (here a server error) leaves the download to report
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: (_ for _ in ()).throw(_http_error(500, None)))
    _probe_hub("org/name")
    model = make_tiny_model("llama", layers=1)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **k: (model, {"missing_keys": set()})))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(lambda cls, *a, **k: make_tiny_tokenizer()))
    assert losa.load_model("org/name")[0] is model


@pytest.mark.parametrize("name", ["float32", "float", "bfloat16", "float16", "half"])
def test_dtype_names_are_torch_s_own(name):
    """--dtype takes torch's names for its dtypes, 'half' and 'float' included (the trial's --dtype half was
    refused); a non-floating dtype is refused in one line."""
    import torch

    from losa.models.loading import parse_dtype

    assert parse_dtype(name) is getattr(torch, name)
    with pytest.raises(LosaError, match=r"^unknown dtype 'float64'; use one of float32, fp32, float, bfloat16"):
        parse_dtype("float64")
