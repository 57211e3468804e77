"""Zero-shot accuracy through lm-evaluation-harness, on an in-memory model.

The model is wrapped in lm-eval's ``HFLM`` and scored by ``lm_eval.simple_evaluate``; losa adds no
scoring of its own. Where the data come from:

* offline (losa's YAML tasks in :mod:`losa.eval.tasks`, fed from ``--data-dir`` / ``$LOSA_DATA_DIR``
  by :mod:`losa.eval.converters`, with prompts identical to lm-eval's tasks of the same names);
* online (lm-eval's own tasks, datasets from the Hugging Face hub).

``limit`` picks, per task, a fixed random subset of ``limit`` documents drawn with ``seed``
(``random.Random(f"{seed}:{task}").sample``, sorted) and passes it as lm-eval's ``samples=``; lm-eval's own
``limit`` would take the first N documents, which for sorted files (ARC, RTE) is a biased slice.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from losa.errors import NO_TOKENIZER_FIX, LosaError, option
from losa.eval.converters import TASK_SOURCES, resolve_data_dir, task_files

#: The tasks of the LoSA / Wanda / SparseGPT tables (plus PIQA), in the papers' column order.
DEFAULT_TASKS: tuple[str, ...] = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                                  "openbookqa", "piqa")

_TQDM_DISABLE_POS = 10  # index of ``disable`` among tqdm.__init__'s positional parameters


@contextlib.contextmanager
def progress_disabled(disabled: bool = True) -> Iterator[None]:
    """Within the block, lm-eval logs warnings and errors only (its INFO lines, one per task and phase, are noise
    beside the progress bars), and with ``disabled`` every tqdm bar (lm-eval, datasets, transformers) is created
    disabled and lm-eval logs errors only."""
    import tqdm.std

    original = tqdm.std.tqdm.__init__

    @functools.wraps(original)
    def quiet_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if len(args) > _TQDM_DISABLE_POS:
            args = (*args[:_TQDM_DISABLE_POS], True, *args[_TQDM_DISABLE_POS + 1:])
        else:
            kwargs["disable"] = True
        original(self, *args, **kwargs)

    lm_log = logging.getLogger("lm_eval")
    old_level = lm_log.level
    if disabled:
        tqdm.std.tqdm.__init__ = quiet_init
    lm_log.setLevel(logging.ERROR if disabled else logging.WARNING)
    handlers = [h for h in logging.getLogger().handlers] + list(lm_log.handlers)
    for h in handlers:
        h.addFilter(_drop_integration_warnings)
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__ = original
        lm_log.setLevel(old_level)
        for h in handlers:
            h.removeFilter(_drop_integration_warnings)


#: lm-eval warnings about how losa drives it (its own task files, a model object), never the user's to act on
_INTEGRATION_WARNINGS = ("Custom kwargs can be passed to `--metadata`", "`pretrained` model kwarg is not of type")


def _drop_integration_warnings(record: logging.LogRecord) -> bool:
    return not (record.name.startswith("lm_eval") and any(w in record.getMessage() for w in _INTEGRATION_WARNINGS))


@contextlib.contextmanager
def no_git_probe() -> Iterator[None]:
    """Within the block, lm-eval does not run ``git describe`` for its results' ``git_hash`` (losa drops that
    field; outside a git checkout git printed ``fatal: not a git repository`` on stderr, even with --quiet)."""
    import lm_eval.evaluator as evaluator

    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is None:  # another lm-eval version: nothing to silence here
        yield
        return
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """``"boolq,rte"`` or a list -> task names (``"all"`` = :data:`DEFAULT_TASKS`), duplicates removed."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        names = list(DEFAULT_TASKS)
    if not names:
        raise LosaError(f"no zero-shot tasks given; pass {option('tasks')}, e.g. piqa,arc_easy or all")
    return list(dict.fromkeys(names))


