"""Issue 17's whole comparison as one resumable queue: each missing piece runs in order of value, one at a time.

Every step runs the benchmark that owns its rows (``bench_losa.py``, ``bench_zeroshot_models.py``,
``bench_full_ppl.py``) with issue 17's protocol (C4 calibration 8 x 256, the same 1024 Alpaca examples with
the distillation loss for every fine-tuned variant, WikiText-2 on the first 40 windows of 512 tokens, the
seeded 500-item zero-shot subsets). A step is skipped when its rows (and the saved model a later step needs)
already exist, so a killed queue continues where it stopped; ``quality_summary.md`` is re-rendered after each
step. A model that already has a perplexity row but was not saved is trained again with ``--save-dir`` into
``quality*_rerun.jsonl`` (on whatever CPU the queue runs on: the summary
pairs rows from the same CPU). Each fine-tuned variant takes about an hour on 2 cores, each zero-shot run
about half an hour (results files' ``wall_s``)::

    python benchmarks/issue17_queue.py --models-dir ~/losa-models17 --list   # done / to do, runs nothing
    python benchmarks/issue17_queue.py --models-dir ~/losa-models17          # run what is missing
    python benchmarks/issue17_queue.py --models-dir ~/losa-models17 --only "zero-shot: losa-wanda @ 0.7"
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from quality_summary import PPL_FILES, load_jsonl, saved_key

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FINE_TUNED_70 = ("losa-wanda", "wanda+masked-lora", "wanda+lora", "losa-sparsegpt", "losa-no-lsr", "losa-no-sra",
                 "losa-no-dsa")
TRAINING_FREE_70 = ("dense", "wanda", "sparsegpt", "wanda+owl", "wanda+atp", "wanda+rmi")
#: the zero-shot rows issue 17 lists, in order of value (dense is the ``smollm2-135m`` alias), then OWL and RMI,
#: which its zero-shot target ("above every training-free allocation") also needs
ZEROSHOT = (("losa-wanda", "0.7"), ("wanda", "0.7"), ("wanda+atp", "0.7"), ("wanda+masked-lora", "0.7"),
            ("wanda+lora", "0.7"), ("losa-wanda", "0.5"), ("wanda", "0.5"), ("wanda+owl", "0.7"), ("wanda+rmi", "0.7"))
_RERUN = ("Issue 17: variants trained again with the same command so that their model is saved for the zero-shot "
          "and full-test-set evaluations (benchmarks/issue17_queue.py), on the CPU named in each row's provenance.")
_FT = ("the same 1024 Alpaca examples (SmolLM2 chat template), distillation loss for every variant, same calibration "
       "and the same 40 WikiText-2 windows")
#: the line each results file's Markdown header carries (bench_losa.py renders it from the last command's --note)
NOTES = {"quality70.jsonl": "Issue 17: training-free layer-wise allocations of Wanda at 70 % (no fine-tuning), same "
                            "calibration (C4 8x256) and the same 40 WikiText-2 windows of 512 tokens as "
                            "losa_recon_error.md.",
         "quality70_ft1024.jsonl": f"Issue 17: fine-tuned variants at 70 %, {_FT} as quality70.md (training-free rows "
                                   "there).",
         "quality50_ft1024.jsonl": f"Issue 17: at 50 %, Wanda and the fine-tuned variants: {_FT} as the 70 % files.",
         "quality70_rerun.jsonl": _RERUN, "quality70_ft1024_rerun.jsonl": _RERUN, "quality50_ft1024_rerun.jsonl": _RERUN}
FIFTY = ("wanda", "losa-wanda", "wanda+masked-lora")  # Wanda and LoSA (the 50 % gap target) before masked LoRA
#: saved 70 % models whose full-test-set perplexity is reported (the headline rows)
FULL_SET = ("losa-wanda", "wanda+masked-lora", "wanda+lora", "wanda+atp", "wanda")


def rows(name: str) -> list[dict]:
    return load_jsonl(RESULTS / name)


def has_row(name: str, variant: str, target: str) -> bool:
    return any(r["variant"] == variant and r["target"] == target and r.get("recon_error", "global") == "global"
               for r in rows(name))


def saved(ppl_rows: list[dict], models: Path, variant: str, target: str) -> bool:
    """A model counts as saved when a results row says so: rows are written only after the save finished."""
    dest = str(models / f"{variant}@{target}")
    return any(r.get("saved_to") == dest for r in ppl_rows) and Path(dest, "config.json").is_file()


@dataclass
class Step:
    """One benchmark command and the check that says its rows already exist.

    ``key`` is the ``(variant, target)`` whose saved model the step writes (``saves``) or reads; ``blocked`` says
    why the step cannot run as things are (a one-line fix for the user)."""

    name: str
    done: bool
    argv: list[str]
    key: tuple[str, str] | None = None
    saves: bool = False
    blocked: str | None = None


def steps(args) -> list[Step]:
    """Every step of the comparison, in order of value; ``done`` is read from the results files now."""
    py, m = sys.executable, Path(args.models_dir).expanduser().resolve()
    proto = ["--threads", str(args.threads), "--nsamples", "8", "--seqlen", "256", "--recon-nsamples", "2",
             "--ft-max-length", "128", "--batch-size", "8", "--eval-windows", "40", "--eval-seqlen", "512",
             "--data-dir", args.data_dir]
    ft = ["--ft-examples", "1024", "--distill"]

    def losa(variants, target, out, *extra):
        return [py, str(HERE / "bench_losa.py"), "--sparsities", target, "--variants", *variants, *proto, *extra,
                "--out", str(RESULTS / out), "--note", NOTES[out]]

    out = [Step("70 %: training-free rows", all(has_row("quality70.jsonl", v, "0.7" if v != "dense" else "0")
                                                 for v in TRAINING_FREE_70),
                losa(TRAINING_FREE_70, "0.7", "quality70.jsonl", "--save-dir", str(m)))]
    for v in FINE_TUNED_70:
        out.append(Step(f"70 %: {v}, 1024 examples", has_row("quality70_ft1024.jsonl", v, "0.7"),
                        losa([v], "0.7", "quality70_ft1024.jsonl", *ft, "--save-dir", str(m))))
    for v in FIFTY:
        free = v in TRAINING_FREE_70
        out.append(Step(f"50 %: {v}" + ("" if free else ", 1024 examples"), has_row("quality50_ft1024.jsonl", v, "0.5"),
                        losa([v], "0.5", "quality50_ft1024.jsonl", *([] if free else ft), "--save-dir", str(m))))
    zs_rows = rows("zeroshot_models.jsonl")
    zs = {saved_key(r["path"]) for r in zs_rows if r.get("limit") == 500}
    zs_cmd = [py, str(HERE / "bench_zeroshot_models.py"), "--data-dir", args.data_dir, "--limit", "500", "--threads",
              str(args.threads), "--quiet"]
    full = {r["spec"] for r in rows("full_ppl.jsonl")}
    ppl_rows = [r for f in PPL_FILES for r in rows(f)]  # read once: every check below looks through them

    def zero_shot(label: str, path: str, key: tuple[str, str]) -> Step:
        # bench_zeroshot_models.py skips a label already in its file, whatever that row's --limit
        other = any(r["label"] == label and r.get("limit") != 500 for r in zs_rows)
        return Step(f"zero-shot: {label.replace('@', ' @ ')}", key in zs, [*zs_cmd, f"{label}={path}"], key,
                    blocked=f"zeroshot_models.jsonl has a '{label}' row with another --limit: remove it" if other else None)

    out.append(zero_shot("dense", "smollm2-135m", ("dense", "0")))
    for v, t in ZEROSHOT:
        key, dest = (v, t), m / f"{v}@{t}"
        needed = key not in zs or (t == "0.7" and v in FULL_SET and f"saved:{dest}" not in full)
        measured = any(r["variant"] == v and r["target"] == t for r in ppl_rows)
        if needed and measured and not saved(ppl_rows, m, v, t):  # a measured model trained again (same command) to be saved
            free = v in TRAINING_FREE_70  # a 50 % training-free row lives in the 50 % file
            rerun = "quality70_rerun.jsonl" if free and t == "0.7" else f"quality{round(100 * float(t))}_ft1024_rerun.jsonl"
            out.append(Step(f"{round(100 * float(t))} %: {v} again, saved for zero-shot", False,
                            losa([v], t, rerun, *([] if free else ft), "--save-dir", str(m)), key, saves=True,
                            blocked=f"{rerun} has its row but {dest} is gone: restore the model or remove that row"
                            if has_row(rerun, v, t) else None))
        out.append(zero_shot(f"{v}@{t}", str(dest), key))
    for v in FULL_SET:
        spec = f"saved:{m / f'{v}@0.7'}"
        out.append(Step(f"full test set: {v} @ 0.7", spec in full,
                        [py, str(HERE / "bench_full_ppl.py"), spec, "--data-dir", args.data_dir], (v, "0.7")))
    return out


def pending(args) -> list[Step]:
    """The steps still to run, in order: those whose name contains ``--only``, and the steps that save the models
    they read."""
    todo = [s for s in steps(args) if not s.done]
    chosen = {id(s) for s in todo if args.only in s.name}
    keys = {s.key for s in todo if id(s) in chosen and s.key}
    return [s for s in todo if id(s) in chosen or (s.saves and s.key in keys)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--models-dir", required=True, help="where saved models go (about 0.5 GB each)")
    ap.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads of the bench_losa and zero-shot runs (bench_full_ppl.py uses torch's default)")
    ap.add_argument("--list", action="store_true", help="print each step as done / to do and exit")
    ap.add_argument("--only", default="", help="run only the missing steps whose name contains this text, e.g. "
                                               "'zero-shot' (and the steps that save the models they read)")
    args = ap.parse_args(argv)
    if not Path(args.data_dir, "README.md").is_file():
        sys.exit(f"--data-dir {args.data_dir}: not the shared data folder (no README.md there); pass --data-dir")
    if args.list:
        todo = {id(s) for s in pending(args)}
        for s in steps(args):
            if not args.only or args.only in s.name or id(s) in todo:
                print(f"[{'done' if s.done else 'blocked' if s.blocked else 'to do'}] {s.name}"
                      + (f" ({s.blocked})" if s.blocked else ""))
        return
    todo = pending(args)
    while todo:  # re-read after each step: one run can complete several steps
        s = todo[0]
        if s.blocked:
            sys.exit(f"step {s.name!r} cannot run: {s.blocked}")
        print(f"== {s.name}: {' '.join(s.argv)}", flush=True)
        if subprocess.run(s.argv).returncode != 0:
            sys.exit(f"step {s.name!r} failed; its benchmark printed why (fix, then rerun this queue to resume)")
        subprocess.run([sys.executable, str(HERE / "quality_summary.py")], check=True)
        remaining = pending(args)
        if remaining and remaining[0].name == s.name:
            sys.exit(f"step {s.name!r} finished without writing its rows (a benchmark skips a row already in its "
                     "results file: see its output above)")
        todo = remaining


if __name__ == "__main__":
    main()
