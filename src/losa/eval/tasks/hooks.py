"""Functions that the offline task YAMLs reference with ``!function``.

``custom_dataset`` loaders build a one-split ``datasets.DatasetDict`` from the local files; lm-eval
calls them with the task metadata as keyword arguments, which carry ``data_dir``. The prompt
helpers of WinoGrande and HellaSwag are lm-eval's own, re-exported so prompts stay identical.
"""

from __future__ import annotations

from typing import Any

import datasets
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice as winogrande_doc_to_choice
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_target as winogrande_doc_to_target
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_text as winogrande_doc_to_text

from losa.eval.converters import TASK_SOURCES, load_task_records

# re-exported for the YAML files (``!function losa.eval.tasks.hooks.<name>``); keep them listed here
__all__ = ["hellaswag_process_docs", "winogrande_doc_to_choice", "winogrande_doc_to_target",
           "winogrande_doc_to_text", "local_dataset", "boolq", "rte", "hellaswag", "winogrande", "arc_easy",
           "arc_challenge", "openbookqa", "piqa"]


def local_dataset(task: str, data_dir: str | None = None) -> datasets.DatasetDict:
    """The converted records of ``task`` as the single split lm-eval evaluates."""
    records = load_task_records(task, data_dir)
    return datasets.DatasetDict({TASK_SOURCES[task].split: datasets.Dataset.from_list(records)})


def boolq(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return local_dataset("boolq", data_dir)


def rte(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return local_dataset("rte", data_dir)


def hellaswag(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return local_dataset("hellaswag", data_dir)


def winogrande(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return local_dataset("winogrande", data_dir)


def arc_easy(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return local_dataset("arc_easy", data_dir)


def arc_challenge(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return local_dataset("arc_challenge", data_dir)


def openbookqa(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return local_dataset("openbookqa", data_dir)


def piqa(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    return local_dataset("piqa", data_dir)
