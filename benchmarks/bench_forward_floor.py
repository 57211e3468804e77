"""The compute floor of layer-order Wanda on SmolLM2-135M: what one calibration forward costs here.

    python benchmarks/bench_forward_floor.py        # ~5 min on 2 idle cores

Layer-order Wanda (llm-compressor's order and losa's default) runs each decoder layer twice over the
calibration windows: a statistics pass on the unpruned layer (losa stops it before ``down_proj``) and a
pass of the pruned layer that produces the next layer's inputs. This script times those two kinds of
pass over 16 x 512 C4 windows (as in bench_prune.py), layer by layer, with the windows in batches of 1, 2
and 4 (interleaved, medians of 2), and writes benchmarks/results/forward_floor.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import losa
from losa.calib.hooks import StatsComplete, collect_inputs
from losa.models.linear import in_features
from losa.models.registry import get_decoder_layers, linear_modules
from losa.pruning.stats import InputNormStat

HERE = Path(__file__).resolve().parent


def layer_inputs(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The first decoder layer's input and keyword arguments for all windows in one batch."""
    got: dict = {}

    def hook(_m, args, kwargs):
        got["x"], got["kw"] = args[0] if args else kwargs.pop("hidden_states"), kwargs
        raise StatsComplete

    h = get_decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except StatsComplete:
        pass
    finally:
        h.remove()
    return got["x"], got["kw"]


def slice_kwargs(kw: dict, s: slice, n: int) -> dict:
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            out[k] = v[s]
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) and t.shape[0] == n for t in v):
            out[k] = tuple(t[s] for t in v)
        else:
            out[k] = v
    return out


def timed_pass(model, x: torch.Tensor, kw: dict, batch: int, stats_only: bool) -> float:
    """Seconds for all decoder layers over all windows in batches of ``batch`` windows."""
    n = x.shape[0]
    hidden = x
    t = 0.0
    with torch.no_grad():
        for layer in get_decoder_layers(model):
            lin = linear_modules(layer)
            stats = {k: InputNormStat(in_features(m)) for k, m in lin.items()}
            outs = []
            for s0 in range(0, n, batch):
                s = slice(s0, s0 + batch)
                kws = slice_kwargs(kw, s, n)
                t0 = time.perf_counter()
                if stats_only:
                    with collect_inputs(lin, stats, stop_early=True) as reset:
                        reset()
                        try:
                            layer(hidden[s], **kws)
                        except StatsComplete:
                            pass
                out = layer(hidden[s], **kws)
                out = out[0] if isinstance(out, tuple) else out
                t += time.perf_counter() - t0
                outs.append(out)
            hidden = torch.cat(outs)
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("LOSA_DATA_DIR", str(HERE.parents[1] / "shared" / "data")))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "forward_floor"))
    a = ap.parse_args()
    model, tok = losa.load_model("smollm2-135m")
    ids = losa.data.get_calibration(tok, "c4", 16, 512, seed=0, data_dir=a.data_dir)
    x, kw = layer_inputs(model, ids)
    runs: dict[str, list[float]] = {}
    for _ in range(a.reps):
        for batch in (1, 2, 4):
            runs.setdefault(f"propagate b{batch}", []).append(timed_pass(model, x, kw, batch, False))
            runs.setdefault(f"stats+propagate b{batch}", []).append(timed_pass(model, x, kw, batch, True))
            print({k: round(v[-1], 1) for k, v in runs.items()}, flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    res = {"command": "python " + " ".join(sys.argv), "threads": torch.get_num_threads(),
           "loadavg_end": os.getloadavg(), "seconds": runs, "median_s": med}
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    lines = ["# Layer-order Wanda: the cost of its two passes (SmolLM2-135M, 16 x 512 C4 windows)", "",
             f"Command: `{res['command']}`; torch threads {res['threads']}; load average at the end "
             f"{res['loadavg_end']}. Medians of {a.reps} interleaved repetitions; time inside the decoder layers.", "",
             "`propagate` = every decoder layer once over all windows (the second pass of layer-order Wanda); "
             "`stats+propagate` = the statistics pass (stopped before `down_proj`, as losa does) plus that "
             "pass: the decoder-layer compute of layer-order Wanda, without the pruning itself.", "",
             "| windows per batch | propagate s | stats+propagate s |", "|---|---|---|"]
    for b in (1, 2, 4):
        lines.append(f"| {b} | {med[f'propagate b{b}']:.1f} | {med[f'stats+propagate b{b}']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
