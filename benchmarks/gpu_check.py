"""One prepared GPU check of LoSA at the scale users run it (run it once on a lent GPU, under 7 minutes).

On a LLaMA-7B-shaped random-weight bf16 model (32 decoder layers by default):

1. one LoSA step with a small budget (``losa.run``, T = 1): calibration, RMI Grams, pruning, dense
   targets and reconstruction errors, rank allocation, a few fine-tuning steps, the exact merge and the
   verified sparsity; wall time and peak GPU memory of every phase;
2. one-shot Wanda with layer onload (``offload=True``: the model stays in host memory and one decoder
   layer at a time comes to the GPU): peak GPU memory against the model's size;
3. one-shot SparseGPT of the whole model on the GPU: wall time and peak memory;
4. the 2:4 semi-structured path (``benchmarks/gpu_check_24.py``): a pruned model's logits and greedy tokens
   against the dense model's, and each LLaMA-7B layer shape's speed-up over dense ``F.linear``.

Writes one JSON and one markdown file after every section (a failing section is recorded with its error and
the next one runs; sections not started within ``--budget-s`` are skipped and recorded as such); exits 1 if a
section failed or a correctness check did not hold, 2 without CUDA, 3 if sections were skipped.
``LOSA_COMMIT``, when set, names the commit (a device machine's copy of the tree may carry stale git metadata).

Run on the device machine (its image has torch, transformers, accelerate, peft; carry the wheels of
pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions and gguf as the device README
says; results/gpu_check.md names the versions that worked):

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out $OUT

A CPU smoke test of the script itself (tiny shapes): ``python benchmarks/gpu_check.py --smoke``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _provenance import provenance  # noqa: E402

LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               vocab_size=32000, max_position_embeddings=4096)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
             max_position_embeddings=512)


def build_model(shape: dict, layers: int, device: str, dtype: torch.dtype):
    """A random LLaMA-shaped causal LM built on the meta device and initialised in place on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", num_hidden_layers=layers, **shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to_empty(device=device)
    # to_empty leaves buffers uninitialised: recompute the rotary inv_freq (else NaN logits now and then)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    fresh = dict(LlamaRotaryEmbedding(config=cfg).named_buffers())  # built on the CPU, copied over
    with torch.no_grad():
        for name, buf in model.model.rotary_emb.named_buffers():
            buf.copy_(fresh[name])
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.eval()
    return model


def word_tokenizer(vocab: int):
    """A word-level tokenizer over ``vocab`` ids, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


class PhaseMeter:
    """Wall time and peak accelerator memory of named phases (wrapping the functions that run them). Phases
    nest: an inner phase resets the peak counter, so the peak seen so far is credited to the enclosing phases
    first, and an inner phase's peak is theirs too."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.rows: dict[str, dict] = {}
        self.active: list[str] = []

    def _credit(self, names: list[str]) -> None:
        peak = torch.cuda.max_memory_allocated() / 2**30
        for name in names:
            self.rows[name]["peak_gib"] = max(self.rows[name]["peak_gib"], peak)

    @contextmanager
    def phase(self, name: str):
        row = self.rows.setdefault(name, {"s": 0.0, "peak_gib": 0.0, "calls": 0})
        if self.cuda:
            torch.cuda.synchronize()
            self._credit(self.active)
            torch.cuda.reset_peak_memory_stats()
        self.active.append(name)
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            row["s"] += time.perf_counter() - t
            row["calls"] += 1
            if self.cuda:
                self._credit(self.active)
            self.active.pop()

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def wrapped(*a, **k):
            with self.phase(name):
                return fn(*a, **k)

        setattr(owner, attr, wrapped)


def losa_step(args, device: str, meter: PhaseMeter) -> dict:
    """One LoSA step (:func:`_losa_step`) with its phases timed; the timing patches are undone even if it fails."""
    from losa.calib import engine
    from losa.pipelines.losa import loop, recon

    saved = [(o, a, getattr(o, a)) for o, a in ((loop, "_rmi_pass"), (loop, "reconstruction_errors"),
                                                (recon.DenseTargets, "compute"), (loop, "finetune"),
                                                (engine.LayerwiseEngine, "run"))]
    try:
        return _losa_step(args, device, meter)
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


