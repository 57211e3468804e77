"""Lab: kept-pair (vpunpck, B) and adjacent-pair (A) sparse GEMMs, unblocked, vs decompress+GEMM. Usage: python pair_variants.py THREADS"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load

from losa.inference.formats import pack
from losa.inference.sparse_linear import SparseLinear

HERE = Path(__file__).resolve().parent

lab = load(
    "pairlab",
    [str(HERE / "pair.cpp")],
    extra_cflags=["-O3", "-fopenmp"],
    extra_ldflags=["-fopenmp"],
    verbose=False,
)
torch.manual_seed(0)
th = int(sys.argv[1]) if len(sys.argv) > 1 else 1
torch.set_num_threads(th)


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
    for sp in (0.5, 0.7, "2:4"):
        w = torch.randn(n, k)
        if sp == "2:4":
            g = w.view(n, k // 4, 4)
            idx = g.abs().argsort(-1)[..., :2]
            g.scatter_(-1, idx, 0.0)
        else:
            w[torch.rand(n, k) < sp] = 0
        w = w.bfloat16()
        p = pack(w.float(), torch.bfloat16, "bitmask")
        sl = SparseLinear(p)
        for B in (32, 128):
            x = torch.randn(B, k).bfloat16()
            ref = F.linear(x.float(), w.float())
            yA = lab.mmA(x, p.meta, p.values, p.row_ptr, n, k)[:, :B].t()
            yB = lab.mmB(x, p.meta, p.values, p.row_ptr, n, k)[:, :B].t()
            eA = ((yA - ref).abs().max() / ref.abs().max()).item()
            eB = ((yB - ref).abs().max() / ref.abs().max()).item()
            td = med(lambda: F.linear(x, w))
            tc = med(lambda: sl(x))
            ta = med(lambda: lab.mmA(x, p.meta, p.values, p.row_ptr, n, k))
            tb = med(lambda: lab.mmB(x, p.meta, p.values, p.row_ptr, n, k))
            print(
                f"{n}x{k} {sp} B={B} th={th}: dense {td * 1e3:.2f}ms cur {td / tc:.2f}x A {td / ta:.2f}x B {td / tb:.2f}x  err {eA:.1e} {eB:.1e}",
                flush=True,
            )
