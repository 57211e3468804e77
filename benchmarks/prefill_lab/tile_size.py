"""Lab: SparseLinear's decompress + GEMM prefill at several tile sizes vs dense bf16. Usage: python tile_size.py THREADS"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import losa.inference.sparse_linear as S
from losa.inference.formats import pack

HERE = Path(__file__).resolve().parent

torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)


def med(f, r=9):
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
    w = torch.randn(n, k)
    w[torch.rand(n, k) < 0.5] = 0
    w = w.bfloat16()
    sl = S.SparseLinear(pack(w.float(), torch.bfloat16, "bitmask"))
    x = torch.randn(B, k).bfloat16()
    res = [f"{n}x{k}"]
    for tile in (128, 256, 512, 1024, n // 2):
        S.DENSE_TILE_ROWS = tile
        td = med(lambda: F.linear(x, w))
        tc = med(lambda: sl(x))
        res.append(f"t{tile} {td / tc:.2f}x")
    print(*res, flush=True)
