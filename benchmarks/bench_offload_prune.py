"""Issue 14 proof: SmolLM2 offloaded to disk under a small memory cap prunes to the same masks as the
fully loaded model.

SmolLM2-135M (the ``smollm2-135m`` alias, safetensors cache) is pruned twice with Wanda 50 % from the
same C4 calibration tensor, each run in its own process (so its wall time and peak RSS are its own):

- ``full``: loaded entirely in memory;
- ``offload``: loaded with ``device_map="auto"``, ``max_memory={"cpu": CAP}`` and an offload folder, so
  accelerate keeps most decoder layers on disk and :func:`losa.prune` onloads one layer at a time.

Each worker saves its masks and pruned linear weights (after measuring its peak RSS); the parent counts
the mask entries and weight values that differ (expected: 0) and writes
``results/offload_prune.jsonl`` (one row per run, with provenance) and ``.md``.

Run:  python benchmarks/bench_offload_prune.py --data-dir ../shared/data   (OMP_NUM_THREADS=1)
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

import torch
from _provenance import SMOLLM2, provenance
from _rows import append_jsonl, read_jsonl
from _rss import peak_rss_mb

from losa.utils.io import atomic_write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ALIAS = "smollm2-135m"


def _model_dir() -> Path:
    """The alias's safetensors cache (converted once if missing)."""
    from losa.models.loading import cache_dir, load_model

    path = cache_dir() / "models" / ALIAS
    if not (path / "config.json").is_file():
        load_model(ALIAS)
    return path


def run_worker(args: argparse.Namespace) -> None:
    """One pruning run; prints one JSON line."""
    import losa
    from losa.models.offload import is_offloaded, onloaded
    from losa.models.registry import get_arch, get_decoder_layers, linear_modules
    from losa.pipelines.oneshot import PruneConfig, PruneVisitor

    torch.set_num_threads(args.threads)
    ids = torch.load(args.calib)
    t = time.perf_counter()
    kwargs = {}
    if args.worker == "offload":
        kwargs = dict(device_map="auto", max_memory={"cpu": args.cap}, offload_folder=str(Path(args.out) / "offload"))
    model, tok = losa.load_model(args.model_dir, **kwargs)
    load_s = time.perf_counter() - t
    layers = get_decoder_layers(model)
    placement = dict(getattr(model, "hf_device_map", {}) or {})
    if args.worker == "offload" and not is_offloaded(model):
        raise SystemExit("the model was not offloaded; lower --cap")
    cfg = PruneConfig(method="wanda", sparsity=0.5, nsamples=ids.shape[0], seqlen=ids.shape[1], device="cpu")
    visitor = PruneVisitor(cfg.pruner(), cfg.layer_targets(len(layers)), keep_masks=True)
    t = time.perf_counter()
    report = losa.prune(model, tok, cfg, calib_ids=ids, progress=False, visitor=visitor)
    prune_s = time.perf_counter() - t
    rss = peak_rss_mb()
    masks = {f"{i}.{name}": m for (i, name), m in visitor.masks.items()}
    weights = {}
    for i, layer in enumerate(layers):
        with onloaded(layer):
            for name, mod in linear_modules(layer, get_arch(model)).items():
                weights[f"{i}.{name}"] = mod.weight.detach().clone()
    torch.save({"masks": masks, "weights": weights}, Path(args.out) / "pruned.pt")
    print(json.dumps({"run": args.worker, "load_s": load_s, "prune_s": prune_s, "peak_rss_mib": rss,
                      "sparsity": report.sparsity.overall,
                      "decoder_layers_on_disk": sum(1 for k, v in placement.items()
                                                    if v == "disk" and k.startswith("model.layers.")),
                      "placement": placement}))


def _worker(args: argparse.Namespace, which: str, calib: Path, model_dir: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=os.pathsep.join(
        [str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", which, "--calib", str(calib),
           "--model-dir", str(model_dir), "--out", str(out), "--cap", args.cap, "--threads", str(args.threads)]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{which} worker failed:\n{res.stderr[-3000:]}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    row["process_wall_s"] = time.perf_counter() - t
    return row


def _differences(a: Path, b: Path) -> dict[str, int]:
    ra, rb = torch.load(a), torch.load(b)
    if ra["masks"].keys() != rb["masks"].keys():
        raise SystemExit("the two runs pruned different modules")
    masks = sum(int((ra["masks"][k] != rb["masks"][k]).sum()) for k in ra["masks"])
    weights = sum(int((ra["weights"][k] != rb["weights"][k]).sum()) for k in ra["weights"])
    return {"modules": len(ra["masks"]), "mask_entries": sum(m.numel() for m in ra["masks"].values()),
            "differing_mask_entries": masks, "differing_weight_values": weights}


def render(rows: list[dict], path: Path) -> None:
    lines = [
        "# Pruning SmolLM2 with its weights offloaded to disk (issue 14)",
        "",
        f"Model: {rows[0]['model']}. Wanda 50 %, calibration C4 train "
        f"{rows[0]['calib']}, float32, CPU. Each run is its own process; `peak RSS` is that process's VmHWM "
        "(after pruning, before the masks are saved). `full`: the whole model in memory; `offload`: loaded with "
        "`device_map=\"auto\"`, `max_memory={\"cpu\": CAP}` and an offload folder (accelerate keeps the listed "
        "number of decoder layers on disk; losa onloads one decoder layer at a time and writes the pruned "
        "weights back to the offload folder). Differences are counted against the `full` run.",
        "",
        "| run | CPU cap | decoder layers on disk | load s | prune s | peak RSS MiB | sparsity "
        "| differing mask entries | differing weight values | date | commit | threads | CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['run']} | {r['cap'] if r['run'] == 'offload' else '-'} | {r['decoder_layers_on_disk']} "
                     f"| {r['load_s']:.1f} | {r['prune_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['sparsity']:.4f} "
                     f"| {r.get('differing_mask_entries', '-')} | {r.get('differing_weight_values', '-')} "
                     f"| {r['date']} | {r['commit']} | {r['threads']} | {r['cpu']} |")
    lines += ["", f"Command: `{rows[-1]['command']}`", ""]
    atomic_write_text(path, "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("LOSA_DATA_DIR", str(HERE.parent.parent / "shared" / "data")))
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--cap", default="150MiB", help="CPU memory cap of the offloaded run (accelerate max_memory)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "offload_prune.jsonl"))
    ap.add_argument("--worker", choices=["full", "offload"], help=argparse.SUPPRESS)
    ap.add_argument("--calib", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args)
        return
    argv = [os.path.relpath(__file__), *sys.argv[1:]]
    prov = provenance(args.threads, SMOLLM2, argv)  # at the start: the code this run imports
    from transformers import AutoTokenizer

    from losa.data.calibration import get_calibration

    model_dir = _model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib = get_calibration(tok, "c4", args.nsamples, args.seqlen, seed=0, data_dir=args.data_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(calib, Path(tmp) / "calib.pt")
        for which in ("full", "offload"):
            row = _worker(args, which, Path(tmp) / "calib.pt", model_dir, Path(tmp) / which)
            rows.append({**prov, **row, "cap": args.cap, "calib": f"{args.nsamples}x{args.seqlen} seed 0"})
        diff = _differences(Path(tmp) / "full" / "pruned.pt", Path(tmp) / "offload" / "pruned.pt")
    rows[1].update(diff)
    out = Path(args.out)
    append_jsonl(out, rows)
    all_rows = read_jsonl(out)
    render(all_rows, out.with_suffix(".md"))
    print(json.dumps(diff))


if __name__ == "__main__":
    main()