def use_local_tasks(offline: bool | Literal["auto"], data_dir: str | os.PathLike | None) -> bool:
    """``"auto"``: local files when a data directory is given (argument or ``$LOSA_DATA_DIR``) or the
    hub is marked offline (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``); otherwise lm-eval's own tasks."""
    if offline != "auto":
        return bool(offline)
    flags = (os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return data_dir is not None or bool(os.environ.get("LOSA_DATA_DIR")) or any(flags)


def check_local_tasks(tasks: Sequence[str], data_dir: str | os.PathLike | None) -> Path:
    """Raise unless every task has an offline version with all its files; returns the data directory."""
    unknown = [t for t in tasks if t not in TASK_SOURCES]
    if unknown:
        raise LosaError(f"no offline version of task(s) {', '.join(unknown)}; offline tasks are "
                        f"{', '.join(TASK_SOURCES)} (use {option('offline=False', '--online')} for other lm-eval "
                        "tasks)")
    root = resolve_data_dir(data_dir)
    for t in tasks:
        task_files(t, root)
    return root


def build_task_manager(local: bool, data_dir: str | os.PathLike | None, tasks: Sequence[str]):
    """A TaskManager over losa's offline YAMLs (after checking every task's files) or lm-eval's own."""
    from lm_eval.tasks import TaskManager

    if not local:
        return TaskManager()
    from losa.eval.tasks import TASKS_DIR

    root = check_local_tasks(tasks, data_dir)
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(root)})


def _load_tasks(tm, names: Sequence[str]) -> dict[str, Any]:
    """``tm.load(names)["tasks"]``; a hub that cannot be reached (lm-eval's tasks download their datasets
    here) is one line naming the fix."""
    from losa.models.loading import hub_unreachable

    try:
        return tm.load(names)["tasks"]
    except Exception as e:
        cause = hub_unreachable(e)
        if cause is None:
            raise
        raise LosaError(f"could not download the datasets of task(s) {', '.join(names)} from the Hugging Face hub "
                        f"({type(cause).__name__}); use {option('offline=True', '--offline')} with "
                        f"{option('data_dir', '--data-dir DIR')} (local task files) or check the network (and "
                        "HF_HUB_OFFLINE)") from None


def seeded_subset(n_docs: int, limit: int | None, seed: int, task: str) -> list[int] | None:
    """Sorted indices of a ``limit``-sized random subset of ``range(n_docs)``; None = all documents.

    Drawn by ``random.Random(f"{seed}:{task}")`` so that each task gets its own fixed subset.
    """
    if limit is not None and limit < 1:
        raise LosaError(f"{option('limit')} must be a positive number of documents, got {limit}")
    if limit is None or limit >= n_docs:
        return None
    return sorted(random.Random(f"{seed}:{task}").sample(range(n_docs), limit))


def _metric(task_result: dict[str, Any], name: str) -> float | None:
    value = task_result.get(f"{name},none")
    return float(value) if isinstance(value, (int, float)) else None