def _losa_step(args, device: str, meter: PhaseMeter) -> dict:
    import losa
    from losa.calib import engine
    from losa.pipelines.losa import loop, recon

    meter.wrap(loop, "_rmi_pass", "RMI grams")
    meter.wrap(loop, "reconstruction_errors", "reconstruction errors")
    meter.wrap(recon.DenseTargets, "compute", "dense targets")
    meter.wrap(loop, "finetune", "fine-tuning")
    run_engine = engine.LayerwiseEngine.run

    def engine_run(self, visitor, *a, **k):  # the pruning pass (the other engine passes are wrapped above)
        if type(visitor).__name__ == "AdapterPruneVisitor":
            with meter.phase("pruning"):
                return run_engine(self, visitor, *a, **k)
        return run_engine(self, visitor, *a, **k)

    engine.LayerwiseEngine.run = engine_run
    shape = SMOKE if args.smoke else LLAMA7B
    with meter.phase("model init"):
        model = build_model(shape, args.layers, device, torch.bfloat16)
    tok = word_tokenizer(shape["vocab_size"])
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(4, shape["vocab_size"], (args.nsamples, args.seqlen), generator=gen)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "ft.jsonl"
        data.write_text("\n".join(json.dumps({"text": " ".join(f"w{int(i)}" for i in torch.randint(
            0, shape["vocab_size"] - 4, (args.ft_length,), generator=gen))}) for _ in range(args.ft_examples)))
        cfg = {"sparsity": 0.5, "steps": 1, "nsamples": args.nsamples, "seqlen": args.seqlen,
               "recon_nsamples": min(4, args.nsamples), "calib": "c4", "device": device,
               "finetune_data": str(data),
               "finetune": {"batch_size": 4, "max_length": args.ft_length, "lr": 1e-4, "bf16": device == "cuda",
                            "gradient_checkpointing": True}}
        t = time.perf_counter()
        with meter.phase("LoSA step (total)"):
            rep = losa.run(model, tok, cfg, out_dir=Path(tmp) / "run", calib_ids=calib, progress=False)
        total = time.perf_counter() - t
    ok = abs(rep.results.sparsity - 0.5) < 1e-3
    engine.LayerwiseEngine.run = run_engine
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"ok": ok, "sparsity": rep.results.sparsity, "total_s": total, "ranks": rep.steps[-1].ranks,
            "train_loss": rep.steps[-1].train_loss}


