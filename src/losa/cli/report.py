"""``losa report RUN_DIR`` and ``losa compare RUN_DIR...``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write report.md and a self-contained report.html for a run directory",
                       description="Reads RUN_DIR/report.json (a LoSA run) or RUN_DIR/losa.json (+ zeroshot.json) "
                                   "and writes figures, tables, report.md and report.html.")
    p.add_argument("run_dir", help="directory written by losa run or losa prune")
    p.add_argument("--out-dir", help="where to write the report (default: RUN_DIR)")
    p.set_defaults(func=run_report)

    c = sub.add_parser("compare", help="paper-style table of several runs (markdown and CSV)",
                       description="Rows: Dense, then method / +LoRA / +LoSA per sparsity; columns: WikiText-2 "
                                   "perplexity, zero-shot accuracy per task and the mean.")
    c.add_argument("run_dirs", nargs="+", help="run directories (report.json or losa.json)")
    c.add_argument("--metric", choices=("acc", "acc_norm"), default="acc",
                   help="zero-shot metric (acc_norm falls back to acc where a task has none; default: acc)")
    c.add_argument("--out-md", help="write the markdown table here (default: print it)")
    c.add_argument("--out-csv", help="write the CSV table here")
    c.set_defaults(func=run_compare)


def run_report(args: argparse.Namespace) -> int:
    from losa.report.render import write_report
    from losa.utils.io import check_output_dir

    check_output_dir(args.out_dir or args.run_dir, "--out-dir" if args.out_dir else "RUN_DIR (the default --out-dir)",
                     exists_ok=True)
    md, html = write_report(args.run_dir, args.out_dir)
    print(f"wrote {md} and {html}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from losa.report.tables import compare
    from losa.utils.io import atomic_write_text, check_output_file

    for path, flag in ((args.out_md, "--out-md"), (args.out_csv, "--out-csv")):
        if path:
            check_output_file(path, flag)
    md, csv_text = compare(args.run_dirs, metric=args.metric)
    if args.out_md:
        atomic_write_text(args.out_md, md)
        print(f"wrote {args.out_md}")
    else:
        print(md, end="")
    if args.out_csv:
        atomic_write_text(args.out_csv, csv_text)
        print(f"wrote {args.out_csv}")
    return 0
