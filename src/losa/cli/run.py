"""``losa run``: the full LoSA schedule (prune + sparse LoRA, T steps), resumable, with report.json."""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from losa.cli.common import (
    add_model_arg,
    add_quiet_arg,
    add_recipe_args,
    check_model_arg,
    config_from_args,
    eval_flag,
    eval_settings,
    recipe_for_manifest,
    refuse_ignored,
)
from losa.data.sources import fetch_eval_datasets
from losa.errors import LosaError, option
from losa.pipelines.losa.config import NO_FINETUNE_WARNING, LoSAConfig
from losa.report.schema import PplSettings, StepRecord


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="LoSA: dynamic pruning + sparse LoRA with RMI sparsity and rank allocation",
                       description="Prune in T steps with a cubic schedule, allocating layer-wise sparsity by RMI "
                                   "(linear CKA) and LoRA ranks by reconstruction error; fine-tune masked adapters "
                                   "between steps; merge them exactly at the end. Writes report.json per step. "
                                   "Every LoSAConfig field is a flag (fine-tuning fields in their own group).")
    add_model_arg(p)
    add_recipe_args(p, LoSAConfig)
    p.add_argument("--out", help="run directory (state/, report.json, model/) (default: runs/<model>-losa)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished step")
    p.add_argument("--eval", default=None, help="perplexity datasets after the run, comma-separated (default: "
                                                "wikitext2 when a data dir is set); 'none' to skip")
    p.add_argument("--eval-seqlen", type=int, default=None, help="perplexity window length (default: --seqlen)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--eval-every-step", action="store_true",
                   help="also measure the --eval perplexities (wikitext2 by default) after every step; recorded "
                        "per step in report.json and plotted by losa report")
    p.add_argument("--compare-dense", action="store_true",
                   help="also measure the dense model's --eval perplexities first (losa compare's Dense row)")
    p.add_argument("--no-save", action="store_true", help="do not write the merged model to <out>/model")
    add_quiet_arg(p)
    p.set_defaults(func=run_losa)


