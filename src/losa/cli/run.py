"""``losa run``: the full LoSA schedule (prune + sparse LoRA, T steps), resumable, with report.json."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from losa.cli.common import (
    add_calibration_args,
    add_data_dir_arg,
    add_model_arg,
    add_quiet_arg,
    data_available,
)
from losa.config import build_config, load_recipe

#: flag dest -> LoSAConfig field (top level)
_FIELDS = ("method", "sparsity", "nm", "nm_max_pairs", "steps", "allocator", "rmi_features", "beta", "delta", "omega_first",
           "omega_last", "r_min", "r_max", "lora_alpha", "calib", "nsamples", "seqlen", "calib_batch_size",
           "stats_precision", "recon_nsamples", "finetune_data", "max_examples", "seed", "data_dir", "device")
#: flag dest -> LoSAConfig.finetune field
_FT_FIELDS = {"lr": "lr", "epochs": "epochs", "batch_size": "batch_size", "max_length": "max_length",
              "grad_accum": "grad_accum"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="LoSA: dynamic pruning + sparse LoRA with RMI sparsity and rank allocation",
                       description="Prune in T steps with a cubic schedule, allocating layer-wise sparsity by RMI "
                                   "(linear CKA) and LoRA ranks by reconstruction error; fine-tune masked adapters "
                                   "between steps; merge them exactly at the end. Writes report.json per step.")
    add_model_arg(p)
    p.add_argument("--recipe", help="YAML file of LoSAConfig fields (nested 'finetune:' mapping); flags override it")
    g = p.add_argument_group("pruning")
    g.add_argument("--method", help="wanda | sparsegpt | magnitude (default: wanda)")
    g.add_argument("--sparsity", type=float, help="final unstructured sparsity S (default: 0.5)")
    g.add_argument("--nm", help="final N:M pattern, e.g. 2:4 (every step prunes to it)")
    g.add_argument("--mixed-nm", action="store_true", default=None, help="per-layer N with the mean of --nm")
    g.add_argument("--nm-max-pairs", type=int,
                   help="mixed N:M: layer pairs whose N moves by +-1 (default: as many as keep the mean sparsity "
                        "deviation within delta; -1: no cap)")
    g.add_argument("--steps", type=int, help="T, prune/fine-tune steps (default: 5; 1 = no dynamic schedule)")
    g.add_argument("--allocator", help="layer-wise sparsity: rmi | owl | uniform (default: rmi)")
    g.add_argument("--no-layerwise-sparsity", dest="layerwise_sparsity", action="store_false", default=None,
                   help="ablation: uniform sparsity over layers")
    g.add_argument("--rmi-features", help="inputs | outputs of each layer for CKA (default: inputs)")
    g.add_argument("--beta", type=float, help="RMI importance temperature (default: 1.0)")
    g.add_argument("--delta", type=float, help="per-layer sparsity band ±delta (default: official schedule)")
    r = p.add_argument_group("ranks")
    r.add_argument("--no-rank-allocation", dest="rank_allocation", action="store_false", default=None,
                   help="ablation: every layer gets rank Omega_t")
    r.add_argument("--omega-first", type=float, help="mean rank at step 1 (default: 6)")
    r.add_argument("--omega-last", type=float, help="mean rank at step T (default: 10)")
    r.add_argument("--r-min", type=int, help="minimum rank per layer (default: 2)")
    r.add_argument("--r-max", type=int, help="adapter capacity / maximum rank (default: 16)")
    r.add_argument("--lora-alpha", type=float, help="LoRA alpha; scale = alpha / r_max (default: 16)")
    c = p.add_argument_group("calibration")
    add_calibration_args(c)
    c.add_argument("--recon-nsamples", type=int, help="windows for reconstruction errors (default: 16)")
    f = p.add_argument_group("fine-tuning")
    f.add_argument("--finetune-data", help="Alpaca/plain-text .json/.jsonl (or hub dataset); omit for none")
    f.add_argument("--max-examples", type=int, help="use at most this many fine-tuning examples")
    f.add_argument("--lr", type=float, help="AdamW learning rate (default: 2e-4)")
    f.add_argument("--epochs", type=float, help="epochs over each step's data slice (default: 1)")
    f.add_argument("--batch-size", type=int, help="per-device batch size (default: 4)")
    f.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default: 1)")
    f.add_argument("--max-length", type=int, help="max tokens per example (default: 256)")
    f.add_argument("--gradient-checkpointing", action="store_true", default=None)
    f.add_argument("--distill", action="store_true", default=None,
                   help="train on KL to the dense model's logits (no labels needed)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: auto)")
    add_data_dir_arg(p)
    p.add_argument("--out", help="run directory (state/, report.json, model/) (default: runs/<model>-losa)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished step")
    p.add_argument("--eval", default=None, help="perplexity datasets after the run, comma-separated (default: "
                                                "wikitext2 when a data dir is set); 'none' to skip")
    p.add_argument("--eval-seqlen", type=int, default=None, help="perplexity window length (default: --seqlen)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--no-save", action="store_true", help="do not write the merged model to <out>/model")
    add_quiet_arg(p)
    p.set_defaults(func=run_losa)


def config_from_args(args: argparse.Namespace):
    from losa.runner.config import LoSAConfig

    values: dict[str, Any] = load_recipe(args.recipe) if args.recipe else {}
    for name in (*_FIELDS, "mixed_nm", "layerwise_sparsity", "rank_allocation"):
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    ft = dict(values.get("finetune") or {})
    for dest, field in _FT_FIELDS.items():
        v = getattr(args, dest, None)
        if v is not None:
            ft[field] = v
    for flag in ("gradient_checkpointing", "distill"):
        if getattr(args, flag, None):
            ft[flag] = True
    values["finetune"] = ft
    if "calib" not in values:
        values["calib"] = "c4" if data_available(values.get("data_dir")) else "self"
    return build_config(LoSAConfig, values)


def run_losa(args: argparse.Namespace) -> int:
    import losa
    from losa.eval.ppl import perplexity
    from losa.report.schema import save_report
    from losa.runner.run import run

    cfg = config_from_args(args)
    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.model).name.removesuffix('.gguf')}-losa"
    progress = not args.quiet
    print(f"losa run: {args.model} | {cfg.method} S={cfg.target_sparsity:.2f} T={cfg.steps} allocator="
          f"{cfg.effective_allocator} ranks={'allocated' if cfg.rank_allocation else 'uniform'} -> {out}")
    model, tok = losa.load_model(args.model, dtype=args.dtype)
    report = run(model, tok, cfg, out_dir=out, resume=args.resume, progress=progress, model_name=args.model)
    for s in report.steps:
        print(f"  step {s.step}: S_t={s.target_sparsity:.4f} ranks sum={sum(s.ranks or [])} "
              f"final train loss={s.train_loss[-1] if s.train_loss else float('nan'):.4f} ({s.wall_time_s:.1f}s)")
    print(f"  verified: merged model sparsity {report.results.sparsity:.4f} (target {cfg.target_sparsity:.4f})")
    evals = args.eval if args.eval is not None else ("wikitext2" if data_available(cfg.data_dir) else "none")
    for d in [] if evals == "none" else [x.strip() for x in evals.split(",") if x.strip()]:
        ppl = perplexity(model, tok, d, seqlen=args.eval_seqlen or cfg.seqlen, max_windows=args.max_windows,
                         data_dir=cfg.data_dir, progress=progress)
        report.results.ppl[d] = float(ppl)
        print(f"  {d} perplexity: {ppl:.3f}")
    save_report(report, out)
    if not args.no_save:
        losa.save_checkpoint(model, tok, out / "model", {"source_model": args.model, "recipe": cfg.model_dump(),
                                                         "results": {"ppl": report.results.ppl}}, overwrite=True)
        print(f"  saved merged model to {out / 'model'}")
    return 0
