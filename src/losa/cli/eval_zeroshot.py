"""``losa eval zeroshot``: zero-shot accuracy through lm-evaluation-harness (offline task files or hub)."""

from __future__ import annotations

import argparse

from losa.cli.common import add_data_dir_arg, add_model_arg, add_quiet_arg, check_model_arg
from losa.errors import LosaError


def register(sub: argparse._SubParsersAction) -> None:
    from losa.eval.zeroshot import DEFAULT_TASKS

    p = sub.add_parser(
        "zeroshot", help="zero-shot accuracy (BoolQ, RTE, HellaSwag, WinoGrande, ARC, OBQA, PIQA) via lm-eval",
        description="Scores the model with lm-evaluation-harness (acc and acc_norm as lm-eval defines them). "
                    "With --data-dir / LOSA_DATA_DIR the tasks read the local files (same prompts as "
                    "lm-eval's tasks); otherwise lm-eval's own tasks download their datasets.")
    add_model_arg(p)
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated task names or 'all' (default: {','.join(DEFAULT_TASKS)})")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate a fixed random subset of N documents per task, drawn with --seed (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subsets and of lm-eval (default: 0)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--offline", dest="offline", action="store_const", const=True, default="auto",
                      help="always use the local task files (default: when a data dir is set)")
    mode.add_argument("--online", dest="offline", action="store_const", const=False,
                      help="use lm-eval's own tasks and hub datasets")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", help="write the results (scores, subsets, settings) to this JSON file")
    add_data_dir_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import losa
    from losa.eval.zeroshot import (
        check_local_tasks,
        format_table,
        parse_tasks,
        progress_disabled,
        run_zeroshot,
        save_result,
        use_local_tasks,
    )
    from losa.utils.device import resolve_device
    from losa.utils.io import check_output_file

    tasks = parse_tasks(args.tasks)
    if args.batch_size < 1:  # bad flags and a missing task file fail before loading the model
        raise LosaError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    if args.out:
        check_output_file(args.out, "--out")
    check_model_arg(args.model)
    if use_local_tasks(args.offline, args.data_dir):
        check_local_tasks(tasks, args.data_dir)
    with progress_disabled(args.quiet):
        model, tok = losa.load_model(args.model, dtype=args.dtype)
    model.to(device)
    result = run_zeroshot(model, tok, tasks, limit=args.limit, data_dir=args.data_dir, batch_size=args.batch_size,
                          seed=args.seed, offline=args.offline, quiet=args.quiet)
    print(format_table(result))
    if args.out:
        print(f"results written to {save_result(result, args.out)}")
    return 0
