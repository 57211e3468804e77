"""One pruning run in its own process (so its wall time and peak RSS are its own).

Usage: python benchmarks/_prune_worker.py METHOD TARGET CALIB_PT MODEL_DIR OUT_DIR [SEQUENTIAL[:STATS_PRECISION]]
TARGET is a sparsity like 0.5 or an N:M pattern like 2:4; SEQUENTIAL is auto (default), layer or module;
STATS_PRECISION is model (default), bfloat16 or float16.
Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from _rss import peak_rss_mb


def main() -> None:
    method, target, calib_pt, model_dir, out_dir = sys.argv[1:6]
    sequential, _, precision = (sys.argv[6] if len(sys.argv) > 6 else "auto").partition(":")
    import losa

    torch.manual_seed(0)
    ids = torch.load(calib_pt)
    model, tok = losa.load_model(model_dir)
    cfg = {"method": method, "nsamples": ids.shape[0], "seqlen": ids.shape[1], "sequential": sequential,
           "stats_precision": precision or "model"}
    cfg.update({"nm": target} if ":" in target else {"sparsity": float(target)})
    t = time.perf_counter()
    rep = losa.prune(model, tok, losa.PruneConfig(**cfg), calib_ids=ids, progress=False)
    wall = time.perf_counter() - t
    model.save_pretrained(out_dir)
    print(json.dumps({"prune_s": wall, "sequential": rep.sequential,
                      "stats_precision": precision or "model", "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main()
