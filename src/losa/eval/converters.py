"""Turn the offline benchmark files into records in the field layout of lm-eval's own datasets.

Each ``convert_*`` function reads the file(s) of one task and returns a list of dicts shaped like a
row of the Hugging Face dataset that lm-eval's built-in task loads (e.g. PIQA rows are
``{"goal", "sol1", "sol2", "label"}`` as in ``baber/piqa``), so that lm-eval's own prompt templates and
scoring apply unchanged. They have no side effects. :func:`load_task_records` finds the files of a
task under a data directory (layout: ``/work/shared/data/README.md``) and raises :class:`LosaError`
naming the missing file and the directory it looked in.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from losa.errors import LosaError, option

Record = dict[str, Any]


def _read_jsonl(path: Path) -> list[Record]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_labels(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _check_aligned(items: list, labels: list, items_path: Path, labels_path: Path) -> None:
    if len(items) != len(labels):
        raise LosaError(f"{labels_path} has {len(labels)} labels but {items_path} has {len(items)} items; "
                        "use the matching pair of files")


def convert_piqa(items_path: Path, labels_path: Path) -> list[Record]:
    """PIQA ``valid.jsonl`` + line-aligned ``valid-labels.lst`` -> ``{goal, sol1, sol2, label:int}``."""
    items, labels = _read_jsonl(items_path), _read_labels(labels_path)
    _check_aligned(items, labels, items_path, labels_path)
    return [{"goal": it["goal"], "sol1": it["sol1"], "sol2": it["sol2"], "label": int(lab)}
            for it, lab in zip(items, labels)]


def convert_winogrande(items_path: Path, labels_path: Path) -> list[Record]:
    """WinoGrande ``dev.jsonl`` + ``dev-labels.lst`` -> ``{sentence, option1, option2, answer:"1"|"2"}``.

    The labels file is authoritative; an ``answer`` already in the jsonl must agree with it.
    """
    items, labels = _read_jsonl(items_path), _read_labels(labels_path)
    _check_aligned(items, labels, items_path, labels_path)
    out = []
    for i, (it, lab) in enumerate(zip(items, labels)):
        if lab not in ("1", "2"):
            raise LosaError(f"{labels_path} line {i + 1}: label {lab!r} is not 1 or 2; use the original file")
        if it.get("answer") not in (None, "", lab):
            raise LosaError(f"{items_path} item {i} answer {it['answer']!r} disagrees with {labels_path} ({lab!r}); "
                            "use the matching pair of files")
        out.append({"sentence": it["sentence"], "option1": it["option1"], "option2": it["option2"],
                    "answer": lab})
    return out


def convert_arc(path: Path) -> list[Record]:
    """ARC original jsonl -> ``{id, question, choices: {text, label}, answerKey}`` (``allenai/ai2_arc``)."""
    out = []
    for it in _read_jsonl(path):
        q = it["question"]
        out.append({"id": it["id"], "question": q["stem"],
                    "choices": {"text": [c["text"] for c in q["choices"]],
                                "label": [c["label"] for c in q["choices"]]},
                    "answerKey": it["answerKey"]})
    return out


def convert_boolq(path: Path) -> list[Record]:
    """BoolQ SuperGLUE jsonl (label ``true``/``false``) -> ``{question, passage, idx, label:0|1}`` (1 = yes)."""
    out = []
    for it in _read_jsonl(path):
        label = it["label"]
        if isinstance(label, str):
            if label.lower() not in ("true", "false"):
                raise LosaError(f"{path}: BoolQ label {label!r} is not true/false; use the SuperGLUE val.jsonl")
            label = label.lower() == "true"
        out.append({"question": it["question"], "passage": it["passage"], "idx": it["idx"], "label": int(label)})
    return out


_RTE_LABELS = {"entailment": 0, "not_entailment": 1}


def convert_rte(path: Path) -> list[Record]:
    """RTE SuperGLUE jsonl -> GLUE layout ``{sentence1, sentence2, label, idx}`` with 0 = entailment."""
    out = []
    for it in _read_jsonl(path):
        label = it["label"]
        if isinstance(label, str):
            if label not in _RTE_LABELS:
                raise LosaError(f"{path}: RTE label {label!r} is not entailment/not_entailment; use the SuperGLUE val.jsonl")
            label = _RTE_LABELS[label]
        out.append({"sentence1": it["premise"], "sentence2": it["hypothesis"], "label": int(label),
                    "idx": it["idx"]})
    return out


_OBQA_CHOICE = re.compile(r"\(([A-Z])\) ")


def parse_obqa_choices(text: str) -> tuple[list[str], list[str]]:
    """``"(A) x (B) y (C) z (D) w"`` -> (texts, labels); the labels must run A, B, C, ... in order."""
    parts = _OBQA_CHOICE.split(text.strip())
    if parts[0].strip() or len(parts) < 5:
        raise ValueError(f"not an OpenBookQA choice list: {text[:80]!r}")
    labels, texts = parts[1::2], [t.strip() for t in parts[2::2]]
    if labels != [chr(ord("A") + i) for i in range(len(labels))]:
        raise ValueError(f"OpenBookQA choice labels out of order {labels}: {text[:80]!r}")
    return texts, labels


def convert_openbookqa(path: Path) -> list[Record]:
    """OpenBookQA ``test.tsv`` -> ``{id, question_stem, choices: {text, label}, answerKey}`` (``allenai/openbookqa``)."""
    with open(path, encoding="utf-8") as f:
        rows = [line.rstrip("\r\n").split("\t") for line in f if line.strip()]
    header = rows[0]
    try:
        col = {name: header.index(name) for name in ("ID", "Question Stem", "Choices", "Answer Key")}
    except ValueError:
        raise LosaError(f"{path}: header {header} lacks ID/Question Stem/Choices/Answer Key; "
                        "use the original OpenBookQA Main TSV") from None
    out = []
    for n, row in enumerate(rows[1:], start=2):
        try:
            texts, labels = parse_obqa_choices(row[col["Choices"]])
        except (ValueError, IndexError) as e:
            raise LosaError(f"{path} line {n}: {e}; use the original OpenBookQA Main TSV") from None
        out.append({"id": row[col["ID"]], "question_stem": row[col["Question Stem"]],
                    "choices": {"text": texts, "label": labels}, "answerKey": row[col["Answer Key"]].strip()})
    return out


_SENTENCE_END = re.compile(r"[.!?] ")


def split_hellaswag_context(ctx: str) -> tuple[str, str]:
    """Recover (ctx_a, ctx_b) from HellaSwag's joined context ``ctx_a + " " + ctx_b``.

    The derived file keeps only the joined text. In the original data ``ctx_b`` is the unfinished
    sentence that the endings complete; it starts in lower case (lm-eval capitalises it). We take it
    to be the text after the last sentence end (". ", "! ", "? ") when that text starts with a
    lower-case letter, and empty otherwise (WikiHow items, whose ``ctx_b`` is usually empty).
    """
    ends = list(_SENTENCE_END.finditer(ctx))
    cut = ends[-1].end() if ends else 0
    tail = ctx[cut:]
    if tail[:1].islower():
        return ctx[:cut].rstrip(), tail
    return ctx, ""


def convert_hellaswag(path: Path) -> list[Record]:
    """HellaSwag derived 6-line text layout -> ``{activity_label, ctx_a, ctx_b, ctx, endings, label:str}``.

    Each item is ``activity_label + ": " + ctx``, the gold index, then the four endings
    (``Rowan/hellaswag`` layout; see :func:`split_hellaswag_context` for the ``ctx_b`` heuristic).
    """
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\r\n") for line in f]
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) % 6:
        raise LosaError(f"{path} has {len(lines)} lines, not a multiple of 6; use hellaswag_val_full.txt")
    out = []
    for i in range(0, len(lines), 6):
        head, gold, endings = lines[i], lines[i + 1].strip(), lines[i + 2:i + 6]
        label, sep, ctx = head.partition(": ")
        if not sep or gold not in ("0", "1", "2", "3"):
            raise LosaError(f"{path} line {i + 1}: not an 'activity: context' + gold 0-3 item; "
                            "use hellaswag_val_full.txt")
        ctx_a, ctx_b = split_hellaswag_context(ctx)
        out.append({"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
                    "endings": endings, "label": gold})
    return out


@dataclass(frozen=True)
class TaskSource:
    """Where a task's files live under the data directory and how to convert them."""

    files: tuple[str, ...]
    convert: Callable[..., list[Record]]
    split: str  # the split name lm-eval's task evaluates (validation or test)


