"""Lab: the kernel's float32-input row loops, AVX2 vs AVX-512, on the same packed layers at 1 and 2 threads.

Batch 1, bf16 values, random weights magnitude-pruned per row (bitmask), the packed layers as ``SparseLinear``
allocates them (huge pages unless ``LOSA_HUGEPAGES=0``), best of 7, the ISAs alternating. ``--scaling``: only the
LLaMA-7B gate/up layer at 70 %, with the AVX512-BF16 loop (bf16 inputs) beside them, printed in GB/s of packed
bytes: the 2-thread scaling lead of the 2026-12-03 closing note (the AVX2 loop 1.2x from 1 to 2 threads there, the
AVX-512 loops 1.7-1.9x; the lab copy benchmarks/avx2_scaling_lab.cpp scales 1.95x with huge pages). Prints only;
nothing is written. Run: ``python benchmarks/avx2_scaling_lab.py [--scaling]`` (an AVX-512 CPU).
"""

from __future__ import annotations

import argparse
import time

import torch

from losa.inference import SparseLinear
from losa.inference import kernel as _kernel

SHAPES = ((1536, 576, 48), (576, 1536, 48), (11008, 4096, 2), (4096, 11008, 2))


def layers(n: int, k: int, sparsity: float, copies: int) -> list[SparseLinear]:
    """``copies`` packed layers ``[n, k]`` with bf16 values at ``sparsity`` (magnitude per row)."""
    out = []
    for _ in range(copies):
        w = torch.randn(n, k)
        cut = w.abs().kthvalue(int(sparsity * k), dim=1, keepdim=True).values
        out.append(SparseLinear.from_dense(w * (w.abs() > cut), value_dtype="bfloat16", fmt="bitmask"))
    return out


def best_time(ls: list[SparseLinear], x: torch.Tensor, isa: int, reps: int = 7) -> float:
    """Best seconds per layer of ``spmm`` over ``ls`` at kernel level ``isa``."""
    k = _kernel.load_kernel()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for m in ls:
            k.spmm(x, m.meta, m.values, m.row_ptr, None, m.out_features, m.in_features, 0, isa)
        best = min(best, (time.perf_counter() - t) / len(ls))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scaling", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.scaling:
        ls = layers(11008, 4096, 0.7, 2)
        x = torch.randn(1, 4096)
        nbytes = ls[0].packed.nbytes()
        for th in (1, 2):
            torch.set_num_threads(th)
            cases = (("avx2 f32x", 1, x), ("avx512 f32x", 2, x), ("avx512 bf16x", 2, x.bfloat16()))
            print(th, "thr", "  ".join(f"{name} {nbytes / best_time(ls, xx, isa) / 1e9:.1f} GB/s"
                                        for name, isa, xx in cases), flush=True)
        return
    for th in (1, 2):
        torch.set_num_threads(th)
        for n, k, copies in SHAPES:
            for sp in (0.5, 0.7):
                ls, x = layers(n, k, sp, copies), torch.randn(1, k)
                t = {isa: float("inf") for isa in (1, 2)}
                for _ in range(7):
                    for isa in (1, 2):
                        t[isa] = min(t[isa], best_time(ls, x, isa, reps=1))
                print(f"{th} thr {n}x{k} {sp:.0%}: avx2 {t[1] * 1e6:.0f} us  avx512 {t[2] * 1e6:.0f} us  "
                      f"avx2 speed {t[2] / t[1]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
