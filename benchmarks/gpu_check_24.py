"""One prepared check of 2:4 semi-structured sparsity on CUDA (run it on a lent GPU, ~2 minutes).

    python benchmarks/gpu_check_24.py [--out benchmarks/results/gpu_24.json]

1. Per-layer: for LLaMA-7B shapes at batch 1/16/256/2048, a 2:4-masked fp16 and bf16 weight as
   ``torch.sparse.to_sparse_semi_structured`` vs dense ``F.linear``: max error and speed-up (CUDA events,
   interleaved, medians).
2. Model: a random LLaMA-7B-shaped 2-layer stack pruned 2:4, ``losa.sparsify_for_inference`` on CUDA: what
   ``semi_structured="auto"`` decides on this GPU, then every layer converted ("always"): logits match the
   dense model within fp16 tolerance, greedy tokens, and ``generate`` wall time of both (a dense copy and the
   converted model, after a warm-up, interleaved, best of three).
Prints a summary and writes JSON; exits 1 if a correctness check fails, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def cuda_time(fn, reps: int = 20) -> float:
    """Median milliseconds of ``fn`` on the GPU after three warm-up calls."""
    from losa.inference.cuda24 import cuda_ms

    for _ in range(3):
        fn()
    return statistics.median(cuda_ms(fn, reps))


def mask_24(w: torch.Tensor) -> torch.Tensor:
    g = w.abs().reshape(w.shape[0], -1, 4)
    idx = g.topk(2, dim=-1).indices
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return w * keep.reshape(w.shape)


def layer_checks() -> tuple[list[dict], bool]:
    from torch.sparse import to_sparse_semi_structured

    rows, ok = [], True
    for dtype in (torch.float16, torch.bfloat16):
        for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
            w = mask_24(torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5)
            ws = to_sparse_semi_structured(w)
            for b in (1, 16, 256, 2048):
                x = torch.randn(b, k, device="cuda", dtype=dtype)
                ref = F.linear(x.float(), w.float())
                try:
                    y = F.linear(x, ws)
                except RuntimeError as e:  # some batch sizes need padding on some backends
                    rows.append({"dtype": str(dtype), "shape": [n, k], "batch": b, "error": str(e).splitlines()[0]})
                    continue
                err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
                good = err < 2e-2
                ok &= good
                td, ts = 0.0, 0.0
                for _ in range(2):  # interleave the two paths
                    td += cuda_time(lambda x=x, w=w: F.linear(x, w))
                    ts += cuda_time(lambda x=x, ws=ws: F.linear(x, ws))
                rows.append({"dtype": str(dtype), "shape": [n, k], "batch": b, "rel_err": err, "ok": good,
                             "dense_ms": td / 2, "sparse_ms": ts / 2, "speedup": td / ts})
                print(rows[-1], flush=True)
    return rows, ok


def model_check() -> tuple[dict, bool]:
    from transformers import LlamaConfig, LlamaForCausalLM

    import losa
    from losa.models.linear import get_weight, set_weight
    from losa.models.registry import get_decoder_layers, linear_modules

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=2, vocab_size=32000)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()
    for layer in get_decoder_layers(model):
        for mod in linear_modules(layer).values():
            set_weight(mod, mask_24(get_weight(mod).detach()))
    ids = torch.randint(5, 32000, (1, 256), device="cuda")
    sparse = copy.deepcopy(model)  # the same 2:4 weights, converted below; the dense model stays as it is

    def generate(m) -> tuple[float, torch.Tensor]:
        torch.cuda.synchronize()
        t = time.perf_counter()
        tokens = m.generate(ids[:, :16], max_new_tokens=32, min_new_tokens=32, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t, tokens

    with torch.inference_mode():
        ref = model(ids).logits.float()
        auto = losa.sparsify_for_inference(sparse)  # what a user gets: converted where measured faster
        always = losa.sparsify_for_inference(sparse, semi_structured="always")  # the rest, to check the sparse path
        got = sparse(ids).logits.float()
        for m in (model, sparse):  # warm-up (CUDA context, library handles, clocks)
            generate(m)
        times: dict[str, list[float]] = {"dense": [], "sparse": []}
        for _ in range(3):  # interleaved; the best of three counts
            t, dense_tokens = generate(model)
            times["dense"].append(t)
            t, sparse_tokens = generate(sparse)
            times["sparse"].append(t)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    same = int((dense_tokens == sparse_tokens).all(dim=0).sum().item())
    res = {"auto": auto, "always": always, "logit_rel_err": err, "tokens_equal": same,
           "tokens_total": dense_tokens.shape[1], "generate_dense_s": min(times["dense"]),
           "generate_sparse_s": min(times["sparse"]), "generate_times_s": times}
    ok = auto["replaced"] + always["replaced"] == 14 and err < 5e-2
    print(res, flush=True)
    return res, ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu_24.json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    res["layers"], ok1 = layer_checks()
    res["model"], ok2 = model_check()
    res["ok"] = ok1 and ok2
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    print("PASS" if res["ok"] else "FAIL", "->", a.out)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
