"""``losa eval``: perplexity (``ppl``) and zero-shot tasks (``zeroshot``)."""

from __future__ import annotations

import argparse
import importlib

from losa.cli.common import (
    add_data_dir_arg,
    add_model_arg,
    add_offload_args,
    add_quiet_arg,
    check_model_arg,
    check_window_flags,
    offload_kwargs,
    offload_note,
    recorded_data_dir,
)
from losa.data.sources import check_eval_datasets, fetch_eval_datasets
from losa.errors import LosaError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: perplexity or zero-shot tasks")
    esub = p.add_subparsers(dest="eval_command", metavar="KIND")
    pp = esub.add_parser("ppl", help="perplexity on wikitext2 / c4 / ptb or a local text file",
                         description="Standard protocol: join the test rows, tokenize once, non-overlapping "
                                     "windows of --seqlen, exp(mean token NLL).")
    add_model_arg(pp)
    add_offload_args(pp)
    pp.add_argument("--datasets", default="wikitext2", help="comma-separated: wikitext2, c4, ptb or file paths")
    pp.add_argument("--seqlen", type=int, default=2048, help="window length (default: 2048)")
    pp.add_argument("--max-windows", type=int, default=None, help="only the first N windows")
    pp.add_argument("--batch-size", type=int, default=1, help="windows per forward (default: 1)")
    pp.add_argument("--device", default="auto", help="auto | cpu | cuda")
    pp.add_argument("--out", help="write the results to this JSON file")
    add_data_dir_arg(pp)
    next(a for a in pp._actions if a.dest == "data_dir").help = (
        "directory with wikitext-2-raw/, c4/, ptb/ ... (default: $LOSA_DATA_DIR, else the one a losa checkpoint "
        "recorded when it holds the datasets, else the HF hub)")
    add_quiet_arg(pp)
    pp.set_defaults(func=run_ppl)
    try:
        importlib.import_module("losa.cli.eval_zeroshot").register(esub)
    except ModuleNotFoundError as e:
        if e.name != "losa.cli.eval_zeroshot":
            raise
    p.set_defaults(func=lambda a: (p.print_help(), 1)[1])


def run_ppl(args: argparse.Namespace) -> int:
    import losa
    from losa.eval.ppl import perplexity
    from losa.utils.device import resolve_device
    from losa.utils.io import atomic_write_json, check_output_file

    if args.batch_size < 1:  # bad flags fail before loading the model
        raise LosaError(f"--batch-size {args.batch_size} must be at least 1")
    check_window_flags(args.seqlen, "--seqlen", args.max_windows)
    datasets = [x.strip() for x in args.datasets.split(",") if x.strip()]
    if not datasets:
        raise LosaError("--datasets is empty; name at least one of wikitext2, c4, ptb or a text file")
    recorded_data_dir(args, datasets)
    check_eval_datasets(datasets, args.data_dir, "--datasets")
    device = resolve_device(args.device)
    if args.out:
        check_output_file(args.out, "--out")
    check_model_arg(args.model)
    fetch_eval_datasets(datasets, args.data_dir, "--datasets")
    offload = offload_kwargs(args)
    model, tok = losa.load_model(args.model, dtype=args.dtype, **offload)
    if (note := offload_note(model, args)) is not None:
        print(note)
    else:  # accelerate placed an offloaded model's layers
        model.to(device)
    results = {}
    for d in datasets:
        r = perplexity(model, tok, d, seqlen=args.seqlen, max_windows=args.max_windows, batch_size=args.batch_size,
                       data_dir=args.data_dir, progress=not args.quiet, return_details=True)
        results[d] = r.as_dict()
        print(f"{d}: perplexity {r.ppl:.4f} ({r.windows} windows x {r.seqlen} tokens)")
    if args.out:
        atomic_write_json(args.out, {"model": args.model, "perplexity": results})
    return 0
