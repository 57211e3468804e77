"""Prefill kernel lab: zero-skipping bf16 GEMM variants against dense bf16 ``F.linear`` (see README.md).

    python benchmarks/prefill_lab/lab.py check                      # every variant against F.linear (small)
    python benchmarks/prefill_lab/lab.py variants THREADS            # A and B unblocked vs decompress + GEMM
    python benchmarks/prefill_lab/lab.py ceiling                     # B with inputs confined to a window
    python benchmarks/prefill_lab/lab.py combo THREADS TC,R,KB ...   # C, blocked
    python benchmarks/prefill_lab/lab.py blocked THREADS TC,R,KB ... # B, blocked (the shipped design)
    python benchmarks/prefill_lab/lab.py tile-gemm THREADS           # per-tile GEMMs vs one dense GEMM
    python benchmarks/prefill_lab/lab.py tile-size THREADS           # SparseLinear prefill at several tiles

Prints ratios (dense time / variant time, > 1 = faster than dense), medians in one process.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load

import losa.inference.sparse_linear as S
from losa.inference.formats import pack

HERE = Path(__file__).resolve().parent
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def lab():
    return load("losa_prefill_lab", [str(HERE / "lab.cpp")], extra_cflags=["-O3", "-fopenmp"],
                extra_ldflags=["-fopenmp"], verbose=False)


def med(f, reps: int = 5) -> float:
    for _ in range(2):
        f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[reps // 2]


def sparse_weight(n: int, k: int, pattern) -> torch.Tensor:
    """bf16 weight with ``pattern`` (a sparsity or "2:4": the two largest of every four kept)."""
    w = torch.randn(n, k)
    if pattern == "2:4":
        g = w.view(n, k // 4, 4)
        g.scatter_(-1, g.abs().argsort(-1)[..., :2], 0.0)
    else:
        w[torch.rand(n, k) < pattern] = 0
    return w.bfloat16()


def check() -> None:
    m = lab()
    torch.manual_seed(0)
    for pattern in (0.5, 0.7, "2:4"):
        w = sparse_weight(96, 160, pattern)
        p = pack(w.float(), torch.bfloat16, "bitmask")
        args = (p.meta, p.values, p.row_ptr, 96, 160)
        for b in (16, 40, 130):
            x = torch.randn(b, 160).bfloat16()
            ref = F.linear(x.double(), w.double())
            outs = {"A": m.mmA(x, *args), "B": m.mmB(x, *args, -1), "B2": m.mmB2(x, *args, 128, 256, 8),
                    "C": m.mmC(x, *args, 64, 256, 2)}
            for name, y in outs.items():
                err = ((y[:, :b].t().double() - ref).abs().max() / ref.abs().max()).item()
                assert err < 1e-5, (name, pattern, b, err)
    print("all variants match F.linear")


def variants(threads: int) -> None:
    m = lab()
    torch.set_num_threads(threads)
    for n, k in SHAPES:
        for pattern in (0.5, 0.7, "2:4"):
            w = sparse_weight(n, k, pattern)
            p = pack(w.float(), torch.bfloat16, "bitmask")
            layer = S.SparseLinear(p)
            args = (p.meta, p.values, p.row_ptr, n, k)
            for b in (32, 128):
                x = torch.randn(b, k).bfloat16()
                td = med(lambda: F.linear(x, w))
                print(f"{n}x{k} {pattern} B={b} th={threads}: dense {td * 1e3:.2f} ms, current "
                      f"{td / med(lambda: layer(x)):.2f}x, A {td / med(lambda: m.mmA(x, *args)):.2f}x, "
                      f"B {td / med(lambda: m.mmB(x, *args, -1)):.2f}x", flush=True)


def ceiling() -> None:
    m = lab()
    torch.set_num_threads(1)
    n = k = 4096
    for pattern in (0.5, 0.7):
        w = sparse_weight(n, k, pattern)
        p = pack(w.float(), torch.bfloat16, "bitmask")
        args = (p.meta, p.values, p.row_ptr, n, k)
        for b in (64, 128):
            x = torch.randn(b, k).bfloat16()
            td = med(lambda: F.linear(x, w))
            res = [f"B {td / med(lambda: m.mmB(x, *args, -1)):.2f}x"]
            for bits in (0x3F00, 0x3FF00, 0xFFF00, 0x7FFFFF00):  # 16 KiB .. 8 MiB windows, 256 B aligned
                res.append(f"window{bits:x} {td / med(lambda: m.mmB(x, *args, bits)):.2f}x")
            print(pattern, b, f"dense {td * 1e3:.1f} ms", *res, flush=True)


def blocked(kernel: str, threads: int, configs: list[str]) -> None:
    m = lab()
    fn = m.mmC if kernel == "combo" else m.mmB2
    torch.set_num_threads(threads)
    cfgs = [tuple(map(int, c.split(","))) for c in configs]
    for n, k in SHAPES:
        for pattern in (0.5, 0.7, "2:4"):
            w = sparse_weight(n, k, pattern)
            p = pack(w.float(), torch.bfloat16, "bitmask")
            layer = S.SparseLinear(p)
            x = torch.randn(128, k).bfloat16()
            td = med(lambda: F.linear(x, w))
            out = [f"{n}x{k} {pattern} th={threads} dense {td * 1e3:.1f} ms current {td / med(lambda: layer(x)):.2f}x"]
            for tc, r, kb in cfgs:
                t = med(lambda: fn(x, p.meta, p.values, p.row_ptr, n, k, tc, r, kb))
                out.append(f"{kernel}{tc},{r},{kb} {td / t:.2f}x")
            if kernel == "combo":
                out.append(f"prep {med(lambda: m.prepC(x, k, 128)) / td * 100:.0f}% of dense")
            print(*out, flush=True)


def tile_gemm(threads: int) -> None:
    torch.set_num_threads(threads)
    for n, k in SHAPES:
        b = 128
        x = torch.randn(b, k).bfloat16()
        w = torch.randn(n, k).bfloat16()
        td = med(lambda: F.linear(x, w), 7)
        res = [f"{n}x{k} dense {td * 1e3:.1f} ms"]
        for tile in (128, 256, 512, 1024, n):
            wt = w[:tile].clone()
            out = torch.empty(tile, b, dtype=torch.bfloat16)
            out2 = torch.empty(b, tile, dtype=torch.bfloat16)
            count = n // tile
            t1 = med(lambda: [torch.mm(wt, x.t(), out=out) for _ in range(count)], 7)
            t2 = med(lambda: [torch.mm(x, wt.t(), out=out2) for _ in range(count)], 7)
            res.append(f"tile{tile}: Wx {td / t1:.2f}x xW {td / t2:.2f}x")
        print(*res, flush=True)


def tile_size(threads: int) -> None:
    torch.set_num_threads(threads)
    for n, k in SHAPES:
        w = sparse_weight(n, k, 0.5)
        layer = S.SparseLinear(pack(w.float(), torch.bfloat16, "bitmask"))
        x = torch.randn(128, k).bfloat16()
        res = [f"{n}x{k}"]
        saved = S.DENSE_TILE_ROWS
        try:
            for tile in (128, 256, 512, 1024, n // 2):
                S.DENSE_TILE_ROWS = tile
                res.append(f"t{tile} {med(lambda: F.linear(x, w), 9) / med(lambda: layer(x), 9):.2f}x")
        finally:
            S.DENSE_TILE_ROWS = saved
        print(*res, flush=True)


def main() -> int:
    torch.manual_seed(0)
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "check":
        check()
    elif cmd == "variants":
        variants(int(rest[0]))
    elif cmd == "ceiling":
        ceiling()
    elif cmd in ("combo", "blocked"):
        blocked(cmd, int(rest[0]), rest[1:])
    elif cmd == "tile-gemm":
        tile_gemm(int(rest[0]))
    elif cmd == "tile-size":
        tile_size(int(rest[0]))
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
