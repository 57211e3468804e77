"""Lab: per-tile bf16 GEMMs (W_tile x^T and x W_tile^T) vs one dense GEMM. Usage: python tile_gemm.py THREADS"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent

torch.set_num_threads(int(sys.argv[1]))


def med(f, r=7):
    for _ in range(2):
        f()
    ts = []
    for _ in range(r):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[r // 2]


for n, k in [(4096, 4096), (11008, 4096), (4096, 11008)]:
    B = 128
    x = torch.randn(B, k).bfloat16()
    w = torch.randn(n, k).bfloat16()
    xt = x.t()
    td = med(lambda: F.linear(x, w))
    res = [f"{n}x{k} dense {td * 1e3:.1f}"]
    for tile in (128, 256, 512, 1024, n):
        wt = w[:tile].clone()
        out = torch.empty(tile, B, dtype=torch.bfloat16)
        out2 = torch.empty(B, tile, dtype=torch.bfloat16)
        nt = n // tile
        t1 = med(lambda: [torch.mm(wt, xt, out=out) for _ in range(nt)])
        t2 = med(lambda: [torch.mm(x, wt.t(), out=out2) for _ in range(nt)])
        res.append(f"tile{tile}: Wx {td / t1:.2f}x xW {td / t2:.2f}x")
    print(*res, flush=True)
