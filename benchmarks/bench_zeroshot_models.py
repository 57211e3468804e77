"""Zero-shot accuracy of saved checkpoints (e.g. the fine-tuned variants of bench_losa.py ``--save-dir``).

Each ``LABEL=PATH`` (a model directory or alias) is evaluated with lm-eval on the offline tasks, on the
same seeded subsets as ``zeroshot.md`` (``--limit 500``, seed 0), with float32 log-softmax. Rows
(per-task acc / acc_norm, means, verified sparsity, weight dtype, wall time, provenance) are appended to a
JSONL file as each model finishes, and the Markdown table is rendered from all rows, so runs can span
sessions. Tasks are evaluated one at a time and each finished task is saved (``<out>.partial/<label>.json``),
so a run killed part-way resumes at the next task when started again with the same arguments, the same
checkpoint files, data directory, lm-eval version, CPU and thread count (anything else starts the model
over); a resumed row lists the date and commit of every session that evaluated part of it (``sessions``)::

    python benchmarks/bench_zeroshot_models.py --data-dir ../shared/data --limit 500 \\
        "losa-wanda 70%=/work/models17/losa-wanda@0.7" "dense=smollm2-135m"

Weights are float32 by default: torch's bf16 GEMM is several times slower than float32 on CPUs without
native bf16 (avx2_decode.md), and one dtype for every row keeps the comparison about the models. A training-
free variant is evaluated from a model saved by ``bench_losa.py --save-dir`` (e.g. with ``--out`` pointing
at a scratch JSONL so that its perplexity row is not duplicated).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from _provenance import SMOLLM2, provenance
from _rows import append_jsonl, read_jsonl

from losa.utils.io import atomic_write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def partial_path(out: Path, label: str) -> Path:
    """Where a model's finished tasks wait until its row is written (one file per label)."""
    safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in label)
    return out.parent / f"{out.stem}.partial" / f"{safe}-{hashlib.sha1(label.encode()).hexdigest()[:8]}.json"


