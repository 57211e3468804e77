"""Issue 2 benchmark: one-shot pruning of SmolLM2-135M with losa vs llm-compressor.

Setting: calibration = 16 x 512 C4-train windows (seed 0, the same tensor for both tools); evaluation =
WikiText-2 test perplexity at seqlen 512 on the first ``--eval-windows`` windows (and the full test set
for the dense model with ``--full-dense``). Each pruning run is its own process, so its wall time and
peak RSS are its own. Both tools' pruned weights are evaluated by the same code.

Run:  python benchmarks/bench_prune.py --data-dir ../shared/data --llmc-python /path/to/venv/bin/python
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import losa
from losa.eval.ppl import perplexity
from losa.models.loading import cache_dir
from losa.pruning.masks import parse_nm
from losa.utils.io import atomic_write_json, atomic_write_text

HERE = Path(__file__).resolve().parent
TARGETS = ["0.5", "0.6", "0.7", "2:4"]


def worker(python: str, script: str, method: str, target: str, calib: Path, model_dir: Path, out: Path,
           *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    res = subprocess.run([python, str(HERE / script), method, target, str(calib), str(model_dir), str(out), *extra],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def evaluate(model_dir: Path, out: Path, args, nm: str | None) -> dict:
    model, tok = losa.load_model(str(model_dir))
    if (out / "state.pt").is_file():  # llm-compressor result: plain state dict over the base model
        model.load_state_dict(torch.load(out / "state.pt"), strict=False)
    elif out != model_dir:
        model, _ = losa.load_model(str(out))
    ppl = perplexity(model, tok, "wikitext2", seqlen=512, max_windows=args.eval_windows, data_dir=args.data_dir,
                     progress=False)
    rep = losa.sparsity_report(model, parse_nm(nm) if nm else None)
    ok = all(m.nm_ok is not False for m in rep.modules.values())
    return {"ppl": ppl, "sparsity": rep.overall, "nm_ok": ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("LOSA_DATA_DIR", "../shared/data"))
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--llmc-python", default=None, help="python of a venv with llmcompressor (reference)")
    ap.add_argument("--full-dense", action="store_true", help="also evaluate the dense model on the full test set")
    ap.add_argument("--losa-modes", default="auto",
                    help="comma-separated PruneConfig.sequential modes to run for losa (auto, layer, module), "
                         "each optionally with :STATS_PRECISION (e.g. layer:bfloat16)")
    ap.add_argument("--out", default=str(HERE / "results" / "prune"))
    ap.add_argument("--reuse-reference", default=None,
                    help="take the llm-compressor rows from this earlier <out>.json of this script (same machine, "
                         "same settings) instead of rerunning them")
    ap.add_argument("--render-only", action="store_true", help="rewrite <out>.md from an existing <out>.json")
    args = ap.parse_args()
    if args.render_only:
        data = json.loads(Path(args.out + ".json").read_text())
        atomic_write_text(args.out + ".md", render(data["meta"], data["rows"]))
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    losa.load_model("smollm2-135m")  # make sure the safetensors cache exists
    from losa.pruning.sparsegpt import obs_kernel

    obs_kernel()  # compile the SparseGPT block kernel once (cached per machine), outside the timed runs
    model_dir = cache_dir() / "models" / "smollm2-135m"
    tmp = Path(tempfile.mkdtemp(prefix="losa-bench-"))
    _, tok = losa.load_model(str(model_dir))
    calib = losa.data.get_calibration(tok, "c4", args.nsamples, args.seqlen, seed=0, data_dir=args.data_dir)
    torch.save(calib, tmp / "calib.pt")

    reused = {}
    if args.reuse_reference:
        old = json.loads(Path(args.reuse_reference).read_text())
        reused = {(r["method"], r["target"]): dict(r, reused_from=f"{args.reuse_reference} ({old['meta']['date']})")
                  for r in old["rows"] if r["tool"] == "llm-compressor"}
    rows = []
    dense = evaluate(model_dir, model_dir, args, None)
    rows.append({"tool": "dense", "method": "-", "target": "0", **dense})
    if args.full_dense:
        model, _ = losa.load_model(str(model_dir))
        t = time.perf_counter()
        full = perplexity(model, tok, "wikitext2", seqlen=512, data_dir=args.data_dir, return_details=True,
                          progress=False)
        rows[0]["ppl_full"] = full.ppl
        rows[0]["full_windows"] = full.windows
        rows[0]["full_eval_s"] = time.perf_counter() - t
    print(json.dumps(rows[-1]), flush=True)
    for method in args.methods.split(","):
        for target in args.targets.split(","):
            nm = target if ":" in target else None
            modes = args.losa_modes.split(",") if method != "magnitude" else ["auto"]
            tools = [("losa" if mode == "auto" else f"losa ({mode})", sys.executable, "_prune_worker.py", (mode,))
                     for mode in modes if method in ("wanda", "sparsegpt") or ":" not in mode]
            if (args.llmc_python or reused) and method in ("wanda", "sparsegpt"):
                tools.append(("llm-compressor", args.llmc_python, "_llmc_worker.py", ()))
            for tool, py, script, extra in tools:
                if tool == "llm-compressor" and (method, target) in reused:
                    rows.append(reused[(method, target)])
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                out = tmp / f"{tool.replace(' ', '').replace('(', '-').replace(')', '')}-{method}-{target.replace(':', 'of')}"
                r = worker(py, script, method, target, tmp / "calib.pt", model_dir, out, *extra)
                row = {"tool": tool, "method": method, "target": target, **r}
                if "error" not in r:
                    row.update(evaluate(model_dir, out, args, nm))
                rows.append(row)
                print(json.dumps(row), flush=True)

    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "loadavg_end": os.getloadavg(),
            "torch": torch.__version__, "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "setting": {"model": "smollm2-135m", "calib": f"c4 train {args.nsamples}x{args.seqlen} seed 0",
                        "eval": f"wikitext2 test seqlen 512 first {args.eval_windows} windows"}}
    atomic_write_json(args.out + ".json", {"meta": meta, "rows": rows})
    atomic_write_text(args.out + ".md", render(meta, rows))


def _label(row: dict) -> str:
    mode = row.get("sequential")
    if not row["tool"].startswith("losa") or mode in (None, "none"):
        return row["tool"]
    prec = row.get("stats_precision", "model")
    return f"losa ({mode}{'' if prec == 'model' else f', {prec} stats'})"


def _ratio(row: dict, ref: dict | None, key: str) -> str:
    return f"{row[key] / ref[key]:.2f}" if ref and key in row and key in ref else ""


def render(meta: dict, rows: list[dict]) -> str:
    ref = {(r["method"], r["target"]): r for r in rows if r["tool"] == "llm-compressor" and "ppl" in r}
    lines = [
        "# One-shot pruning: losa vs llm-compressor (SmolLM2-135M)", "",
        f"- date: {meta['date']}; {meta['cpus']} CPUs, torch threads {meta['threads']}, torch {meta['torch']}; "
        f"load average at the end {tuple(round(x, 1) for x in meta['loadavg_end'])}",
        f"- calibration: {meta['setting']['calib']} (the same tensor for both tools)",
        f"- evaluation: {meta['setting']['eval']}",
        f"- command: `{meta['command']}`",
        "- losa rows use its defaults (`sequential: auto`, noted per row): `layer` = statistics from the unpruned "
        "layer, then a second pass to propagate (as llm-compressor; Wanda's default); `module` = one pass per layer, "
        "each linear pruned at its first call (SparseGPT's default when all windows fit one batch). SparseGPT's C++ "
        "block kernel is compiled before the timed runs. `bfloat16 stats` = `stats_precision: bfloat16`: the "
        "statistics pass runs under bf16 autocast (propagation stays float32).",
        "- wall time: the pruning call only (model loading and evaluation excluded), each run in its own process; "
        "peak RSS: that process's own high-water mark (VmHWM; `ru_maxrss` would include the parent's memory).", "",
        "| tool | method | target | ppl | sparsity | N:M ok | prune wall s | peak RSS MB | ppl / ref | time / ref | RSS / ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tool']} | {r['method']} | {r['target']} | failed: {r['error'][:80]} |||||||")
            continue
        x = ref.get((r["method"], r["target"])) if r["tool"].startswith("losa") else None
        lines.append(
            f"| {_label(r)} | {r['method']} | {r['target']} | {r['ppl']:.2f} | {r['sparsity']:.4f} | {r['nm_ok']} | "
            f"{r.get('prune_s', 0):.1f} | {r.get('peak_rss_mb', 0):.0f} | {_ratio(r, x, 'ppl')} | "
            f"{_ratio(r, x, 'prune_s')} | {_ratio(r, x, 'peak_rss_mb')} |")
    checks = []
    for r in rows:
        x = ref.get((r["method"], r["target"])) if r["tool"].startswith("losa") and "ppl" in r else None
        if x is None:
            continue
        got = {k: r[k] / x[k] for k in ("ppl", "prune_s", "peak_rss_mb") if k in r and k in x and x[k]}
        miss = [f"{name} {got[k]:.2f}x (target {lim})" for k, name, lim in
                (("ppl", "ppl", "<= 1.02x"), ("prune_s", "wall", "<= 0.5x"), ("peak_rss_mb", "RSS", "<= 1.0x"))
                if k in got and got[k] > float(lim.split()[1].rstrip("x"))]
        checks.append(f"- {_label(r)} {r['method']} {r['target']}: " + ("all targets met" if not miss else "MISSED " + "; ".join(miss)))
    if checks:
        lines += ["", "Against the issue's targets (ppl within 2 % of llm-compressor or better, wall <= 0.5x, "
                      "peak RSS no higher):", *checks]
    if any("reused_from" in r for r in rows):
        src = next(r["reused_from"] for r in rows if "reused_from" in r)
        lines += ["", f"llm-compressor rows are reused from an earlier run of this script on the same machine and "
                      f"settings: {src}. Time and RSS ratios then span two runs, and the machine's speed can differ "
                      "between them; only ratios within one run are reliable."]
    d = rows[0]
    if "ppl_full" in d:
        lines += ["", f"Dense, full WikiText-2 test set ({d['full_windows']} windows of 512): ppl {d['ppl_full']:.3f} "
                      f"({d['full_eval_s']:.0f} s)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
