"""LoSA distillation from a dense teacher in memory vs from its cached top-k distributions (SmolLM2-135M).

Both variants run LoSA(Wanda) at the same target sparsity on the same fine-tuning examples (same tokens,
same hyper-parameters, KL to the dense model on every token); they differ only in the teacher:

- ``full-logit``: ``teacher_topk = 0``, a second copy of the dense model computes full logits every batch;
- ``topk``: ``teacher_topk = k`` (default 64), the dense model's top-k log-probabilities computed once
  before pruning (layer-sequential) and read from the run directory; no second model in memory.

Each variant runs in its own subprocess, so its peak RSS (VmHWM) and wall time are its own. Perplexity:
WikiText-2 test, the first ``--eval-windows`` windows of ``--eval-seqlen`` tokens. Rows are appended to a
JSONL file with their provenance as they finish and the Markdown table is rendered after each one.

    python benchmarks/bench_teacher_cache.py --data-dir ../shared/data --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _provenance import SMOLLM2, provenance
from _rows import append_jsonl, read_jsonl
from _rss import peak_rss_mb

from losa.utils.io import atomic_write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
VARIANTS = ["full-logit", "topk"]


def _data_dir(args) -> str:
    return args.data_dir or os.environ.get("LOSA_DATA_DIR") or str(HERE.parent.parent / "shared" / "data")


def _config(args, variant: str):
    from losa.pipelines.losa.config import LoSAConfig

    return LoSAConfig(
        method="wanda", sparsity=args.sparsity, steps=args.steps, calib="c4", nsamples=args.nsamples,
        seqlen=args.seqlen, recon_nsamples=args.recon_nsamples,
        finetune_data=str(Path(_data_dir(args)) / "alpaca" / "alpaca_data_random_9k.json"),
        max_examples=args.ft_examples, data_dir=_data_dir(args), device="cpu", seed=0,
        finetune={"lr": args.lr, "batch_size": args.batch_size, "max_length": args.ft_max_length, "distill": True,
                  "teacher_topk": args.k if variant == "topk" else 0})


def run_single(args) -> dict:
    """One variant in this process; returns its result row."""
    import torch

    import losa
    from losa.eval.ppl import perplexity
    from losa.pipelines.losa.loop import prepare_finetune_examples, run

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    variant = args.single
    argv = sys.argv[:sys.argv.index("--single")] if "--single" in sys.argv else sys.argv
    prov = provenance(torch.get_num_threads(), SMOLLM2, argv)  # at the start: the code this run imports
    cfg = _config(args, variant)
    t0 = time.perf_counter()
    model, tok = losa.load_model("smollm2-135m")
    with tempfile.TemporaryDirectory(prefix="bench-teacher-") as out:
        rep = run(model, tok, cfg, out_dir=out, progress=False, model_name="smollm2-135m")
        details = json.loads((Path(out) / "details.json").read_text())
        left_behind = (Path(out) / "teacher_topk").exists()
    wall = time.perf_counter() - t0
    examples = prepare_finetune_examples(tok, cfg, cfg.seed + 1)
    tokens = sum(len(e["input_ids"]) for e in examples)
    ppl = perplexity(model, tok, "wikitext2", seqlen=args.eval_seqlen, max_windows=args.eval_windows,
                     data_dir=_data_dir(args), progress=False)
    k = cfg.finetune.teacher_topk
    return {"variant": variant, "k": k or None, "sparsity_target": args.sparsity, "ppl": float(ppl),
            "sparsity": float(rep.results.sparsity), "finetune_tokens": tokens,
            # indices int32 + log-probs float32 per cached position and id, plus int64 offsets
            "cache_mib": round((tokens * k * 8 + 8 * (len(examples) + 1)) / 2**20, 1) if k else None,
            "teacher_cache_s": round(details.get("teacher_topk_s", 0.0), 1) if k else None,
            "cache_left_behind": left_behind, "wall_s": round(wall, 1),
            "train_loss_last": [s.train_loss[-1] if s.train_loss else None for s in rep.steps],
            "eval_windows": args.eval_windows, "eval_seqlen": args.eval_seqlen,
            "peak_rss_mib": round(peak_rss_mb()), **prov}


def render(rows: list[dict], args, path: Path) -> None:
    """Write the Markdown table of ``rows`` (with each row's provenance) to ``path``."""
    lines = [
        f"# LoSA distillation: dense teacher in memory vs cached top-k ({SMOLLM2}, CPU)",
        "",
        "float32, no GPU. Settings of the last command:",
        "",
        f"- LoSA(Wanda) at {args.sparsity:.0%}, T = {args.steps} steps; calibration: C4 train, {args.nsamples} windows "
        f"× {args.seqlen} tokens, seed 0; reconstruction errors on the first {args.recon_nsamples} windows.",
        f"- Fine-tuning: the same {args.ft_examples} Alpaca examples (`alpaca_data_random_9k.json`, seeded shuffle, "
        f"≤ {args.ft_max_length} tokens) for both variants, loss: KL to the dense model's next-token distribution on "
        f"every token (T = 1), 1 epoch, AdamW lr {args.lr}, batch {args.batch_size}.",
        "- full-logit: a second copy of the dense model computes full logits for every batch (`teacher_topk = 0`). "
        "topk: the dense model's top-k log-probabilities, computed once before pruning and stored in the run "
        "directory (tokens × k × 8 bytes), loss = KL on the k-token support (student log-softmax over the full "
        "vocabulary, not renormalised); no teacher model in memory.",
        f"- Perplexity: WikiText-2 test, first {args.eval_windows} windows of {args.eval_seqlen} tokens.",
        "- wall s: model load + LoSA (teacher cache, calibration, pruning, fine-tuning), excluding the perplexity "
        "eval; peak RSS: VmHWM of the variant's own process.",
        "",
        *[f"- {n}" for n in args.note],
        "",
        "| variant | k | WikiText-2 ppl | sparsity | FT tokens | cache MiB | cache s | wall s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["sparsity_target"], VARIANTS.index(r["variant"]), r["k"] or 0)):
        lines.append(f"| {r['variant']} | {r['k'] or ''} | {r['ppl']:.2f} | {r['sparsity']:.4f} | {r['finetune_tokens']} "
                     f"| {r['cache_mib'] or ''} | {r['teacher_cache_s'] or ''} | {r['wall_s']} | {r['peak_rss_mib']} |")
    lines += ["", "Provenance per row (date, commit, threads, CPU / ISA, model, command):", ""]
    lines += [f"- {r['variant']}" + (f" k={r['k']}" if r["k"] else "") + f": {r['date']}, {r['commit']}, "
              f"{r['threads']} threads, {r['cpu']} ({r['isa']}), {r['model']}; `{r['command']}`" for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--k", type=int, default=64, help="teacher_topk of the topk variant")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--recon-nsamples", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--ft-examples", type=int, default=256)
    ap.add_argument("--ft-max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per variant process (0: torch's default)")
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(RESULTS / "teacher_cache.jsonl"))
    ap.add_argument("--note", action="append", default=[], help="a line for the results file (repeatable)")
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from the .jsonl and exit")
    ap.add_argument("--single", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single:
        print("RESULT " + json.dumps(run_single(args)), flush=True)
        return
    out = Path(args.out)
    rows = read_jsonl(out) if out.is_file() else []
    if args.render_only:
        render(rows, args, out.with_suffix(".md"))
        return
    passthrough = list(sys.argv[1:])
    for v in args.variants:
        print(f"== {v}", flush=True)
        proc = subprocess.run([sys.executable, __file__, *passthrough, "--single", v], capture_output=True, text=True)
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