def summarize(lm_results: dict[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """Per-task acc / acc_norm (lm-eval's values) and their means over tasks.

    ``mean.acc`` averages acc over all tasks; ``mean.acc_norm`` averages acc_norm where lm-eval
    defines it and acc elsewhere (BoolQ, RTE, WinoGrande), the usual mixed convention.
    """
    per_task: dict[str, dict[str, Any]] = {}
    for t in tasks:
        r = lm_results["results"][t]
        per_task[t] = {"acc": _metric(r, "acc"), "acc_stderr": _metric(r, "acc_stderr"),
                       "acc_norm": _metric(r, "acc_norm"), "acc_norm_stderr": _metric(r, "acc_norm_stderr"),
                       "n": int(lm_results.get("n-samples", {}).get(t, {}).get("effective", 0))}
    return {"tasks": per_task, "mean": task_mean(per_task)}


def task_mean(per_task: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Means over tasks of per-task scores (``{task: {"acc", "acc_norm", ...}}``, as :func:`summarize` gives).

    Returns:
        ``{"acc": mean acc over tasks, "acc_norm": mean of acc_norm where defined, else acc}``; None when no
        task has the score.
    """
    accs = [v["acc"] for v in per_task.values() if v["acc"] is not None]
    mixed = [v["acc_norm"] if v["acc_norm"] is not None else v["acc"] for v in per_task.values()]
    mixed = [m for m in mixed if m is not None]
    return {"acc": sum(accs) / len(accs) if accs else None, "acc_norm": sum(mixed) / len(mixed) if mixed else None}


def run_zeroshot(model, tokenizer, tasks: Sequence[str] | str = DEFAULT_TASKS, limit: int | None = None,
                 data_dir: str | os.PathLike | None = None, batch_size: int = 8, seed: int = 0,
                 offline: bool | Literal["auto"] = "auto", quiet: bool = False,
                 max_length: int | None = None) -> dict[str, Any]:
    """Zero-shot evaluate an in-memory causal LM with lm-eval; returns per-task scores, mean, config.

    Result: ``{"tasks": {name: {acc, acc_stderr, acc_norm, acc_norm_stderr, n}}, "mean": {acc,
    acc_norm}, "config": {...}}``; ``acc_norm`` is None where lm-eval does not define it.
    """
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    names = parse_tasks(tasks)
    if tokenizer is None:
        raise LosaError(f"zero-shot evaluation needs a tokenizer, and {NO_TOKENIZER_FIX}")
    if batch_size < 1:
        raise LosaError(f"{option('batch_size')} must be >= 1, got {batch_size}")
    local = use_local_tasks(offline, data_dir)
    start = time.perf_counter()
    with progress_disabled(quiet), no_git_probe():
        tm = build_task_manager(local, data_dir, names)
        loaded = _load_tasks(tm, names)
        missing = [t for t in names if t not in loaded]
        if missing:
            raise LosaError(f"lm-eval did not load task(s) {', '.join(missing)}; check the task names")
        subsets = {t: seeded_subset(len(loaded[t].eval_docs), limit, seed, t) for t in names}
        samples = {t: idx for t, idx in subsets.items() if idx is not None} or None
        # log-softmax in float32 even for half-precision weights, so close choices are ranked reliably
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                  softmax_dtype=torch.float32)
        out = lm_eval.simple_evaluate(model=lm, tasks=[loaded[t] for t in names], samples=samples,
                                      task_manager=tm, num_fewshot=0, log_samples=False, bootstrap_iters=1000,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed)
    result = summarize(out, names)
    result["config"] = {
        "tasks": names, "limit": limit, "seed": seed, "batch_size": batch_size,
        "subset": "full" if samples is None else f"seeded random subset per task (random.Random('{seed}:<task>').sample, sorted)",
        "subset_indices": subsets,
        "source": "local files" if local else "lm-eval hub datasets",
        "data_dir": str(resolve_data_dir(data_dir)) if local else None,
        "lm_eval_version": lm_eval.__version__, "wall_time_s": round(time.perf_counter() - start, 2),
        "model": str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__),
    }
    return result


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of a :func:`run_zeroshot` result (acc, acc_norm, n per task, then the mean; a footnote names
    the tasks whose acc the acc_norm mean takes because lm-eval defines no acc_norm for them)."""
    def f(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}"

    lines = ["| task | acc | acc_norm | n |", "|---|---:|---:|---:|"]
    for t, v in result["tasks"].items():
        lines.append(f"| {t} | {f(v['acc'])} | {f(v['acc_norm'])} | {v['n']} |")
    m = result["mean"]
    fallback = [t for t, v in result["tasks"].items() if v["acc_norm"] is None]
    mark = "*" if fallback and m["acc_norm"] is not None else ""
    lines.append(f"| **mean** | {f(m['acc'])} | {f(m['acc_norm'])}{mark} | |")
    if mark:  # the mean of acc_norm takes acc where lm-eval defines no acc_norm
        lines.append(f"\n\\* the acc_norm mean takes acc for {', '.join(fallback)} (no acc_norm in lm-eval)")
    return "\n".join(lines)


def save_result(result: dict[str, Any], path: str | os.PathLike) -> Path:
    from losa.utils.io import atomic_write_json

    atomic_write_json(path, result)
    return Path(path)
