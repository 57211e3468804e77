"""LoSA vs one-shot pruning vs pruning + LoRA on SmolLM2-135M (CPU-sized; see the results file).

Every fine-tuned variant sees the same examples (same tokens, same hyper-parameters); LoSA spreads
them over its T steps. Perplexity: WikiText-2 test, the first ``--eval-windows`` windows of
``--eval-seqlen`` tokens (the same windows for every variant). Each variant runs in its own
subprocess so wall time and peak RSS are its own. Results are appended to a JSONL file as they
finish and the Markdown table is regenerated after each one.

    python benchmarks/bench_losa.py --sparsities 0.7 0.6 --variants wanda wanda+masked-lora losa-wanda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _provenance import SMOLLM2, provenance
from _rows import append_jsonl, read_jsonl
from _rss import peak_rss_mb

from losa.utils.io import atomic_write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ALL_VARIANTS = ["dense", "wanda", "sparsegpt", "wanda+owl", "wanda+atp", "wanda+rmi", "wanda+lora",
                "wanda+masked-lora", "losa-wanda", "losa-sparsegpt", "losa-no-lsr", "losa-no-sra", "losa-no-dsa",
                "losa-nm-uncapped"]
#: training-free layer-wise allocations of Wanda (no fine-tuning): OWL and RMI through one LoSA step without
#: data, ATP through losa.prune's allocator (beta by grid search on the calibration loss)
TRAINING_FREE = ("wanda+owl", "wanda+rmi")


def _data_dir(args) -> str:
    return args.data_dir or os.environ.get("LOSA_DATA_DIR") or str(HERE.parent.parent / "shared" / "data")


def _losa_config(args, variant: str, target: str):
    from losa.pipelines.losa.config import LoSAConfig

    kw = dict(method="sparsegpt" if variant == "losa-sparsegpt" else "wanda", steps=args.steps,
              calib="c4", nsamples=args.nsamples, seqlen=args.seqlen, recon_nsamples=args.recon_nsamples,
              finetune_data=str(Path(_data_dir(args)) / "alpaca" / "alpaca_data_random_9k.json"),
              max_examples=args.ft_examples, data_dir=_data_dir(args), device="cpu", seed=0,
              recon_error=args.recon_error,
              finetune={"lr": args.lr, "batch_size": args.batch_size, "max_length": args.ft_max_length,
                        "distill": args.distill})
    if target.startswith("nm"):
        kw.update(nm=target[2:], mixed_nm=variant != "wanda+masked-lora")
    else:
        kw["sparsity"] = float(target)
    if variant in TRAINING_FREE:  # one step straight to S, the allocator's per-layer sparsity, no fine-tuning
        kw.update(steps=1, allocator="owl" if variant == "wanda+owl" else "rmi", finetune_data=None,
                  max_examples=None, finetune={"distill": False})
    elif variant == "wanda+masked-lora":  # one-shot Wanda + masked LoRA at uniform rank, merged
        kw.update(steps=1, layerwise_sparsity=False, rank_allocation=False, omega_first=args.rank,
                  omega_last=args.rank)
    elif variant == "losa-no-lsr":
        kw["layerwise_sparsity"] = False
    elif variant == "losa-no-sra":
        kw["rank_allocation"] = False
    elif variant == "losa-no-dsa":
        kw["steps"] = 1
    elif variant == "losa-nm-uncapped":  # mixed N:M with every layer free to move N by ±1
        kw["nm_max_pairs"] = -1
    return LoSAConfig(**kw)


def run_single(args) -> dict:
    """One (variant, target) in this process; returns its result row."""
    import torch

    import losa
    from losa.eval.ppl import perplexity
    from losa.export.verify import sparsity_report

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    argv = [a for a in sys.argv[:sys.argv.index("--single")]] if "--single" in sys.argv else sys.argv
    prov = provenance(torch.get_num_threads(), SMOLLM2, argv)  # at the start: the code this run imports
    variant, target = args.single
    t0 = time.perf_counter()
    model, tok = losa.load_model("smollm2-135m")
    extra: dict = {}
    tokens = 0
    if variant in ("wanda", "sparsegpt", "wanda+lora", "wanda+atp"):
        pc = {"method": "sparsegpt" if variant == "sparsegpt" else "wanda", "calib": "c4", "nsamples": args.nsamples,
              "seqlen": args.seqlen, "data_dir": _data_dir(args)}
        if variant == "wanda+atp":
            pc["allocator"] = "atp"
        pc.update({"nm": target[2:]} if target.startswith("nm") else {"sparsity": float(target)})
        prep = losa.prune(model, tok, losa.PruneConfig(**pc), progress=False)
        if prep.allocation:
            extra["allocation"] = prep.allocation
        if variant == "wanda+lora":  # ordinary dense LoRA (PEFT), kept unmerged
            from peft import LoraConfig, get_peft_model

            from losa.finetune.train import finetune
            from losa.pipelines.losa.loop import prepare_finetune_examples

            cfg = _losa_config(args, variant, target)
            examples = prepare_finetune_examples(tok, cfg, cfg.seed + 1)
            teacher = losa.load_model("smollm2-135m")[0].eval().requires_grad_(False) if args.distill else None
            # the masked adapters' scale alpha / r_max, so both adapters start from the same step size
            alpha = args.rank * cfg.lora_alpha / cfg.r_max
            extra["lora_scale"] = alpha / args.rank
            model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=[
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
            res = finetune(model, examples, cfg.finetune, tok.pad_token_id or tok.eos_token_id, teacher=teacher)
            tokens = res["tokens"]
            extra["train_loss"] = res["train_loss"]
            sparsity = sparsity_report(model.get_base_model()).overall
            extra["note"] = "sparsity of the base weights; the dense adapter is not merged"
        else:
            sparsity = sparsity_report(model).overall
    elif variant == "dense":
        sparsity = 0.0
    else:
        from losa.pipelines.losa.loop import run

        cfg = _losa_config(args, variant, target)
        rep = run(model, tok, cfg, progress=False, model_name="smollm2-135m")
        sparsity = rep.results.sparsity
        extra["train_loss_last"] = [s.train_loss[-1] if s.train_loss else None for s in rep.steps]
        extra["ranks_last_step"] = rep.steps[-1].ranks
        extra["layer_sparsity"] = rep.steps[-1].layer_target_sparsity
        tokens = None  # filled below from the shared example set
        from losa.pipelines.losa.loop import prepare_finetune_examples

        tokens = sum(len(e["input_ids"]) for e in prepare_finetune_examples(tok, cfg, cfg.seed + 1))
    t_train = time.perf_counter() - t0
    ppl = perplexity(model, tok, "wikitext2", seqlen=args.eval_seqlen, max_windows=args.eval_windows,
                     data_dir=_data_dir(args), progress=False)
    if variant.startswith("losa"):
        extra["recon_error"] = args.recon_error
    if args.save_dir:  # for later evaluations (zero-shot); a PEFT adapter is merged for that
        save = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        dest = Path(args.save_dir) / f"{variant}@{target}"
        save.save_pretrained(dest)
        tok.save_pretrained(dest)
        extra["saved_to"] = str(dest)
    return {"variant": variant, "target": target, "ppl": float(ppl), "sparsity": float(sparsity),
            "finetune_tokens": tokens, "wall_s": round(t_train, 1), "eval_windows": args.eval_windows,
            "eval_seqlen": args.eval_seqlen, "peak_rss_mib": round(peak_rss_mb()), **extra, **prov}


def render(rows: list[dict], args, path: Path) -> None:
    dense = next((r["ppl"] for r in rows if r["variant"] == "dense"), None)
    lines = [
        f"# LoSA benchmark: {SMOLLM2}, on CPU",
        "",
        "float32, no GPU. Each row's date, commit, command, threads and CPU model / ISA are listed under the table "
        "(rows without them predate per-row provenance). Settings of the last command:",
        "",
        f"- Calibration: C4 train (`shared/data/c4/c4_train_part0.jsonl`), {args.nsamples} windows × {args.seqlen} "
        f"tokens, seed 0; reconstruction errors on the first {args.recon_nsamples} windows.",
        f"- Fine-tuning: the same {args.ft_examples} Alpaca examples (`alpaca_data_random_9k.json`, seeded shuffle, "
        f"≤ {args.ft_max_length} tokens each, "
        + ("loss: KL to the dense model's next-token distribution on every token" if args.distill
           else "loss on responses")
        + ") for every fine-tuned variant, 1 epoch, AdamW "
        f"lr {args.lr}, batch {args.batch_size}; LoSA splits them over its T = {args.steps} steps. Token budget "
        "per variant in the table.",
        f"- Ranks: LoRA / masked LoRA rank {args.rank}; LoSA Ω 6 → 10 (mean 8), r ∈ [2, 16].",
        f"- Perplexity: WikiText-2 test, first {args.eval_windows} windows of {args.eval_seqlen} tokens (the same "
        "windows for all rows).",
        "- Sparsity: verified sparsity of the prunable decoder linears of the final (merged) model.",
        "- wall s: model load + calibration + pruning + fine-tuning (LoSA: all T steps), excluding the perplexity "
        "eval; peak RSS: the variant's own process.",
        "",
        *[f"- {n}" for n in args.note],
        "",
        "| target | variant | WikiText-2 ppl | log-gap closed vs Wanda | sparsity | FT tokens | wall s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    import math

    order = {v: i for i, v in enumerate(ALL_VARIANTS)}
    rows = sorted(rows, key=lambda r: (float(r["target"]) if r["target"][:1].isdigit() else 9.0,
                                       order.get(r["variant"], 99)))
    for r in rows:
        wanda = next((x["ppl"] for x in rows if x["variant"] == "wanda" and x["target"] == r["target"]), None)
        gap = ""
        if dense and wanda and r["variant"] not in ("dense", "wanda") and wanda > dense:
            gap = f"{(math.log(wanda) - math.log(r['ppl'])) / (math.log(wanda) - math.log(dense)):.2f}"
        label = r["variant"] + (f" (recon {r['recon_error']})" if r.get("recon_error", "global") != "global" else "")
        lines.append(f"| {r['target']} | {label} | {r['ppl']:.2f} | {gap} | {r['sparsity']:.4f} | "
                     f"{r.get('finetune_tokens') or ''} | {r['wall_s']} | {r['peak_rss_mib']} |")
    prov = [r for r in rows if "commit" in r]
    if prov:
        lines += ["", "Provenance per row (date, commit, threads, CPU / ISA, model, command):", ""]
        lines += [f"- {r['variant']} @ {r['target']}" + (f" recon {r['recon_error']}" if r.get("recon_error") else "")
                  + f": {r['date']}, {r['commit']}, {r['threads']} threads, {r['cpu']} ({r['isa']}), {r['model']}; "
                    f"`{r['command']}`" for r in prov]
    if any(r["variant"] == "wanda+lora" for r in rows):
        lines += ["", "wanda+lora: the dense LoRA adapter stays unmerged (PEFT), so its sparsity column counts the "
                      "adapter's dense lora_A/lora_B linears as well; the pruned base weights are at the target. Rows "
                      "with `lora_scale` in the JSONL use the masked adapters' scale (LoSA's lora_alpha / r_max); "
                      "older rows used PEFT alpha 16 at rank 8 (scale 2)."]
    atomic_write_text(path, "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsities", nargs="+", default=["0.7"], help="floats, or nmN:M for (mixed) N:M")
    ap.add_argument("--variants", nargs="+", default=ALL_VARIANTS, choices=ALL_VARIANTS)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--recon-nsamples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--ft-examples", type=int, default=160)
    ap.add_argument("--ft-max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--distill", action="store_true",
                    help="fine-tune every variant on KL to the dense model's logits (all tokens) instead of labels")
    ap.add_argument("--recon-error", choices=("global", "channel"), default="global",
                    help="LoSA's reconstruction-error definition (LoSAConfig.recon_error)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per variant process (0: torch's default)")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(RESULTS / "losa.jsonl"))
    ap.add_argument("--save-dir", default=None, help="save each variant's final model under DIR/<variant>@<target>")
    ap.add_argument("--note", action="append", default=[], help="a line for the results file (repeatable)")
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from the .jsonl and exit")
    ap.add_argument("--single", nargs=2, metavar=("VARIANT", "TARGET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single:
        print("RESULT " + json.dumps(run_single(args)), flush=True)
        return
    out = Path(args.out)
    rows = read_jsonl(out) if out.is_file() else []
    if args.render_only:
        render(rows, args, out.with_suffix(".md"))
        return
    def key(variant: str, target: str, recon: str | None) -> tuple:
        return variant, target, recon if variant.startswith("losa") else None

    done = {key(r["variant"], r["target"], r.get("recon_error", "global")) for r in rows}
    jobs = [("dense", "0")] if "dense" in args.variants else []
    jobs += [(v, t) for t in args.sparsities for v in args.variants if v != "dense"]
    passthrough = list(sys.argv[1:])
    for v, t in jobs:
        if key(v, t, args.recon_error) in done:
            continue
        print(f"== {v} @ {t}", flush=True)
        proc = subprocess.run([sys.executable, __file__, *passthrough, "--single", v, t], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(proc.stderr[-3000:], flush=True)
            continue
        row = json.loads(line[len("RESULT "):])
        print(row, flush=True)
        rows.append(row)
        append_jsonl(out, [row])
        render(rows, args, out.with_suffix(".md"))


if __name__ == "__main__":
    main()