def weights_fingerprint(path: str) -> list:
    """Name, size and modification time of each file of a checkpoint directory (an alias: the alias itself)."""
    d = Path(path)
    if not d.is_dir():
        return [path]
    return sorted([f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in d.iterdir() if f.is_file())


def partial_key(path: str, args, prov: dict) -> dict:
    """What must match for a partial file to be resumed: the checkpoint's files, the evaluation's arguments, the
    data, lm-eval's version, the CPU and the thread count."""
    import lm_eval

    from losa.eval.converters import resolve_data_dir

    return {"path": path, "weights": weights_fingerprint(path), "limit": args.limit, "dtype": args.dtype,
            "batch_size": args.batch_size, "data_dir": str(resolve_data_dir(args.data_dir)),
            "lm_eval": lm_eval.__version__, "cpu": prov["cpu"], "isa": prov["isa"], "threads": prov["threads"]}


def evaluate(label: str, path: str, args, out: Path) -> dict:
    """One checkpoint's zero-shot row, task by task; tasks already saved in its partial file are not run again.

    Args:
        label: the row's name.
        path: a model directory or alias.
        args: the parsed command line (tasks, limit, dtype, batch size, threads, data dir, quiet).
        out: the JSONL results file (the partial file lives next to it, see :func:`partial_path`).

    Returns:
        The row: per-task scores, their means (:func:`losa.eval.zeroshot.task_mean`), verified sparsity, wall
        seconds of evaluation summed over sessions (model loading excluded), provenance of the last session and
        ``sessions`` (date and commit of each session that evaluated a task).

    Raises:
        LosaError: an unknown task or a missing data file (before the model is loaded).
    """
    import torch

    import losa
    from losa.eval.zeroshot import DEFAULT_TASKS, check_local_tasks, parse_tasks, run_zeroshot, task_mean
    from losa.export.verify import sparsity_report
    from losa.utils.io import atomic_write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    prov = provenance(torch.get_num_threads(), SMOLLM2, sys.argv)
    tasks = parse_tasks(args.tasks or DEFAULT_TASKS)
    check_local_tasks(tasks, args.data_dir)
    key = partial_key(path, args, prov)
    part = partial_path(out, label)
    state = json.loads(part.read_text()) if part.is_file() else None
    if state is not None and state.get("key") != key:
        print(f"{label}: {part} was written with other arguments ({state.get('key')}); starting over", flush=True)
        state = None
    state = state or {"key": key, "tasks": {}, "wall_s": 0.0, "sessions": []}
    todo = [t for t in tasks if t not in state["tasks"]]
    if len(todo) < len(tasks):
        print(f"{label}: resuming, {len(tasks) - len(todo)} of {len(tasks)} tasks already in {part}", flush=True)
    model, tok = losa.load_model(path)
    sparsity = float(sparsity_report(model).overall)
    model = model.to(getattr(torch, args.dtype))
    session = {"date": prov["date"], "commit": prov["commit"]}
    for task in todo:
        t0 = time.perf_counter()
        res = run_zeroshot(model, tok, tasks=[task], limit=args.limit, data_dir=args.data_dir,
                           batch_size=args.batch_size, seed=0, offline=True, quiet=args.quiet)
        state["tasks"][task] = res["tasks"][task]
        state["wall_s"] += time.perf_counter() - t0
        if session not in state["sessions"]:
            state["sessions"].append(session)
        atomic_write_json(part, state)
    per_task = {t: state["tasks"][t] for t in tasks}
    return {"label": label, "path": path, "sparsity": sparsity, "tasks": per_task, "mean": task_mean(per_task),
            "limit": args.limit, "dtype": args.dtype, "lm_eval": key["lm_eval"],
            "wall_s": round(state["wall_s"], 1), "sessions": state["sessions"], **prov}


def render(rows: list[dict], path: Path) -> None:
    """The Markdown table of all rows (acc, then acc_norm where lm-eval defines it)."""
    tasks = list(rows[0]["tasks"]) if rows else []

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    lines = [f"# Zero-shot accuracy of saved checkpoints ({SMOLLM2})", "",
             "Accuracy in %, 0-shot, lm-eval through `losa.eval.zeroshot.run_zeroshot` on the offline tasks "
             "(the same seeded subsets as zeroshot.md), float32 log-softmax, weight dtype per row. The fine-tuned "
             "checkpoints come from `bench_losa.py --save-dir` (their perplexity rows are in the results file "
             "named in the label's JSONL row).", "",
             "| model | sparsity | weights | " + " | ".join(tasks) + " | mean acc | mean acc_norm |",
             "|---|---:|---|" + "---:|" * (len(tasks) + 2)]
    for r in rows:
        lines.append(f"| {r['label']} | {r['sparsity']:.4f} | {r.get('dtype', 'bfloat16')} | "
                     + " | ".join(pct(r["tasks"][t]["acc"]) for t in tasks)
                     + f" | {pct(r['mean']['acc'])} | {pct(r['mean']['acc_norm'])} |")
    if rows:
        lines.append("| items | | | " + " | ".join(str(rows[0]["tasks"][t]["n"]) for t in tasks) + " | | |")
    lines += ["", "acc_norm mean: acc_norm where lm-eval defines it, acc elsewhere.", "",
              "Provenance per row (date, commit, threads, CPU / ISA, model, command, wall s):", ""]
    lines += [f"- {r['label']} (`{r['path']}`): {r['date']}, {r['commit']}, {r['threads']} threads, {r['cpu']} "
              f"({r['isa']}), {r['model']}; `{r['command']}`; {r['wall_s']} s" for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("models", nargs="*", help="LABEL=PATH (a model directory or alias)")
    ap.add_argument("--data-dir", default=os.environ.get("LOSA_DATA_DIR") or str(HERE.parent.parent / "shared" / "data"))
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--tasks", default=None, help="comma-separated (default: the eight of zeroshot.md)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weight dtype")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--out", default=str(RESULTS / "zeroshot_models.jsonl"))
    args = ap.parse_args()
    out = Path(args.out)
    rows = read_jsonl(out) if out.is_file() else []
    for spec in args.models:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            sys.exit(f"model {spec!r}: give LABEL=PATH, e.g. 'dense=smollm2-135m'")
        if any(r["label"] == label for r in rows):
            print(f"{label}: already in {out}, skipped (remove its row to measure again)")
            partial_path(out, label).unlink(missing_ok=True)  # left by a run killed after writing its row
            continue
        row = evaluate(label, path, args, out)
        print(f"{label}: mean acc {row['mean']['acc']:.4f}", flush=True)
        rows.append(row)
        append_jsonl(out, [row], fsync=True)  # on disk before the partial file goes
        partial_path(out, label).unlink(missing_ok=True)
    render(rows, out.with_suffix(".md"))


if __name__ == "__main__":
    main()