def onload_prune(args, device: str, meter: PhaseMeter) -> dict:
    import losa

    shape = SMOKE if args.smoke else LLAMA7B
    model = build_model(shape, args.layers, "cpu", torch.bfloat16)  # in host memory
    size_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    calib = torch.randint(4, shape["vocab_size"], (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(1))
    with meter.phase("one-shot Wanda, layer onload"):
        rep = losa.prune(model, None, losa.PruneConfig(method="wanda", sparsity=0.5, device=device, offload=True),
                         calib_ids=calib, progress=False)
    peak = meter.rows["one-shot Wanda, layer onload"]["peak_gib"]
    return {"ok": abs(rep.sparsity.overall - 0.5) < 1e-3, "model_gib": size_gib, "peak_gib": peak,
            "sparsity": rep.sparsity.overall}


def render(res: dict) -> str:
    v = res["versions"]
    lines = ["# GPU check: LoSA on a LLaMA-7B-shaped random bf16 model", "",
             f"{res['provenance']['date']}, commit {res['provenance']['commit']}, {res['device_name']} "
             f"(torch {v['torch']}, transformers {v['transformers']}, CUDA {v['cuda']}); "
             f"{res['args']['layers']} decoder layers, calibration {res['args']['nsamples']}x{res['args']['seqlen']}, "
             f"{res['args']['ft_examples']} fine-tuning examples of {res['args']['ft_length']} tokens.", "",
             f"Command: `{res['provenance']['command']}`", "",
             "| phase | calls | wall s | peak GPU memory GiB |", "|---|---|---|---|"]
    for name, row in res["phases"].items():
        lines.append(f"| {name} | {row['calls']} | {row['s']:.1f} | {row['peak_gib']:.2f} |")
    lines.append("")
    if "losa" in res:
        lines.append(f"- LoSA step: verified sparsity {res['losa']['sparsity']:.4f}, ok={res['losa']['ok']}")
    if "onload" in res:
        lines.append(f"- layer onload: model {res['onload']['model_gib']:.1f} GiB in host memory, GPU peak "
                     f"{res['onload']['peak_gib']:.2f} GiB, ok={res['onload']['ok']}")
    if "sparsegpt" in res:
        lines.append(f"- one-shot SparseGPT: sparsity {res['sparsegpt']['sparsity']:.4f}, ok={res['sparsegpt']['ok']}")
    if "semi_structured" in res:
        m = res["semi_structured"]
        if "auto" in m:
            lines.append(f"- 2:4 model, `sparsify_for_inference` (semi_structured='auto'): {m['auto']['replaced']} "
                         f"linears converted, {m['auto']['semi_structured_slower']} kept dense as not faster")
        lines.append(f"- 2:4 semi-structured model (every linear converted): logits max rel. error "
                     f"{m['logit_rel_err']:.2e}, {m['tokens_equal']}/{m['tokens_total']} greedy tokens equal, "
                     f"generate {m['generate_dense_s']:.2f} s dense vs {m['generate_sparse_s']:.2f} s 2:4, ok={m['ok']}")
    if "semi_structured_layers" in res:
        lines += ["", "| dtype | shape | batch | max rel. error | 2:4 speed-up vs dense F.linear |", "|---|---|---|---|---|"]
        for r in res["semi_structured_layers"]["rows"]:
            shape = "x".join(map(str, r["shape"]))
            if "error" in r:
                lines.append(f"| {r['dtype']} | {shape} | {r['batch']} | {r['error']} | |")
            else:
                lines.append(f"| {r['dtype']} | {shape} | {r['batch']} | {r['rel_err']:.1e} | {r['speedup']:.2f}x |")
    for key in res["skipped"]:
        lines.append(f"- {key}: skipped (past --budget-s)")
    for key, err in res["errors"].items():
        lines += [f"- {key}: FAILED", "", "```", err.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def sparsegpt_oneshot(args, device: str, meter: PhaseMeter) -> dict:
    """One-shot SparseGPT 50 % of the whole model held on the accelerator (the path users take when it fits)."""
    import losa

    shape = SMOKE if args.smoke else LLAMA7B
    model = build_model(shape, args.layers, device, torch.bfloat16)
    calib = torch.randint(4, shape["vocab_size"], (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(2))
    with meter.phase("one-shot SparseGPT, model on the GPU"):
        rep = losa.prune(model, None, losa.PruneConfig(method="sparsegpt", sparsity=0.5, device=device),
                         calib_ids=calib, progress=False)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"ok": abs(rep.sparsity.overall - 0.5) < 1e-3, "sparsity": rep.sparsity.overall}


def write(res: dict, out: Path, name: str) -> None:
    """The JSON and markdown so far (after every section, so that a run stopped at its time limit keeps them)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
    (out / f"{name}.md").write_text(render(res))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ft-examples", type=int, default=64)
    ap.add_argument("--ft-length", type=int, default=256)
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="sections not started within this many seconds of the start are skipped")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, measures nothing")
    args = ap.parse_args()
    if args.smoke:
        args.layers, args.nsamples, args.seqlen, args.ft_examples, args.ft_length = 2, 4, 32, 8, 32
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no CUDA device; run this on a GPU (or --smoke on the CPU)")
        return 2
    device = "cuda" if cuda else "cpu"
    meter = PhaseMeter(cuda)
    import transformers

    res: dict = {"provenance": provenance(torch.get_num_threads(), "random LLaMA-7B-shaped bf16"),
                 "device_name": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "args": vars(args),
                 "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                              "cuda": torch.version.cuda}, "phases": meter.rows, "errors": {}, "skipped": []}
    out, name = Path(args.out), "gpu_check_smoke" if args.smoke else "gpu_check"
    sections = [("losa", lambda: losa_step(args, device, meter)),
                ("onload", lambda: onload_prune(args, device, meter)),
                ("sparsegpt", lambda: sparsegpt_oneshot(args, device, meter))]
    if cuda:
        import gpu_check_24

        def semi_structured() -> dict:
            check, ok = gpu_check_24.model_check()
            return check | {"ok": ok}

        def semi_structured_layers() -> dict:
            rows, ok = gpu_check_24.layer_checks()
            return {"rows": rows, "ok": ok}

        sections += [("semi_structured", semi_structured), ("semi_structured_layers", semi_structured_layers)]
    start = time.perf_counter()
    for key, fn in sections:
        if time.perf_counter() - start > args.budget_s:
            res["skipped"].append(key)
            continue
        print(f"== {key}", flush=True)
        try:
            res[key] = fn()
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others' results
            res["errors"][key] = "".join(traceback.format_exception(e)[-6:])
            print(res["errors"][key], flush=True)
        write(res, out, name)
    write(res, out, name)  # the sections skipped after the last one that ran are recorded too
    ok = not res["errors"] and all(res[k].get("ok", True) for k, _ in sections if k in res)
    print(render(res))
    if res["skipped"]:
        print(f"skipped past --budget-s {args.budget_s:g}: {', '.join(res['skipped'])}")
    return (0 if not res["skipped"] else 3) if ok else 1


if __name__ == "__main__":
    sys.exit(main())
