"""Lab: all 6 pairs of each group of 4 pre-interleaved (C), blocked. Usage: python combo_variant.py THREADS TC,R,KB ..."""

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
    "combolab",
    [str(HERE / "combo.cpp")],
    extra_cflags=["-O3", "-fopenmp"],
    extra_ldflags=["-fopenmp"],
    verbose=False,
)
torch.manual_seed(0)
th = int(sys.argv[1])
torch.set_num_threads(th)
cfgs = [tuple(map(int, c.split(","))) for c in sys.argv[2:]]


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


shapes = [(4096, 4096), (11008, 4096), (4096, 11008)]
for n, k in shapes:
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
        B = 128
        x = torch.randn(B, k).bfloat16()
        ref = F.linear(x.float(), w.float())
        td = med(lambda: F.linear(x, w))
        tcur = med(lambda: sl(x))
        out = [f"{n}x{k} {sp} th={th} dense {td * 1e3:.1f}ms cur {td / tcur:.2f}x"]
        for tc, R, KB in cfgs:
            y = lab.mmC(x, p.meta, p.values, p.row_ptr, n, k, tc, R, KB)[:, :B].t()
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-4, err
            t = med(lambda: lab.mmC(x, p.meta, p.values, p.row_ptr, n, k, tc, R, KB))
            out.append(f"C{tc},{R},{KB} {td / t:.2f}x")
        tp = med(lambda: lab.prepC(x, k, 128))
        out.append(f"prep {tp / td * 100:.0f}%")
        print(*out, flush=True)
