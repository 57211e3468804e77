"""Lab: the kept-pair kernel with input offsets forced into a small window (wrong results): its compute ceiling."""

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load

from losa.inference.formats import pack

HERE = Path(__file__).resolve().parent

lab = load(
    "pairlab",
    [str(HERE / "pair.cpp")],
    extra_cflags=["-O3", "-fopenmp"],
    extra_ldflags=["-fopenmp"],
    verbose=False,
)
torch.manual_seed(0)
torch.set_num_threads(1)


def med(f, r=5):
    for _ in range(2):
        f()
    ts = []
    for _ in range(r):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[r // 2]


n = k = 4096
for sp in (0.5, 0.7):
    w = torch.randn(n, k)
    w[torch.rand(n, k) < sp] = 0
    w = w.bfloat16()
    p = pack(w.float(), torch.bfloat16, "bitmask")
    for B in (64, 128):
        x = torch.randn(B, k).bfloat16()
        td = med(lambda: F.linear(x, w))
        tb = med(lambda: lab.mmB(x, p.meta, p.values, p.row_ptr, n, k))
        res = [f"B {td / tb:.2f}x"]
        for mb in (0x3F00, 0x3FF00, 0xFFF00, 0x7FFFFF00):
            t = med(lambda: lab.mmBL1(x, p.meta, p.values, p.row_ptr, n, k, mb))
            res.append(f"mask{mb:x} {td / t:.2f}x")
        print(sp, B, f"dense {td * 1e3:.1f}ms", *res, flush=True)
