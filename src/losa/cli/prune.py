"""``losa prune``: one-shot pruning of a causal LM, verified, evaluated and saved."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from losa.cli.common import (
    add_model_arg,
    add_offload_args,
    add_quiet_arg,
    add_recipe_args,
    check_model_arg,
    config_from_args,
    eval_flag,
    eval_settings,
    offload_kwargs,
    offload_note,
    recipe_for_manifest,
)
from losa.data.sources import fetch_eval_datasets
from losa.errors import LosaError, option
from losa.pipelines.oneshot import PruneConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="one-shot prune a model (magnitude, Wanda, SparseGPT)",
                       description="Prune every linear layer of the decoder, verify the result, report "
                                   "perplexity and save an HF checkpoint with losa.json. Every PruneConfig field "
                                   "is a flag; without a data dir, calibration text is self-generated.")
    add_model_arg(p)
    add_offload_args(p)
    add_recipe_args(p, PruneConfig)
    p.add_argument("--eval", default=None,
                   help="comma-separated perplexity datasets after pruning (default: wikitext2 when a data dir "
                        "is set); 'none' to skip")
    p.add_argument("--eval-seqlen", type=int, default=None, help="perplexity window length (default: --seqlen)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--compare-dense", action="store_true", help="also measure the dense model's perplexity first")
    p.add_argument("--out", help="output directory for the pruned checkpoint (default: runs/<model>-<recipe>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--no-save", action="store_true", help="do not write a checkpoint")
    add_quiet_arg(p)
    p.set_defaults(func=run_prune)


def _default_out(model: str, cfg: PruneConfig) -> Path:
    if cfg.nm:
        tag = ("mixed" if cfg.nm_n else "") + cfg.nm.replace(":", "of")
    else:
        tag = f"{round(cfg.sparsity * 100)}" if isinstance(cfg.sparsity, float) else "layerwise"
        tag += f"-{cfg.allocator}" if cfg.allocator != "uniform" else ""  # not the uniform prune's directory
    if cfg.ignore:  # a directory per set of patterns, not the one of the prune that leaves nothing dense
        tag += "-ignore" + hashlib.sha1(",".join(cfg.ignore).encode()).hexdigest()[:6]
    return Path("runs") / f"{Path(model).name.removesuffix('.gguf')}-{cfg.method}-{tag}"


def run_prune(args: argparse.Namespace) -> int:
    import losa
    from losa.eval.ppl import perplexity
    from losa.export.checkpoint import MANIFEST, update_manifest
    from losa.models.registry import check_window
    from losa.utils.device import resolve_device
    from losa.utils.dist import launched_distributed
    from losa.utils.io import check_output_dir

    if launched_distributed():  # every process would prune and write the same --out
        if os.environ.get("RANK", "0") != "0":
            return 2  # the main process says why
        raise LosaError("losa prune runs in one process (it moves one decoder layer at a time to the GPU: "
                        "--offload); start it without torchrun / accelerate launch, which serve losa run's "
                        "fine-tuning")
    cfg = config_from_args(args)
    offload = offload_kwargs(args)
    progress = not args.quiet
    # everything that can be checked without the model, before it is loaded, calibrated and pruned
    datasets, eval_seqlen = eval_settings(args, cfg.seqlen, cfg.data_dir)
    window_flag = eval_flag(args)
    if args.no_save and (args.out or args.overwrite):
        raise LosaError(f"{'--out' if args.out else '--overwrite'} has no effect with --no-save; drop one of them")
    out = Path(args.out) if args.out else _default_out(args.model, cfg)
    if not args.no_save:
        check_output_dir(out, "--out", exists_ok=args.overwrite)
    resolve_device(cfg.device)
    from losa.pruning import get_pruner

    calib = (f"calibration {cfg.calib} {cfg.nsamples}x{cfg.seqlen} seed {cfg.seed}"
             if get_pruner(cfg.method).stat is not None or cfg.allocator != "uniform" else "no calibration needed")
    check_model_arg(args.model)
    fetch_eval_datasets(datasets, cfg.data_dir, "--eval")  # without a data dir: from the hub now, not after pruning
    print(f"losa prune: {args.model} | {cfg.describe()} | {calib}")
    model, tok = losa.load_model(args.model, dtype=args.dtype, **offload)
    from losa.pruning.ignore import check_ignore

    left_dense = check_ignore(model, cfg.ignore)  # before the dense evaluation of --compare-dense
    if (note := offload_note(model, args)) is not None:
        print(note)
    if get_pruner(cfg.method).stat is not None:  # the calibration window first: --seqlen sets both by default
        check_window(model, cfg.seqlen, "calibration window", option("seqlen"))
    if datasets:
        check_window(model, eval_seqlen, "evaluation window", window_flag)

    def ppl_all(tag: str, res: dict[str, float], record: Callable[[], None] | None = None) -> dict[str, float]:
        for d in datasets:  # res: filled as each dataset is measured; record: called after each one
            res[d] = perplexity(model, tok, d, seqlen=eval_seqlen, max_windows=args.max_windows, flag=window_flag,
                                data_dir=cfg.data_dir, progress=progress)
            print(f"  {tag} {d} perplexity (seqlen {eval_seqlen}, windows {args.max_windows or 'all'}): {res[d]:.3f}")
            if record is not None:
                record()
        return res

    dense = ppl_all("dense", {}) if args.compare_dense else {}
    report = losa.prune(model, tok, cfg, progress=progress)
    sp = report.sparsity
    if report.allocation:  # the layer-wise allocator's choice
        beta = f", beta={report.allocation['beta']:.4g}" if "beta" in report.allocation else ""
        print(f"  layer-wise sparsity ({report.allocation['method']}{beta}): {min(report.targets):.4f} to "
              f"{max(report.targets):.4f} over {len(report.targets)} layers"
              f"{'' if args.no_save else ' (per layer in losa.json)'}")
    print(f"  {'verified' if cfg.verify else 'not verified (--no-verify)'}: overall sparsity {sp.overall:.4f} over {len(sp.modules)} linear modules "
          f"in {len(sp.layers)} layers; prune time {report.timings['total_s']:.1f}s")
    if cfg.ignore:
        print(f"  left dense (ignore {','.join(cfg.ignore)}): {left_dense} of {len(sp.modules)} linear modules; "
              "the others are at their target")
    results = {"ppl": {}, "dense_ppl": dense, "eval_seqlen": eval_seqlen, "max_windows": args.max_windows}
    if not args.no_save:  # saved before the evaluation: a long prune is kept if the evaluation fails or is stopped
        manifest = {"source_model": args.model, "recipe": recipe_for_manifest(report.recipe), "nm": report.nm and list(report.nm),
                    "layer_targets": report.targets, "allocation": report.allocation, "sparsity": sp.model_dump(),
                    "timings": report.timings,
                    "results": results}
        losa.save_checkpoint(model, tok, out, manifest, overwrite=args.overwrite)
        print(f"  saved checkpoint to {out} (losa.json holds the recipe and per-module sparsity)")
    def record() -> None:  # each perplexity goes into losa.json as soon as it is measured
        update_manifest(out, {"results": results})

    try:
        ppl_all("pruned", results["ppl"], None if args.no_save else record)
    except BaseException as e:  # say that the pruned model is kept, and how to evaluate it
        if args.no_save:
            raise
        missing = [d for d in datasets if d not in results["ppl"]]
        kept = (f"the pruned model is saved in {out}, without its {', '.join(missing)} perplexity; "
                f"`losa eval ppl {out}` measures it" if missing else
                f"the pruned model is saved in {out}; its perplexities were measured (above) but not all recorded "
                "in its losa.json")
        if isinstance(e, KeyboardInterrupt):
            raise KeyboardInterrupt(kept) from None
        if isinstance(e, LosaError):
            raise LosaError(f"{e} ({kept})") from None
        print(f"note: {kept}", file=sys.stderr)  # an unexpected error (e.g. out of memory) keeps its traceback
        raise
    if args.no_save:
        print("  not saved (--no-save)")
    elif datasets:
        print(f"  perplexities recorded in {out / MANIFEST}")
    return 0