def run_losa(args: argparse.Namespace) -> int:
    import losa
    from losa.finetune.config import check_environment
    from losa.finetune.data import check_records_source
    from losa.models.registry import check_window
    from losa.pipelines.losa.loop import StepEval, check_run_dir, check_step_eval_resumed, run
    from losa.utils.device import resolve_device
    from losa.utils.dist import barrier, is_main
    from losa.utils.io import check_output_dir

    cfg = config_from_args(args)
    refuse_ignored(args, cfg.ignored_fields(), warn_only=args.resume)  # a run started before a check must resume
    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.model).name.removesuffix('.gguf')}-losa"
    progress = not args.quiet and is_main()  # one set of bars for a multi-process run
    # everything that can be checked without the model, before it is loaded, calibrated and pruned
    datasets, eval_seqlen = eval_settings(args, cfg.seqlen, cfg.data_dir)
    window_flag = eval_flag(args)
    check_output_dir(out, "--out", exists_ok=True)
    resumed = check_run_dir(out, cfg, args.resume)  # an existing run is refused, or checked for --resume, first
    if resumed is not None and args.eval_every_step and int(resumed["step"]) < cfg.steps:  # before the model loads
        check_step_eval_resumed(resumed["rows"], StepEval(datasets, eval_seqlen, args.max_windows, cfg.data_dir))
    resolve_device(cfg.device)
    if cfg.finetunes:
        check_environment(cfg.finetune)
    if cfg.finetune_data is not None:
        check_records_source(cfg.finetune_data)
    check_model_arg(args.model)
    say = print if is_main() else (lambda *a, **k: None)  # the other processes of a multi-process run are silent
    say(f"losa run: {args.model} | {cfg.method} S={cfg.target_sparsity:.2f} T={cfg.steps} allocator="
          f"{cfg.effective_allocator} ranks={'allocated' if cfg.rank_allocation else 'uniform'}"
          f"{' left dense=' + ','.join(cfg.ignore) if cfg.ignore else ''} -> {out}")
    settings = PplSettings(seqlen=eval_seqlen, max_windows=args.max_windows) if datasets else None
    if resumed is not None:
        done = int(resumed["step"])
        if done >= cfg.steps and _finished(out, datasets, settings, args.no_save, args.compare_dense):
            if is_main():
                print(f"  {out} holds the finished run (all {cfg.steps} steps, report.json"
                      f"{'' if args.no_save else ', model/'}): nothing to do; `losa report {out}` shows it")
                for flag, was, now in _other_data(resumed["recipe"], cfg):
                    print(f"warning: the finished run in {out} was made with "
                          f"{f'{flag} {was}' if was is not None else f'no {flag}'}; this command's {flag} {now} was "
                          f"not used (a new --out starts a run with it)", file=sys.stderr)
            return 0
        rest = f"merging, verifying{', evaluating' if datasets else ''} and saving"
        if is_main():
            print(f"  resuming after step {done}/{cfg.steps} saved in {out / 'state'}" if done < cfg.steps else
                  f"  all {cfg.steps} steps are saved in {out / 'state'}: {rest}")
    fetch_eval_datasets(datasets, cfg.data_dir, "--eval")  # without a data dir: from the hub now, not after the run
    if not cfg.finetunes:
        say(f"warning: {NO_FINETUNE_WARNING}")
    step_eval = StepEval(datasets, eval_seqlen, args.max_windows, cfg.data_dir) if args.eval_every_step else None
    model, tok = losa.load_model(args.model, dtype=args.dtype)
    if datasets:
        check_window(model, eval_seqlen, "evaluation window", window_flag)
    from losa.lora.model import check_target_modules
    from losa.pruning.ignore import check_ignore

    check_target_modules(model, cfg.lora_target_modules, option("lora_target_modules"))  # before --compare-dense
    left_dense = check_ignore(model, cfg.ignore)
    dense = _perplexities(args, cfg, model, tok, datasets, settings, "dense") if args.compare_dense and is_main() else {}
    try:  # Ctrl-C anywhere from here on: say what is saved and how to continue
        with warnings.catch_warnings():  # printed above, as one line
            warnings.filterwarnings("ignore", message=re.escape(NO_FINETUNE_WARNING))
            report = run(model, tok, cfg, out_dir=out, resume=args.resume, progress=progress, model_name=args.model,
                         step_eval=step_eval, on_step=lambda s: _print_step(s, cfg.steps, cfg.finetune.distill) if is_main() else None)
        if is_main():  # the other processes of a multi-process run: the main one reports and saves
            report.results.dense_ppl = dense
            _finish(args, cfg, model, tok, report, out, datasets, settings, left_dense)
    except KeyboardInterrupt:
        if not is_main():  # the main process says what was kept
            return 130
        raise KeyboardInterrupt(_resume_hint(out, cfg.steps)) from None
    barrier()
    return 0


def _perplexities(args: argparse.Namespace, cfg: LoSAConfig, model, tok, datasets: list[str],
                  settings: PplSettings | None, tag: str) -> dict[str, float]:
    """The ``--eval`` perplexities of ``model`` (``tag``: "dense" or "merged"), each printed as it is measured."""
    from losa.eval.ppl import perplexity

    out: dict[str, float] = {}
    for d in datasets:
        assert settings is not None
        out[d] = float(perplexity(model, tok, d, seqlen=settings.seqlen, max_windows=args.max_windows,
                                  flag=eval_flag(args),
                                  data_dir=cfg.data_dir, progress=not args.quiet))
        print(f"  {tag} {d} perplexity: {out[d]:.3f}", flush=True)
    return out