TASK_SOURCES: dict[str, TaskSource] = {
    "boolq": TaskSource(("boolq/val.jsonl",), convert_boolq, "validation"),
    "rte": TaskSource(("rte/val.jsonl",), convert_rte, "validation"),
    "hellaswag": TaskSource(("hellaswag/hellaswag_val_full.txt",), convert_hellaswag, "validation"),
    "winogrande": TaskSource(("winogrande/dev.jsonl", "winogrande/dev-labels.lst"), convert_winogrande,
                             "validation"),
    "arc_easy": TaskSource(("arc/ARC-Easy-Test.jsonl",), convert_arc, "test"),
    "arc_challenge": TaskSource(("arc/ARC-Challenge-Test.jsonl",), convert_arc, "test"),
    "openbookqa": TaskSource(("openbookqa/test.tsv",), convert_openbookqa, "test"),
    "piqa": TaskSource(("piqa/valid.jsonl", "piqa/valid-labels.lst"), convert_piqa, "validation"),
}


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir`` if given, else ``$LOSA_DATA_DIR``; raises if neither names a directory."""
    if data_dir is None:
        data_dir = os.environ.get("LOSA_DATA_DIR")
        if not data_dir:
            raise LosaError(f"no offline data directory; pass {option('data_dir')} or set LOSA_DATA_DIR")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise LosaError(f"data directory {path} does not exist; pass {option('data_dir')} or set LOSA_DATA_DIR")
    return path


def task_files(task: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """The files behind ``task``; a missing one raises naming the file and where it was looked for."""
    if task not in TASK_SOURCES:
        raise LosaError(f"no offline data for task {task!r}; offline tasks are {', '.join(TASK_SOURCES)}")
    root = resolve_data_dir(data_dir)
    paths = [root / rel for rel in TASK_SOURCES[task].files]
    for rel, p in zip(TASK_SOURCES[task].files, paths):
        if not p.is_file():
            raise LosaError(f"task {task}: file {rel} not found in data directory {root} (looked for {p}); "
                            f"put it there or point {option('data_dir')} / LOSA_DATA_DIR at the right directory")
    return paths


def load_task_records(task: str, data_dir: str | os.PathLike | None) -> list[Record]:
    """All records of ``task`` from the offline data directory, in lm-eval's field layout."""
    return TASK_SOURCES[task].convert(*task_files(task, data_dir))
