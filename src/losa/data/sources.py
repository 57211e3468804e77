"""Named datasets (wikitext2, c4, ptb) from a local directory or the HF hub, and local text files.

Local layout (as in ``shared/data``): ``wikitext-2-raw/wiki.{train,valid,test}.raw``,
``c4/c4_{train,validation}_part0.jsonl``, ``ptb/ptb.{train,valid,test}.txt``. The directory comes
from ``data_dir``, else ``$LOSA_DATA_DIR``. Only when neither is set does losa try the HF hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from losa.errors import LosaError, option

NAMED_FILES: dict[str, dict[str, str]] = {
    "wikitext2": {
        "train": "wikitext-2-raw/wiki.train.raw",
        "validation": "wikitext-2-raw/wiki.valid.raw",
        "test": "wikitext-2-raw/wiki.test.raw",
    },
    "c4": {"train": "c4/c4_train_part0.jsonl", "validation": "c4/c4_validation_part0.jsonl"},
    "ptb": {"train": "ptb/ptb.train.txt", "validation": "ptb/ptb.valid.txt", "test": "ptb/ptb.test.txt"},
}
#: the split each dataset is evaluated on (C4 has no public test split)
EVAL_SPLIT = {"wikitext2": "test", "c4": "validation", "ptb": "test"}
_SPLIT_ALIASES = {"valid": "validation", "val": "validation"}


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    d = data_dir if data_dir is not None else os.environ.get("LOSA_DATA_DIR")
    if d is None or d == "":
        return None
    p = Path(d).expanduser()
    if not p.is_dir():
        raise LosaError(f"data directory {p} does not exist; fix {option('data_dir')} / LOSA_DATA_DIR")
    return p


def is_named(source: str) -> bool:
    return source in NAMED_FILES


def _wikitext_rows(raw: str) -> list[str]:
    """Rows as in HF ``wikitext-2-raw-v1``: one per line, newline kept, blank lines as ''."""
    return ["" if line.strip() == "" else line for line in raw.splitlines(keepends=True)]


def _read_local(source: str, split: str, path: Path) -> list[str]:
    if source == "wikitext2":
        return _wikitext_rows(path.read_text(encoding="utf-8"))
    if source == "ptb":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return read_text_file(path)


#: the hub dataset repos of the named datasets
_HUB_REPOS = {"wikitext2": "wikitext", "ptb": "ptb_text_only", "c4": "allenai/c4"}
_hub_reached: set[str] = set()  # repos whose probe got an answer in this process: not probed again


def _unreachable(source: str) -> BaseException | None:
    """One quick request (a file's metadata) before ``datasets`` downloads: the network failure when the hub
    cannot be reached (``datasets`` and huggingface_hub would retry every request with backoff, printing each
    retry, for half a minute and more), else None. Offline mode and repos already reached are not probed."""
    import datasets
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    from losa.models.loading import hub_unreachable

    repo = _HUB_REPOS[source]
    if datasets.config.HF_HUB_OFFLINE or repo in _hub_reached:
        return None
    try:
        get_hf_file_metadata(hf_hub_url(repo, "README.md", repo_type="dataset"), timeout=10)
    except Exception as e:  # noqa: BLE001 - only an unreachable hub matters here; the download reports the rest
        if hub_unreachable(e) is not None:
            return e
    _hub_reached.add(repo)
    return None


def _load_hub(source: str, split: str) -> list[str]:
    from datasets import load_dataset

    if source == "wikitext2":
        return list(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
    if source == "ptb":
        return list(load_dataset("ptb_text_only", "penn_treebank", split=split)["sentence"])
    files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
    return list(load_dataset("allenai/c4", data_files={split: files[split]}, split=split)["text"])


def _read_hub(source: str, split: str) -> list[str]:
    """A named dataset split from the hub; when the hub cannot be reached, from ``datasets``' cache (offline
    mode) if it has it, else the network failure is raised at once."""
    import datasets

    err = _unreachable(source)
    if err is None:
        return _load_hub(source, split)
    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True  # what HF_DATASETS_OFFLINE=1 does: read a cached download
    try:
        return _load_hub(source, split)
    except Exception:  # noqa: BLE001 - not cached: the hub's failure is the one to report
        raise err from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline


def load_documents(source: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> list[str]:
    """Rows/documents of a named dataset split, or of a local ``.txt``/``.json``/``.jsonl`` file."""
    split = _SPLIT_ALIASES.get(split, split)
    if not is_named(source):
        return read_text_file(Path(source))
    files = NAMED_FILES[source]
    if split not in files:
        raise LosaError(f"{source} has no {split!r} split; available: {', '.join(files)}")
    root = resolve_data_dir(data_dir)
    if root is not None:
        path = root / files[split]
        if not path.is_file():
            raise LosaError(f"{source} {split} split not found: {path} is missing; put the file there or "
                            f"point {option('data_dir')} / LOSA_DATA_DIR at a directory that has it")
        return _read_local(source, split, path)
    try:
        return _read_hub(source, split)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear line
        raise LosaError(f"{source} {split}: no {option('data_dir')} / LOSA_DATA_DIR given and the HF hub failed "
                        f"({type(e).__name__}); pass {option('data_dir')} with a local copy") from None


def join_for_eval(source: str, docs: list[str]) -> str:
    """The standard evaluation text: WikiText rows joined by blank lines, C4/PTB by spaces."""
    if source == "wikitext2":
        return "\n\n".join(docs)
    return " ".join(docs)


def eval_text(source: str, data_dir: str | os.PathLike | None = None, split: str | None = None) -> str:
    """The evaluation text of a dataset (its standard split) or of a local file."""
    if is_named(source):
        return join_for_eval(source, load_documents(source, split or EVAL_SPLIT[source], data_dir))
    return "\n\n".join(read_text_file(Path(source)))


def format_alpaca(rec: dict) -> tuple[str, str]:
    """(prompt, response) of an Alpaca record (instruction, optional input, output)."""
    instr, inp = rec.get("instruction", ""), rec.get("input", "")
    if inp:
        prompt = (f"Below is an instruction that describes a task, paired with an input that provides further "
                  f"context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                  f"{instr}\n\n### Input:\n{inp}\n\n### Response:\n")
    else:
        prompt = (f"Below is an instruction that describes a task. Write a response that appropriately completes "
                  f"the request.\n\n### Instruction:\n{instr}\n\n### Response:\n")
    return prompt, str(rec.get("output", ""))


def _record_text(rec: object, path: Path) -> str:
    if isinstance(rec, str):
        return rec
    if isinstance(rec, dict):
        if "text" in rec:
            return str(rec["text"])
        if "instruction" in rec and "output" in rec:
            prompt, resp = format_alpaca(rec)
            return prompt + resp
    raise LosaError(f"{path}: records need a 'text' field or Alpaca 'instruction'/'output' fields")


def read_records(path: Path) -> list:
    """Raw records of a ``.json`` (list, or {'data': list}) or ``.jsonl`` file."""
    if not path.is_file():
        raise LosaError(f"data file {path} not found; check the path")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LosaError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise LosaError(f"{path}: expected a JSON list of records")
    return obj


#: local files read as one document each, and as one document per record
TEXT_SUFFIXES = (".txt", ".raw", ".md", "")
RECORD_SUFFIXES = (".json", ".jsonl")


def read_text_file(path: Path) -> list[str]:
    """Documents of a local file: ``.txt`` is one document; ``.json``/``.jsonl`` one per record."""
    path = Path(path)
    if not path.is_file():
        raise LosaError(f"data file {path} not found; name wikitext2, c4 or ptb (calibration also takes self) or "
                        "an existing .txt/.json/.jsonl file")
    if path.suffix in RECORD_SUFFIXES:
        return [_record_text(r, path) for r in read_records(path)]
    if path.suffix in TEXT_SUFFIXES:
        return [path.read_text(encoding="utf-8")]
    raise LosaError(f"unsupported data file type {path.suffix!r} for {path}; use .txt, .json or .jsonl")


def check_eval_datasets(datasets: list[str], data_dir: str | None, flag: str) -> None:
    """Check perplexity datasets before any work: a named one (wikitext2, c4, ptb) is in the data dir
    when there is one (without, :func:`fetch_eval_datasets` gets it from the hub once the local checks have passed),
    a path is a readable text file.

    Args:
        datasets: names or file paths.
        data_dir: the data directory (None: ``LOSA_DATA_DIR`` or none).
        flag: the option or argument that named them, for the message (``--eval``, ``step_eval.datasets``).
    Raises:
        LosaError: a named dataset missing from the data dir, a missing file, or a file type that
            ``losa.data.sources.read_text_file`` does not read.
    """
    root = resolve_data_dir(data_dir)
    for d in datasets:
        if is_named(d):
            path = root / NAMED_FILES[d][EVAL_SPLIT[d]] if root is not None else None
            if path is not None and not path.is_file():
                raise LosaError(f"{flag} {d}: {path} is missing; put the file there, point {option('data_dir')} "
                                f"at a directory that has it, or drop it from {flag}")
        elif not Path(d).is_file():
            raise LosaError(f"{flag} {d}: no such file, and not wikitext2, c4 or ptb; check the name or path")
        elif Path(d).suffix not in TEXT_SUFFIXES + RECORD_SUFFIXES:  # what read_text_file reads
            raise LosaError(f"{flag} {d}: unsupported file type {Path(d).suffix!r}; use .txt, .json or .jsonl")



_fetched: set[str] = set()  # named eval datasets fetched from the hub by this process


def fetch_eval_datasets(datasets: list[str], data_dir: str | None, flag: str) -> None:
    """Without a data dir, fetch the named perplexity datasets from the hub now (``datasets`` caches them for the
    evaluation), so that an unreachable hub fails before a model is pruned or trained, not after.

    Args:
        datasets: names or file paths (the files are checked by :func:`check_eval_datasets`).
        data_dir: the data directory (None: ``LOSA_DATA_DIR`` or none; with one, nothing is fetched).
        flag: the option that named them, for the message.
    Raises:
        LosaError: a named dataset the hub (or ``datasets``' cache) cannot give.
    """
    if resolve_data_dir(data_dir) is not None:
        return
    for d in datasets:
        if is_named(d) and d not in _fetched:  # losa run fetches, then its StepEval.check: once per process
            try:
                load_documents(d, EVAL_SPLIT[d])
            except LosaError as e:
                raise LosaError(f"{flag} {e}") from None
            _fetched.add(d)