def _finish(args: argparse.Namespace, cfg: LoSAConfig, model, tok, report, out: Path, datasets: list[str],
            settings: PplSettings | None, left_dense: int = 0) -> None:
    """The main process's end of a run: the verified sparsity (and the ``left_dense`` linears that ``ignore``
    names), the perplexities, report.json, the merged model."""
    import losa
    from losa.pruning.masks import parse_nm
    from losa.report.schema import save_report

    dense_note = f"; {left_dense} linear modules left dense (ignore {','.join(cfg.ignore)})" if cfg.ignore else ""
    print(f"  verified: merged model sparsity {report.results.sparsity:.4f} (target {cfg.target_sparsity:.4f})"
          f"{dense_note}")
    report.results.ppl_settings = settings
    report.results.ppl = _perplexities(args, cfg, model, tok, datasets, settings, "merged")
    save_report(report, out)
    if not args.no_save:
        manifest = {"source_model": args.model, "finetune": "losa", "recipe": recipe_for_manifest(cfg.model_dump()),
                    "sparsity": {"overall": report.results.sparsity},
                    "results": {"ppl": report.results.ppl, "dense_ppl": report.results.dense_ppl,
                                "eval_seqlen": settings and settings.seqlen,
                                "max_windows": args.max_windows}}
        if cfg.nm is not None:  # N per decoder layer (mixed N:M moves it), checked by losa inspect
            m = parse_nm(cfg.nm)[1]
            manifest["nm_n"] = [round((1 - s) * m) for s in report.results.layer_target_sparsity]
        losa.save_checkpoint(model, tok, out / "model", manifest, overwrite=True)
        print(f"  saved merged model to {out / 'model'}")
    else:
        print(f"  merged model not saved (--no-save); the report is in {out}")


def _print_step(s: StepRecord, steps: int, distill: bool) -> None:
    """One line per finished step, printed (and flushed) as soon as the step is checkpointed."""
    ppl = "".join(f" {d} ppl={v:.3f}" for d, v in s.ppl.items())
    kind = "distillation (KL)" if distill else "train"  # not comparable with a label loss
    loss = f"final {kind} loss={s.train_loss[-1]:.4f}" if s.train_loss else "not fine-tuned"
    rank = f"mean rank={sum(s.ranks) / len(s.ranks):.2f}" if s.ranks else "no ranks"
    print(f"  step {s.step}/{steps}: S_t={s.target_sparsity:.4f} {rank} {loss}{ppl} "
          f"({s.wall_time_s:.1f}s, saved)", flush=True)


def _resume_hint(out: Path, steps: int) -> str:
    """What an interrupted run left: the steps to ``--resume`` from, or nothing to resume."""
    from losa.pipelines.losa.state import saved_step

    done = saved_step(out)
    if done is None:
        return f"no step had finished, so there is nothing to resume; rerun the same command (--out {out})"
    if done >= steps:
        return (f"all {steps} steps are saved in {out}; run the same command with --resume to merge, verify, "
                "evaluate and save")
    saved = "step 1 is" if done == 1 else f"steps 1-{done} are"
    return f"{saved} saved in {out}; run the same command with --resume to continue from step {done + 1}"


def _other_data(recorded: dict, cfg: LoSAConfig) -> list[tuple[str, Any, Any]]:
    """(flag, recorded, given) for each data path of a finished run's recipe that this command names otherwise
    (the resume check skips these placement fields, as data may move; a finished run is not rerun to compare
    fingerprints)."""
    def same(a: Any, b: Any) -> bool:
        return a == b or (a is not None and b is not None and Path(a).exists() and Path(b).exists()
                          and Path(a).resolve() == Path(b).resolve())

    return [(flag, recorded.get(field), getattr(cfg, field))  # a flag left out of the resume changes nothing
            for field, flag in (("finetune_data", "--finetune-data"), ("data_dir", "--data-dir"))
            if getattr(cfg, field) is not None and not same(recorded.get(field), getattr(cfg, field))]


def _finished(out: Path, datasets: list[str], settings: PplSettings | None, no_save: bool,
              compare_dense: bool = False) -> bool:
    """Whether ``out`` holds a run that got to its end: a verified final report with every requested perplexity
    (and the dense ones with ``--compare-dense``) measured with these window settings, and the merged model unless
    ``--no-save``."""
    from losa.report.schema import load_run

    try:
        results = load_run(out).results
    except LosaError:
        return False
    evaluated = not datasets or (all(d in results.ppl for d in datasets) and results.ppl_settings == settings
                                 and (not compare_dense or all(d in results.dense_ppl for d in datasets)))
    return results.sparsity is not None and evaluated and (no_save or (out / "model" / "losa.json").is_file())
