"""Batch-1 decode of one LLaMA-7B MLP layer on the AVX2 path: the new loop vs the previous one vs dense fp32.

    python benchmarks/bench_avx2_decode.py                 # forced AVX2, 1 and 2 threads (~1 min)
    python benchmarks/bench_avx2_decode.py --isa native    # whatever the CPU's best path is
    python benchmarks/bench_avx2_decode.py --quick         # smoke run

One 11008x4096 layer pruned to 70 % (per-row magnitude, random weights), bf16 stored values, float32
input, batch 1, timed interleaved round-robin (medians) in one process:

- ``sparse_new``: this checkout's sparse kernel (``spmm``) at the chosen ISA level,
- ``sparse_old``: the same call into the kernel source of ``--baseline-rev`` (the loop before the AVX2
  rework; built once as a separate extension),
- ``dense_fp32``: torch's ``F.linear`` on the dense float32 weight (what a float32 model runs),
- ``*_fp32_values``: both kernels with float32 stored values (secondary).

With ``--prefill-rows R`` (default 128; 0 = skip) a second, smaller section times a bf16 model's prompt
through the same layer (bf16 input [R, K], bf16 values): ``prefill_new`` (``SparseLinear`` as shipped: no
bf16 GEMM without native bf16, float32 GEMM on decompressed tiles), ``prefill_old`` (the old kernel's tiled
bf16 GEMM, what the layer used to run), and dense ``F.linear`` in bf16 and in float32.

``--isa avx2`` (the default) sets ``LOSA_SPARSE_ISA=avx2`` and also restricts torch to AVX2
(``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``, ``ONEDNN_MAX_CPU_ISA``), so that on an AVX-512
machine every path runs what an AVX2-only CPU would; the numbers are still this CPU's (its memory system
and core), not a real AVX2 CPU's. Appends one row per variant and thread count to
benchmarks/results/avx2_decode.jsonl and rewrites avx2_decode.md from all rows.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _rows import append_jsonl, read_jsonl

from losa.utils.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "avx2_decode"
KERNEL_SRC = "src/losa/inference/csrc/sparse_linear.cpp"
#: the commit before the AVX2 rework (branch avx2-runtime): its AVX2 loop is the baseline
BASELINE_REV = "9ad3f52"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--isa", default="avx2", choices=["avx2", "avx512", "scalar", "native"],
                   help="kernel ISA level; avx2 also restricts torch to AVX2 (default: avx2)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default: 1,2)")
    p.add_argument("--reps", type=int, default=100, help="interleaved repeats per thread count (default: 100)")
    p.add_argument("--shape", default="11008x4096", help="out x in (default: 11008x4096)")
    p.add_argument("--sparsity", type=float, default=0.7, help="fraction pruned (default: 0.7)")
    p.add_argument("--baseline-rev", default=BASELINE_REV, help=f"git revision of the old kernel ({BASELINE_REV})")
    p.add_argument("--prefill-rows", type=int, default=128, help="rows of the bf16 prompt section (0: skip)")
    p.add_argument("--prefill-reps", type=int, default=5, help="repeats of the prompt section (default: 5)")
    p.add_argument("--note", default="", help="a remark stored with the rows and shown in the markdown")
    p.add_argument("--quick", action="store_true", help="smoke run: 5 repeats, results not written")
    return p.parse_args(argv)


def restrict_isa(isa: str) -> dict:
    """Set the environment that forces ``isa`` (before torch is imported); returns what was set."""
    env = {}
    if isa != "native":
        env["LOSA_SPARSE_ISA"] = isa
    if isa == "avx2":
        env.update(ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    os.environ.update(env)
    return env


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def commit_id() -> str:
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src"], cwd=REPO).returncode != 0
    return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")


def build_baseline(rev: str):
    """The kernel source at ``rev``, compiled as its own extension (cached like the main one)."""
    from losa.utils.cpp import build_extension

    src = git("show", f"{rev}:{KERNEL_SRC}")
    path = Path(tempfile.gettempdir()) / f"losa_kernel_{rev}" / "sparse_linear.cpp"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(src + "\n")
    return build_extension(f"losa_sparse_kernels_{rev}", path)


def measure(args: argparse.Namespace, env: dict) -> list[dict]:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_inference import interleaved, keep_mask, machine_info

    from losa.inference import SparseLinear
    from losa.inference import kernel as kmod

    new, old = kmod.load_kernel(), build_baseline(args.baseline_rev)
    isa = kmod.best_isa()
    info = machine_info()
    n, k = map(int, args.shape.lower().split("x"))
    torch.manual_seed(0)
    w = torch.randn(n, k) / k**0.5
    w = w * keep_mask(w, f"{args.sparsity * 100:g}")
    layers = {vd: SparseLinear.from_dense(w, None, vd, "bitmask") for vd in ("bfloat16", "float32")}
    x = torch.randn(1, k)
    fns, expect = {}, {}
    for vd, layer in layers.items():
        a = (x, layer.meta, layer.values, layer.row_ptr, None, n, k, 0, isa)
        suffix = "" if vd == "bfloat16" else "_fp32_values"
        fns[f"sparse_new{suffix}"] = lambda a=a: new.spmm(*a)
        fns[f"sparse_old{suffix}"] = lambda a=a: old.spmm(*a)
        exact = F.linear(x.double(), layer.to_dense().double())
        expect[f"sparse_new{suffix}"] = expect[f"sparse_old{suffix}"] = exact
    fns["dense_fp32"] = lambda: F.linear(x, w)
    expect["dense_fp32"] = F.linear(x.double(), w.double())
    compact = {name: layers["float32" if name.endswith("_fp32_values") else "bfloat16"].packed.nbytes()
               for name in fns if name.startswith("sparse")}
    compact["dense_fp32"] = w.numel() * 4
    errs = {name: float((f().double() - expect[name]).abs().max() / expect[name].abs().max()) for name, f in fns.items()}
    reps = 5 if args.quick else args.reps
    pre = {}
    if args.prefill_rows:
        from losa.inference.sparse_linear import DENSE_TILE_ROWS

        bf = layers["bfloat16"]
        xb = torch.randn(args.prefill_rows, k).bfloat16()
        wb = w.bfloat16()
        a = (xb, bf.meta, bf.values, bf.row_ptr, None, n, k, 0, isa)
        pre = {"prefill_new": lambda: bf(xb), "prefill_old": lambda: old.dense_mm(*a, DENSE_TILE_ROWS, True),
               "dense_bf16": lambda: F.linear(xb, wb), "dense_fp32": lambda: F.linear(xb.float(), w)}
        exact = F.linear(xb.double(), bf.to_dense().double())
        errs.update({f"pre:{name}": float((f().double() - exact).abs().max() / exact.abs().max())
                     for name, f in pre.items()})
    rows = []
    flags = cpu_flags()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    run_id = f"{date} {commit_id()}"
    for th in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(th)
        sections = [("decode", 1, fns, reps)]
        if pre:
            sections.append(("prefill", args.prefill_rows, pre, 2 if args.quick else args.prefill_reps))
        for section, batch, group, r in sections:
            load0 = os.getloadavg()
            with torch.inference_mode():
                med = interleaved(group, r, warmup=1 if section == "prefill" else 3)
            for name, sec in med.items():
                nbytes = compact[name] if section == "decode" else None
                err = errs[name] if section == "decode" else errs[f"pre:{name}"]
                vs_old = med.get(name.replace("new", "old")) if "new" in name else None
                rows.append({
                    "run": run_id, "date": date, "commit": commit_id(),
                    "command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "threads": th, "cpu": info["cpu"], "cores": info["cores"], "torch": info["torch"],
                    "isa": args.isa, "kernel_isa": kmod.ISA_NAMES[isa], "forced_env": env,
                    "shape": f"{n}x{k}", "sparsity": args.sparsity, "section": section, "batch": batch,
                    "variant": name, "median_ms": sec * 1e3, "gbps": nbytes / sec / 1e9 if nbytes else None,
                    "bytes": nbytes, "vs_dense_fp32": med["dense_fp32"] / sec,
                    "vs_old": vs_old / sec if vs_old else None,
                    "floor_vs_dense": compact["dense_fp32"] / nbytes if nbytes else None,
                    "max_rel_err": err, "loadavg_start": load0, "reps": r, "note": args.note,
                    "cpu_flags": flags,
                })
                print(f"{th} thr  {section:7s} {name:26s} {sec * 1e3:9.3f} ms  {med['dense_fp32'] / sec:5.2f}x dense "
                      f"fp32  err {err:.1e}", flush=True)
    return rows


def cpu_flags() -> list[str]:
    """The ISA-relevant /proc/cpuinfo flags of the machine (what it could run, whatever was forced)."""
    from losa.inference.arith import _cpuinfo_flags

    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vbmi2", "avx512_bf16", "amx_bf16")
    have = _cpuinfo_flags()
    return [f for f in wanted if f in have]


def write_markdown(rows: list[dict], path: Path) -> None:
    runs: dict[str, list[dict]] = {}
    for r in rows:
        runs.setdefault(r["run"], []).append(r)
    lines = ["# AVX2 decode (and a bf16 prompt) through one 11008x4096 layer (benchmarks/bench_avx2_decode.py)", "",
             "Each `##` is one run; within a section the variants are timed interleaved round-robin, medians. "
             "`x dense fp32` = dense float32 `F.linear` time / variant time (same section); `floor` = dense bytes "
             "/ variant bytes, the ratio a purely bandwidth-bound loop would reach; `vs old` = old time / new "
             "time. `max rel err` = max abs error / max abs output against a float64 `F.linear` on the same "
             "(bf16-rounded) weights.", ""]
    for run, rs in runs.items():
        r0 = rs[0]
        forced = ", ".join(f"{k}={v}" for k, v in r0["forced_env"].items()) or "none"
        lines += [f"## {run}", "",
                  f"- command: `{r0['command']}`",
                  f"- CPU: {r0['cpu']} ({r0['cores']} cores; flags: {' '.join(r0.get('cpu_flags', []))}), torch "
                  f"{r0['torch']}; kernel ISA **{r0['kernel_isa']}** (forced: {forced})",
                  f"- {r0['shape']}, {r0['sparsity']:.0%} pruned (bf16 values unless noted); load average at the "
                  f"start of each section: {'; '.join(sorted({', '.join(f'{v:.2f}' for v in r['loadavg_start']) for r in rs}))}",
                  *([f"- note: {r0['note']}"] if r0.get("note") else []),
                  "", "| threads | section | batch | variant | median ms | GB/s | x dense fp32 | floor | vs old "
                  "| max rel err | repeats |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            def fmt(v, spec, suffix=""):
                return f"{v:{spec}}{suffix}" if v is not None else ""
            lines.append(f"| {r['threads']} | {r.get('section', 'decode')} | {r['batch']} | {r['variant']} | "
                         f"{r['median_ms']:.3f} | {fmt(r['gbps'], '.1f')} | {r['vs_dense_fp32']:.2f}x | "
                         f"{fmt(r['floor_vs_dense'], '.2f', 'x')} | {fmt(r['vs_old'], '.2f', 'x')} | "
                         f"{r['max_rel_err']:.1e} | {r['reps']} |")
        lines.append("")
    atomic_write_text(path, "\n".join(lines))


def main(argv=None) -> int:
    args = parse_args(argv)
    env = restrict_isa(args.isa)
    rows = measure(args, env)
    if args.quick:
        return 0
    jsonl = OUT.with_suffix(".jsonl")
    append_jsonl(jsonl, rows)
    all_rows = read_jsonl(jsonl)
    write_markdown(all_rows, OUT.with_suffix(".md"))
    print(f"wrote {jsonl} and {OUT.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
