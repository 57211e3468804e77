"""Which exact form of the masked-LoRA linear ``y = W x + s((B A) ⊙ M) x`` is fastest on this machine?

Forward + backward (gradients for A, B and x; W frozen) at SmolLM2-135M shapes, tokens = batch × seq.
Every variant is checked against the first one before timing. Run:

    python benchmarks/bench_masked_lora.py [--tokens 1024] [--rank 8] [--sparsity 0.6] [--repeats 10]

and it writes benchmarks/results/masked_lora.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from losa.lora.function import masked_lora_linear


def separate(x, w, a, b, m, s):
    """W x + s·((B A) ⊙ M) x: materialise the dense masked update, two GEMMs."""
    return F.linear(x, w) + s * F.linear(x, (b @ a) * m)


def fused_autograd(x, w, a, b, m, s):
    """(W + s·(B A) ⊙ M) x with plain autograd (keeps W_eff alive until backward)."""
    return F.linear(x, w + s * (b @ a) * m)


def fused_function(x, w, a, b, m, s):
    """losa's MaskedLoRAFunction: fused forward, W_eff rebuilt in backward."""
    return masked_lora_linear(x, w, None, a, b, m, s)


def sparse_csr(x, w, a, b, m, s):
    """SDDMM on the mask's non-zeros (torch.sparse.sampled_addmm) + sparse × dense."""
    pattern = m.to(x.dtype).to_sparse_csr()
    delta = torch.sparse.sampled_addmm(pattern, b, a, beta=0.0, alpha=s)
    return F.linear(x, w) + (delta @ x.T).T


def plain_lora(x, w, a, b, m, s):
    """Reference cost only (NOT masked, so not exact): W x + s·B(A x)."""
    return F.linear(x, w) + s * F.linear(F.linear(x, a), b)


VARIANTS = [separate, fused_autograd, fused_function, sparse_csr, plain_lora]


def _time(fn, args, repeats: int) -> float:
    x, w, a, b, m, s = args

    def step() -> None:
        x.grad = a.grad = b.grad = None
        fn(x, w, a, b, m, s).square().mean().backward()

    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "masked_lora.md"))
    args = ap.parse_args()
    torch.manual_seed(0)
    shapes = {"q_proj 576×576": (576, 576), "up_proj 1536×576": (1536, 576), "down_proj 576×1536": (576, 1536)}
    rows = []
    for label, (d_out, d_in) in shapes.items():
        m = torch.rand(d_out, d_in) >= args.sparsity
        w = torch.randn(d_out, d_in) * m
        a = (torch.randn(args.rank, d_in) * 0.05).requires_grad_()
        b = (torch.randn(d_out, args.rank) * 0.05).requires_grad_()
        x = torch.randn(args.tokens, d_in, requires_grad=True)
        packed = (x, w, a, b, m, 0.5)
        ref = separate(*packed)
        res = {}
        for fn in VARIANTS:
            try:
                out = fn(*packed)
                if fn is not plain_lora:
                    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
                res[fn.__name__] = _time(fn, packed, args.repeats)
            except (RuntimeError, NotImplementedError) as e:  # e.g. an unsupported sparse op
                res[fn.__name__] = f"n/a ({type(e).__name__})"
        rows.append((label, res))
    base = "separate"
    lines = [
        "# Masked LoRA forward+backward on CPU",
        "",
        f"Date: {datetime.date.today()}. Machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}. "
        f"Peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB.",
        f"Command: `python benchmarks/bench_masked_lora.py --tokens {args.tokens} --rank {args.rank} "
        f"--sparsity {args.sparsity} --repeats {args.repeats}`",
        "",
        "Median wall time of one forward+backward (float32, random mask at the given sparsity; W frozen;",
        "gradients for x, A, B). Ratio = time / time of `separate` (lower is faster). `plain_lora` is not",
        "masked (not exact): it shows the cost of an ordinary dense LoRA adapter for scale.",
        "The machine is shared with other jobs, so absolute times are inflated and noisy; compare the ratios.",
        "",
        "| shape | " + " | ".join(f.__name__ for f in VARIANTS) + " |",
        "|---|" + "---|" * len(VARIANTS),
    ]
    for label, res in rows:
        cells = []
        for f in VARIANTS:
            v = res[f.__name__]
            cells.append(v if isinstance(v, str) else f"{v * 1e3:.2f} ms ({v / res[base]:.2f}×)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Variants:", ""] + [f"- `{f.__name__}`: {f.__doc__}" for f in VARIANTS]
    lines += ["", "losa's SparseLoRALinear uses `fused_function`: exact, one GEMM per forward, and unlike "
              "`fused_autograd` it does not keep a dense W_eff per module alive between forward and backward "
              "(that would be a second copy of every adapted weight during training)."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
