"""A measured memory model of losa's phases, and what it predicts for LLaMA-7B / 13B / 70B (issue 14, item 4).

Every phase of a LoSA run (and one-shot pruning) runs in its own subprocess on a random LLaMA-7B-shaped
bf16 model with only a few decoder layers (``gpu_check.build_model``). The subprocess builds the model,
does the phase's prerequisites (adapters, dense targets, imports), trims the heap, resets the peak-RSS
counter (``/proc/self/clear_refs`` ``5``), runs the phase and reads ``VmHWM``: the phase's own peak over
what was resident just before it. The measured extras are fitted, per phase, against the regressors the
code says they depend on (calibration tokens, tokens per forward batch, decoder layers, fine-tuning
tokens), each coefficient is compared with the byte count the shapes give, a third model size that was
not fitted on is measured and predicted, and the fit (scaled by the analytic shape terms) predicts the
peak GPU memory of LLaMA-2-7B / 13B / 70B at the paper's settings.

    python benchmarks/bench_memory.py            # the full grid (~20 min on 2 cores), then fit + render
    python benchmarks/bench_memory.py --quick    # a small smoke grid (1-2 layers, few tokens), own files
    python benchmarks/bench_memory.py --render-only

Results: ``benchmarks/results/memory_model.{jsonl,md}`` (``memory_model_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _rows import append_jsonl, read_jsonl  # noqa: E402

from losa.utils.io import atomic_write_text  # noqa: E402

RESULTS = HERE / "results"
GIB = 2**30
MIB = 2**20

#: the measured shape (``gpu_check.LLAMA7B``) in the analytic functions' notation
M7B = dict(h=4096, i=11008, nh=32, nkv=32, V=32000)
#: prediction targets: (L, shape); LLaMA-3 rows show the effect of the 128K vocabulary
TARGETS = {
    "LLaMA-2-7B": dict(L=32, h=4096, i=11008, nh=32, nkv=32, V=32000),
    "LLaMA-2-13B": dict(L=40, h=5120, i=13824, nh=40, nkv=40, V=32000),
    "LLaMA-2-70B": dict(L=80, h=8192, i=28672, nh=64, nkv=8, V=32000),
    "LLaMA-3-8B": dict(L=32, h=4096, i=14336, nh=32, nkv=8, V=128256),
    "LLaMA-3-70B": dict(L=80, h=8192, i=28672, nh=64, nkv=8, V=128256),
}
#: the paper's settings (LoSA reference code, github.com/wzhuang-xmu/LoSA main.py): calibration C4 128 x 2048;
#: RMI on 64 (7B) / 32 (13B) windows there, but losa's RMI pass uses all ``nsamples`` windows (128 here);
#: fine-tuning 10K Alpaca-GPT4 examples, per-device batch 4 (7B) / 2 (13B), max_seq_length 1024, gradient
#: checkpointing (prepare_model_for_kbit_training); 70B is not in the reference code: batch 1 x 1024 assumed.
#: losa's recon_nsamples default: 16 windows. Peak = the worst batch, every example at 1024 tokens.
PAPER = dict(nsamples=128, seqlen=2048, recon=16, r_max=16)
FT_BATCH = {"LLaMA-2-7B": 4, "LLaMA-2-13B": 2, "LLaMA-2-70B": 1, "LLaMA-3-8B": 4, "LLaMA-3-70B": 1}
FT_SEQ = 1024
CUDA_CTX_GIB = 0.75  # CUDA context + cuBLAS workspaces, not counted by torch.cuda.max_memory_allocated (0.5-1 GB)
AUTO_BATCH_TOKENS = 1024  # losa.pipelines.config.AUTO_BATCH_TOKENS
#: resident keep-mask bytes per adapted weight as built: ``SparseLoRALinear.mask_bits`` holds one bit per weight
MASK_BYTES = 1 / 8
#: the same for rows measured before bit-packing (no ``mask_bytes`` field): a bool mask, a whole byte per weight
MASK_BYTES_BOOL = 1.0

ENGINE = ["calibration", "rmi", "prune_wanda", "oneshot_wanda", "dense_targets", "recon", "teacher_cache"]
TOPK = 64  # teacher_topk of the teacher-cache rows
GROUP_TOKENS = 16384  # TeacherTopK.compute's group_tokens: padded tokens per engine pass
#: phases whose peak is the larger of two stages that do not overlap in time: the pruning visit (the layer's
#: inputs only, + per-module temporaries) and the propagation forward (inputs + outputs + one batch's
#: transients, as in the calibration pass); the others add their terms (they coincide with the forward)
MAXKIND = ("prune_wanda", "oneshot_wanda", "prune_sparsegpt")
#: fine-tuning-like rows (batch × seq tokens); loss_*: the LM head + loss forward and backward alone
FT_PHASES = ("finetune", "finetune_distill", "finetune_topk", "loss_label", "loss_distill", "loss_topk")
PHASE_TEXT = {
    "calibration": "engine pass, no statistics (capture + one layer at a time over all windows)",
    "rmi": "RMI Gram pass (`loop._rmi_pass`), adapters attached",
    "prune_wanda": "LoSA pruning pass, Wanda (`AdapterPruneVisitor`: merge, prune, unmerge per layer)",
    "prune_sparsegpt": "LoSA pruning pass, SparseGPT (layer order; one Hessian per linear)",
    "oneshot_wanda": "one-shot `losa.prune` Wanda 50 % (no adapters; + verification)",
    "dense_targets": "`DenseTargets.compute` (dense layer outputs into a memory-mapped .npy)",
    "recon": "`reconstruction_errors` against the memory-mapped dense targets, adapters attached",
    "teacher": "distillation teacher: `copy.deepcopy(model)` (LoSARun.setup)",
    "finetune": "fine-tuning, 2 optimizer steps (Trainer, AdamW, gradient checkpointing), label loss",
    "finetune_distill": "fine-tuning as above with KL distillation from the teacher copy",
    "teacher_cache": f"`TeacherTopK.compute`: the dense model's top-{TOPK} next-token log-probs of every "
                     "fine-tuning token (engine pass + the model's head after the last layer), memory-mapped",
    "finetune_topk": f"fine-tuning with distillation from the top-{TOPK} teacher cache (no teacher copy)",
    "loss_topk": "final norm + LM head + `topk_distill_loss` against cached top-k targets, forward and backward",
    "loss_label": "final norm + LM head + the label loss (`model.loss_function`), forward and backward",
    "loss_distill": "final norm + LM head (student, and teacher without grad) + `distill_loss`, forward and backward",
}


# ----------------------------------------------------------------------------------------------- shapes
def hkv(s: dict) -> int:
    return s["h"] * s["nkv"] // s["nh"]


def lin_params(s: dict) -> int:
    """Weights of one decoder layer's seven linears (q, k, v, o, gate, up, down)."""
    h, i = s["h"], s["i"]
    return 2 * h * h + 2 * h * hkv(s) + 3 * h * i


def layer_params(s: dict) -> int:
    return lin_params(s) + 2 * s["h"]  # + the two RMSNorms


def fixed_params(s: dict) -> int:
    return 2 * s["V"] * s["h"] + s["h"]  # embed_tokens + lm_head (untied) + final norm


def io_sum(s: dict) -> int:
    """Σ (in + out) over the seven linears of a layer (LoRA A is [r, in], B is [out, r])."""
    h, i, k = s["h"], s["i"], hkv(s)
    return 2 * (h + h) + 2 * (h + k) + 2 * (h + i) + (i + h)


def max_module(s: dict) -> int:
    return s["h"] * s["i"]


def weights_b(s: dict, L: int) -> int:
    return 2 * (L * layer_params(s) + fixed_params(s))


def adapters_b(s: dict, L: int, r_max: int = 16, mask_bytes: float = MASK_BYTES) -> float:
    """Resident adapter state per model: the keep-mask (``mask_bytes`` per weight: bit-packed as built, a bool
    per weight before) + fp32 lora_A / lora_B of capacity r_max.

    Args:
        s: the shape (notation of :data:`TARGETS`).
        L: decoder layers.
        r_max: adapter capacity.
        mask_bytes: mask bytes per adapted weight.
    Returns:
        bytes.
    """
    return L * (mask_bytes * lin_params(s) + 4 * r_max * io_sum(s))


def row_mask_bytes(r: dict) -> float:
    """Mask bytes per weight of the code a measured row ran on (rows before bit-packing carry no field)."""
    return float(r.get("mask_bytes", MASK_BYTES_BOOL))


# --------------------------------------------------------------------------- analytic working sets
# Byte counts read off the code (see the results file for the derivation); the fit is checked against them.
def a_tok(s: dict) -> float:
    """Engine, per calibration token kept for a whole layer: inputs + outputs (bf16) + cos/sin kwargs."""
    return 2 * 2 * s["h"] + 2 * 2 * (s["h"] // s["nh"])


def a_batch(s: dict, phase: str) -> float:
    """Engine, per token of one forward batch: the transients of one layer's forward (and of the visitor's work
    on that batch where it overlaps). The layer's peak is its MLP: three i-wide bf16 tensors alive at once
    (gate/act, up, their product) + the residual, the norm output and its fp32 temporaries (the attention
    block, q/k/v + rotated copies + output, is smaller)."""
    h, i, k = s["h"], s["i"], hkv(s)
    mlp = 2 * 3 * i + 6 * h
    attn = 2 * (h + 2 * k) + 2 * (h + k) + 8 * h
    fwd = max(mlp, attn)
    if phase in ("rmi", "recon"):
        # unmerged adapters: the peak is a linear's fp32 delta (12 B × weights, in a_fix), formed while the MLP
        # holds one i-wide tensor (gate's output for up, the product for down) + the residual stream; the
        # error computation per batch afterwards (~30 B × hidden per token) stays below it
        return 2 * i + 6 * h
    if phase == "teacher_cache":  # after the last layer, per batch: bf16 logits, fp32 copy, log-softmax
        return max(fwd, 10 * s["V"])
    if phase in MAXKIND:  # the statistics pass: + the fp32 copy of the widest input and its square (Wanda)
        return fwd + 8 * i
    return fwd


def a_fix(s: dict, phase: str) -> float:
    """Shape-only (no token, no layer count) working bytes of a phase."""
    m, p = max_module(s), lin_params(s)
    h, i = s["h"], s["i"]
    if phase == "prune_wanda":  # pre-merge clones of the layer (bf16) + merge/unmerge fp32 temporaries
        return 2 * p + 28 * m
    if phase == "oneshot_wanda":  # |W|.float() * norm, kthvalue, masks, W * mask
        return 16 * m
    if phase == "prune_sparsegpt":  # 7 Hessians fp32 + 3 in^2 inverse temporaries + W fp32 clone/blocks + clones
        hess = 4 * (6 * h * h + i * i)
        return 2 * p + hess + 3 * 4 * i * i + 12 * m
    if phase == "rmi":  # unmerged adapters: fp32 (B A)·s, mask and delta [out, in]; the Gram's bf16 / f64 blocks
        return 12 * m + 2 * (1 << 24) + 8 * (1 << 20)
    if phase == "recon":
        return 12 * m
    if phase.startswith("finetune"):  # one layer's saved mask fp32 + delta fp32 + backward temps
        return 8 * p + 12 * m
    return 0.0


def a_layer(s: dict, phase: str, n: int = 0, k: int = 0, seq: int = 0, t: int = 0) -> float:
    """Per decoder layer (the regressor's coefficient is per layer)."""
    if phase == "rmi":
        return 8 * n * n  # float64 Gram
    if phase in ("dense_targets", "recon"):  # memory-mapped file pages (host page cache, in RSS on the CPU)
        return 2 * k * seq * s["h"]  # of L - 1 layers at the peak (the last layer's forward): see mmap_layers
    if phase.startswith("finetune"):
        return 2 * t * s["h"]  # the checkpointed hidden state of every layer (bf16)
    return 0.0


def mmap_layers(phase: str, L: int) -> int:
    """Layers whose mmap pages are resident at the peak: written / read up to the layer before the last."""
    return L - 1 if phase in ("dense_targets", "recon") else L


def lora_state(s: dict) -> float:
    """Fine-tuning, per layer: LoRA gradients + AdamW m, v (fp32, the full r_max = 16 capacity)."""
    return 12 * 16 * io_sum(s)


def a_ft_tok(s: dict) -> float:
    """Fine-tuning, per token, in the backward of one checkpointed layer: its recomputed saved activations
    (fp32 LoRA-branch inputs, bf16 projections, attention, MLP, fp32 norm inputs)."""
    h, i, k = s["h"], s["i"], hkv(s)
    return 4 * (6 * h + i) + 2 * (3 * h + i) + 2 * (h + k) + 2 * (2 * h + 2 * k) + 6 * 2 * i + 16 * h


def loss_kind(key_: str) -> bool | str:
    """``a_loss``'s ``distill`` argument for a loss name (label, distill, topk)."""
    return {"label": False, "distill": True, "topk": "topk"}[key_]


def a_loss(s: dict, distill: bool | str = False) -> float:
    """Per token, the loss stage (forward end + loss backward), which does not overlap a layer's backward:
    label loss: bf16 logits, their fp32 copy, log-softmax, gradients (~16 B per vocabulary entry);
    distillation: student + teacher logits, both fp32 log-softmaxes, exp, difference, gradients (~36 B)."""
    if distill == "topk":  # the student's full fp32 log-softmax and its gradient; the k-wide terms are small
        return 16 * s["V"] + 40 * TOPK
    return (36 if distill else 16) * s["V"]


# ----------------------------------------------------------------------------------------------- RSS
def status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1])
    return out


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler(threading.Thread):
    """Samples RssAnon and RssFile+RssShmem every 2 ms (VmHWM has no anon/file split)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.anon = self.file = 0

    def run(self) -> None:
        while not self.stop.is_set():
            st = status_kb()
            self.anon = max(self.anon, st["RssAnon"])
            self.file = max(self.file, st["RssFile"] + st.get("RssShmem", 0))
            time.sleep(0.002)


# -------------------------------------------------------------------------------------------- worker
def build(layers: int):
    """``gpu_check.build_model``: a random LLaMA-7B-shaped bf16 model (rotary buffers recomputed there)."""
    import gpu_check
    import torch

    return gpu_check.build_model(gpu_check.LLAMA7B, layers, "cpu", torch.bfloat16)


def run_phase(phase: str, layers: int, n: int, seq: int, k: int, batch: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import gpu_check
    from _provenance import provenance

    import losa  # noqa: F401  (imports count in the baseline)
    from losa.calib.engine import LayerwiseEngine
    from losa.calib.visitor import LayerVisitor
    from losa.lora.config import SparseLoRAConfig
    from losa.lora.model import add_sparse_lora, set_layer_ranks, sparse_lora_modules
    from losa.pipelines.losa import loop
    from losa.pipelines.losa.config import LoSAConfig
    from losa.pipelines.losa.recon import DenseTargets, reconstruction_errors
    from losa.pipelines.losa.visitors import AdapterPruneVisitor
    from losa.pruning.target import Target

    model_id = f"random LLaMA-7B-shaped bf16, {layers} layers"
    argv = sys.argv[:sys.argv.index("--single")] if "--single" in sys.argv else sys.argv
    prov = provenance(torch.get_num_threads(), model_id, argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build(layers)
    build_s = time.perf_counter() - t0
    trim()
    rss_model = status_kb()["VmRSS"] / 1024
    ids = torch.randint(4, gpu_check.LLAMA7B["vocab_size"], (n, seq), generator=torch.Generator().manual_seed(0))
    cb = max(1, AUTO_BATCH_TOKENS // max(seq, 1))  # LoSAConfig.calib_batch(): about 1024 tokens per forward
    tmp = Path(tempfile.mkdtemp(prefix="losa-mem-"))
    extra: dict = {}

    def adapters():
        add_sparse_lora(model, SparseLoRAConfig(r_max=16, rank=6, alpha=16.0, init_seed=0))
        return {id(m.base): m for m in sparse_lora_modules(model).values()}

    cfg = LoSAConfig(nsamples=max(n, 2), seqlen=max(seq, 2), recon_nsamples=max(1, k), device="cpu",
                     method="sparsegpt" if phase == "prune_sparsegpt" else "wanda")
    wrappers: dict = {}
    # ---- prerequisites (resident before the phase; not part of its peak)
    if phase in ("rmi", "prune_wanda", "prune_sparsegpt"):
        wrappers = adapters()
        if phase == "prune_sparsegpt":
            from losa.pruning.sparsegpt import obs_kernel

            extra["kernel"] = obs_kernel() is not None
    elif phase == "recon":
        dense = DenseTargets.compute(model, ids[:k], tmp / "t.npy", cb, "cpu")
        wrappers = adapters()
    elif phase in ("finetune", "finetune_distill", "finetune_topk"):
        from losa.finetune.config import FinetuneConfig
        from losa.finetune.teacher import TeacherTopK
        from losa.finetune.train import finetune

        gen = torch.Generator().manual_seed(1)
        examples = []
        for _ in range(2 * batch):  # two optimizer steps: the second one holds the AdamW states
            row = torch.randint(4, gpu_check.LLAMA7B["vocab_size"], (seq,), generator=gen).tolist()
            examples.append({"input_ids": row, "labels": row})
        teacher = cache = None
        if phase == "finetune_distill":  # as LoSARun.setup: before the adapters
            import copy

            teacher = copy.deepcopy(model).eval().requires_grad_(False)
        elif phase == "finetune_topk":
            cache = TeacherTopK.compute(model, examples, tmp / "tc", TOPK, device="cpu")
            examples = [{**e, "teacher_index": i} for i, e in enumerate(examples)]
        wrappers = adapters()
        set_layer_ranks(model, [8] * layers)
        ftc = FinetuneConfig(batch_size=batch, max_length=seq, lr=1e-4, gradient_checkpointing=True,
                             distill=phase != "finetune", teacher_topk=TOPK if phase == "finetune_topk" else 0)
    elif phase == "teacher":
        import copy
    elif phase in ("loss_label", "loss_distill", "loss_topk"):
        from losa.finetune.train import distill_loss, topk_distill_loss

        gen = torch.Generator().manual_seed(2)
        hid = torch.randn(batch, seq, model.config.hidden_size, generator=gen).to(torch.bfloat16).requires_grad_()
        labels = torch.randint(4, model.config.vocab_size, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        t_idx = torch.randint(0, model.config.vocab_size, (batch, seq, TOPK), generator=gen)
        t_lp = torch.randn(batch, seq, TOPK, generator=gen).log_softmax(-1)
    elif phase == "teacher_cache":
        from losa.finetune.teacher import TeacherTopK

        gen = torch.Generator().manual_seed(1)
        tc_examples = [{"input_ids": torch.randint(4, model.config.vocab_size, (seq,), generator=gen).tolist()}
                       for _ in range(n)]
    trim()
    before = status_kb()
    rss_before = before["VmRSS"] / 1024
    if not reset_peak():
        raise SystemExit("cannot reset VmHWM (/proc/self/clear_refs); this benchmark needs Linux >= 4.0")
    sampler = Sampler()
    sampler.start()
    t = time.perf_counter()
    # ---- the phase
    if phase == "calibration":
        LayerwiseEngine(model, ids, device="cpu", batch_size=cb, progress=False).run(LayerVisitor())
    elif phase == "rmi":
        loop._rmi_pass(model, ids, cfg, False, wrappers)
    elif phase in ("prune_wanda", "prune_sparsegpt"):
        LayerwiseEngine(model, ids, device="cpu", batch_size=cb, progress=False).run(
            AdapterPruneVisitor(cfg.pruner(), [Target(sparsity=0.5)] * layers, wrappers))
    elif phase == "oneshot_wanda":
        rep = losa.prune(model, None, losa.PruneConfig(method="wanda", sparsity=0.5, nsamples=n, seqlen=seq,
                                                       device="cpu"), calib_ids=ids, progress=False)
        extra["sequential"] = rep.sequential
    elif phase == "dense_targets":
        DenseTargets.compute(model, ids[:k], tmp / "t.npy", cb, "cpu")
    elif phase == "teacher_cache":
        TeacherTopK.compute(model, tc_examples, tmp / "tc", TOPK, device="cpu")
    elif phase == "recon":
        reconstruction_errors(model, ids[:k], dense, cb, "cpu")
    elif phase == "teacher":
        keep = copy.deepcopy(model).eval().requires_grad_(False)
        extra["teacher_params"] = sum(p.numel() for p in keep.parameters())
    elif phase in ("finetune", "finetune_distill", "finetune_topk"):
        res = finetune(model, examples, ftc, 0, teacher=teacher, progress=False, teacher_cache=cache)
        extra["ft_steps"] = res["steps"]
    elif phase in ("loss_label", "loss_distill", "loss_topk"):  # what the model / _LosaTrainer do after the layers
        logits = model.lm_head(model.model.norm(hid))
        if phase == "loss_label":
            loss = model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size)
        elif phase == "loss_topk":
            loss = topk_distill_loss(logits, t_idx, t_lp, mask)
        else:
            with torch.no_grad():
                t_logits = model.lm_head(model.model.norm(hid.detach()))
            loss = distill_loss(logits, t_logits, mask)
        loss.backward()
    else:
        raise SystemExit(f"unknown phase {phase}")
    wall = time.perf_counter() - t
    if wrappers:  # the resident mask layout of the code measured (row_mask_bytes)
        mods = list(wrappers.values())
        extra["mask_bytes"] = (sum(sum(b.nbytes for n_, b in m.named_buffers() if "mask" in n_) for m in mods)
                               / sum(m.lora_B.shape[0] * m.lora_A.shape[1] for m in mods))
    sampler.stop.set()
    sampler.join()
    peak = status_kb()["VmHWM"] / 1024
    shutil.rmtree(tmp, ignore_errors=True)
    tokens = n * seq if phase in ENGINE or phase == "prune_sparsegpt" else 0
    used = k if phase in ("dense_targets", "recon") else n  # windows the pass runs over
    return {"phase": phase, "layers": layers, "nsamples": n, "seqlen": seq, "tokens": tokens,
            "batch_tokens": min(used, cb) * seq if tokens else 0, "recon_windows": k if phase in ("dense_targets", "recon") else 0,
            "ft_batch": batch if phase in FT_PHASES else 0,
            "ft_tokens": batch * seq if phase in FT_PHASES else 0,
            "rss_model_mib": round(rss_model, 1), "rss_before_mib": round(rss_before, 1), "peak_mib": round(peak, 1),
            "extra_mib": round(peak - rss_before, 1),
            "sampled_anon_extra_mib": round((sampler.anon - before["RssAnon"]) / 1024, 1),
            "sampled_file_extra_mib": round((sampler.file - before["RssFile"] - before.get("RssShmem", 0)) / 1024, 1),
            "build_s": round(build_s, 1), "phase_s": round(wall, 1),
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"), **extra, **prov}


# ---------------------------------------------------------------------------------------------- grid
def grid(quick: bool) -> list[dict]:
    """The measurements: ``set`` fit (fitted on), check (single points vs analytic) or heldout."""
    jobs: list[dict] = []

    def add(phase, L, n=0, seq=0, k=0, batch=0, kind="fit"):
        jobs.append(dict(phase=phase, layers=L, n=n, seq=seq, k=k, batch=batch, set=kind))

    if quick:  # a smoke run of every code path (numbers too small to mean much)
        eng, eng_l, held_eng = [(1, 2, 256), (1, 4, 256)], (2, 2, 256), (2, 2, 512)
        ft, held_ft, lay, held_l, sgpt = [(1, 1, 64), (1, 1, 128), (2, 1, 64)], (2, 1, 96), (1, 2), 3, (1, 2, 256)
    else:
        # calibration tokens 2048 / 8192 at 1024 tokens per forward (2 windows of 512), and 4 layers at 2048;
        # held out: 3 layers, 2 windows of 2048 (4096 tokens, 2048 per forward, as at the paper's seqlen)
        eng, eng_l, held_eng = [(2, 4, 512), (2, 16, 512)], (4, 4, 512), (3, 2, 2048)
        ft, held_ft, lay, held_l, sgpt = [(2, 2, 128), (2, 2, 256), (4, 2, 128), (4, 2, 256)], (3, 1, 1024), \
            (2, 4), 3, (1, 4, 512)
    for phase in ENGINE:
        for L, n, seq in eng + ([eng_l] if phase != "oneshot_wanda" else []):  # one-shot: layer count from prune
            add(phase, L, n, seq, max(1, n // 2))
    for L, b, s in ft:
        add("finetune", L, seq=s, batch=b)
    for L in lay:
        add("teacher", L)
    add("prune_sparsegpt", *sgpt, kind="check")
    add("finetune_distill", ft[1][0], seq=ft[1][2], batch=ft[1][1], kind="check")
    add("finetune_topk", ft[1][0], seq=ft[1][2], batch=ft[1][1], kind="check")
    for phase in ("loss_label", "loss_distill", "loss_topk"):  # the loss stage alone, at a token count where it is large
        add(phase, 1, seq=256 if quick else 1024, batch=2, kind="check")
    L, n, seq = held_eng
    for phase in ENGINE:
        add(phase, L, n, seq, max(1, n // 2), kind="heldout")
    L, b, s = held_ft
    add("finetune", L, seq=s, batch=b, kind="heldout")
    add("teacher", held_l, kind="heldout")
    # a second held-out size, defined and measured after the batch-transient counts were revised (see the
    # results file): 5 layers, 3 windows of 1024 (one per forward), fine-tuning 2 × 192
    L2, n2, s2, b2, f2 = (2, 2, 384, 1, 160) if quick else (5, 3, 1024, 2, 192)  # RMI needs >= 2 windows
    for phase in ("calibration", "rmi", "dense_targets", "recon", "teacher_cache"):
        add(phase, L2, n2, s2, max(1, n2 // 2), kind="heldout2")
    add("finetune", L2, seq=f2, batch=b2, kind="heldout2")
    return jobs


def key(j: dict) -> tuple:
    return (j["phase"], j["layers"], j.get("nsamples", j.get("n")), j["seqlen"] if "seqlen" in j else j["seq"],
            j.get("recon_windows", j.get("k")) if j["phase"] in ("dense_targets", "recon") else 0,
            j.get("ft_batch", j.get("batch")) if j["phase"] in FT_PHASES else 0)


# ----------------------------------------------------------------------------------------------- fit
def _lstsq(X: list[list[float]], y: list[float]) -> list[float]:
    import numpy as np

    return [float(v) for v in np.linalg.lstsq(np.asarray(X, float), np.asarray(y, float), rcond=None)[0]]


def known_terms(r: dict, s: dict = M7B) -> float:
    """Working-set bytes fixed analytically (not fitted): per-layer terms (Grams, mmap pages, LoRA optimizer
    state, checkpointed hidden states)."""
    ph, L = r["phase"], r["layers"]
    known = mmap_layers(ph, L) * a_layer(s, ph, r["nsamples"], r.get("recon_windows", 0), r["seqlen"],
                                         r.get("ft_tokens", 0))
    if (ph in ENGINE or ph == "prune_sparsegpt") and ph not in MAXKIND:
        known += a_batch(s, ph) * r["batch_tokens"]  # one forward batch's transients: analytic, not fitted
    return known


def regressors(r: dict) -> list[float]:
    if r["phase"] in ENGINE or r["phase"] == "prune_sparsegpt":
        tok = r["recon_windows"] * r["seqlen"] if r["phase"] in ("dense_targets", "recon") else r["tokens"]
        return [1.0, float(tok)]
    if r["phase"].startswith("finetune"):
        return [1.0, float(r["layers"]), float(r["ft_tokens"])]
    return [1.0, float(r["layers"])]


def analytic_coefs(phase: str, s: dict = M7B) -> list[float]:
    """The analytic counterparts of the fitted coefficients (same order as :func:`regressors`)."""
    if phase in ENGINE or phase == "prune_sparsegpt":
        return [a_fix(s, phase), a_tok(s) / 2 if phase in MAXKIND else a_tok(s)]
    if phase.startswith("finetune"):
        return [a_fix(s, phase), lora_state(s), a_ft_tok(s)]
    return [2 * fixed_params(s), 2 * layer_params(s)]  # teacher: a second copy of the weights


def fit(rows: list[dict]) -> dict:
    """Per phase: least squares of (extra − analytic per-layer terms) on its regressors, fit rows only.
    Also the baseline (RSS after building the model) and the adapters' residency against the layer count."""
    out: dict = {"phases": {}}
    for phase in ENGINE + ["finetune", "teacher"]:
        pts = [r for r in rows if r["phase"] == phase and r["set"] == "fit"]
        if len(pts) < 2:
            continue
        X = [regressors(r) for r in pts]
        y = [r["extra_mib"] * MIB - (known_terms(r) if phase != "teacher" else 0.0) for r in pts]
        coef = _lstsq(X, y)
        resid = [(yy - sum(a * b for a, b in zip(coef, x))) / MIB for x, yy in zip(X, y)]
        out["phases"][phase] = {"coef": coef, "analytic": analytic_coefs(phase), "resid_mib": resid, "n": len(pts)}
    for r in [r for r in rows if r["phase"] == "prune_sparsegpt" and r["set"] == "check"][:1]:
        an = analytic_coefs("prune_sparsegpt")
        rho = (r["extra_mib"] * MIB - known_terms(r)) / sum(a * x for a, x in zip(an, regressors(r)))
        out["phases"]["prune_sparsegpt"] = {"coef": [a * rho for a in an], "analytic": an, "resid_mib": [0.0],
                                            "n": 1, "single": rho}
    out["loss"] = {}  # measured / analytic of the loss stage (loss_* check rows)
    for r in rows:
        if r["phase"].startswith("loss_") and r["set"] == "check":
            key_ = r["phase"].split("_")[1]
            out["loss"][key_] = r["extra_mib"] * MIB / (a_loss(M7B, loss_kind(key_)) * r["ft_tokens"])
    out["resident"] = {}  # RSS just before each phase against the layer count (the held-out total peak)
    for phase in ENGINE + ["finetune", "teacher"]:
        pts = [r for r in rows if r["phase"] == phase and r["set"] == "fit"]
        if len({r["layers"] for r in pts}) > 1:
            out["resident"][phase] = _lstsq([[1.0, r["layers"]] for r in pts], [r["rss_before_mib"] * MIB for r in pts])
    base = [r for r in rows if r["phase"] in ENGINE + ["teacher"] and r["set"] == "fit"]
    if base:
        c = _lstsq([[1.0, r["layers"]] for r in base], [r["rss_model_mib"] * MIB for r in base])
        out["baseline"] = {"coef": c, "analytic": [2 * fixed_params(M7B), 2 * layer_params(M7B)], "n": len(base),
                           "spread_mib": max(r["rss_model_mib"] for r in base if r["layers"] == base[0]["layers"])
                           - min(r["rss_model_mib"] for r in base if r["layers"] == base[0]["layers"])}
    ad = [r for r in rows if r["phase"] in ("rmi", "prune_wanda") and r["set"] == "fit"]
    if ad and len({r["layers"] for r in ad}) > 1:
        c = _lstsq([[1.0, r["layers"]] for r in ad], [(r["rss_before_mib"] - r["rss_model_mib"]) * MIB for r in ad])
        mb = sum(row_mask_bytes(r) for r in ad) / len(ad)  # compared with the mask layout the rows ran on
        out["adapters"] = {"coef": c, "analytic": [0.0, adapters_b(M7B, 1, mask_bytes=mb)], "n": len(ad),
                           "mask_bytes": mb}
    return out


def resident_before(f: dict, rows: list[dict], phase: str, L: int) -> float:
    """RSS just before a phase at L layers: fitted on the layer count of the phase's fit rows, or (one layer
    count only) the baseline fit + the phase's mean (RSS before − RSS after building)."""
    if phase in f["resident"]:
        c = f["resident"][phase]
        return c[0] + c[1] * L
    pts = [r for r in rows if r["phase"] == phase and r["set"] == "fit"]
    d = sum(r["rss_before_mib"] - r["rss_model_mib"] for r in pts) / len(pts) * MIB
    return f["baseline"]["coef"][0] + f["baseline"]["coef"][1] * L + d


def ratio(f: dict, phase: str, j: int) -> float:
    """Measured / analytic for coefficient j of a phase (1 where the analytic count is 0 or the fit is missing)."""
    p = f["phases"].get(phase)
    if p is None or not p["analytic"][j]:
        return 1.0
    return p["coef"][j] / p["analytic"][j]


def predict_extra(f: dict, phase: str, s: dict, L: int, n: int = 0, seq: int = 0, k: int = 0,
                  t: int = 0, fitted_shape: bool = False) -> float:
    """Bytes of a phase's working set (over what is resident before it) at shape ``s``.

    Each fitted coefficient is scaled from the measured shape by its analytic count (measured/analytic ratio
    kept); a fitted constant whose analytic count is 0 is kept as is; per-layer terms are analytic.
    ``fitted_shape``: use the raw fitted coefficients (the held-out check, same shape as the fit).
    """
    p = f["phases"].get("finetune" if phase.startswith("finetune") else phase)
    coef = p["coef"]
    an_new = analytic_coefs(phase, s)
    an_old = p["analytic"]
    scaled = [c if fitted_shape or not a0 else c * a1 / a0 for c, a0, a1 in zip(coef, an_old, an_new)]
    if phase in ENGINE or phase == "prune_sparsegpt":
        used = k if phase in ("dense_targets", "recon") else n
        bt = min(used, max(1, AUTO_BATCH_TOKENS // seq)) * seq
        if phase in MAXKIND:
            return max(stages(f, phase, s, L, n, seq, fitted_shape))
        return (scaled[0] + scaled[1] * used * seq + a_batch(s, phase) * bt
                + mmap_layers(phase, L) * a_layer(s, phase, n, k, seq, 0))
    if phase.startswith("finetune"):
        return max(ft_stages(f, phase, s, L, t, fitted_shape))
    return scaled[0] + scaled[1] * L


def ft_stages(f: dict, phase: str, s: dict, L: int, t: int, fitted_shape: bool = False) -> tuple:
    """(layer backward, loss stage) bytes of fine-tuning: the fitted layer stage (one layer's recompute:
    weight-sized saved tensors + per-token activations) and the loss stage (the loss_* check rows' measured /
    analytic ratio × the analytic count); both + the LoRA optimizer state and the checkpoints of every layer.
    Distillation has the same layer stage and its own loss stage."""
    p = f["phases"]["finetune"]
    an_new = analytic_coefs("finetune", s)
    c = [c if fitted_shape or not a0 else c * a1 / a0 for c, a0, a1 in zip(p["coef"], p["analytic"], an_new)]
    common = c[1] * L + L * 2 * t * s["h"]
    key_ = {"finetune_distill": "distill", "finetune_topk": "topk"}.get(phase, "label")
    loss = f["loss"].get(key_, 1.0) * a_loss(s, loss_kind(key_)) * t
    return c[0] + c[2] * t + common, loss + common


def stages(f: dict, phase: str, s: dict, L: int, n: int, seq: int, fitted_shape: bool = False) -> tuple:
    """(visit, forward) bytes of a pruning phase: the fitted visit stage (inputs + the pruner's temporaries)
    and the propagation forward (the calibration pass's fit + the fp32 statistics copy of the widest input)."""
    p = f["phases"][phase]
    an_new = analytic_coefs(phase, s)
    c = [c if fitted_shape or not a0 else c * a1 / a0 for c, a0, a1 in zip(p["coef"], p["analytic"], an_new)]
    bt = min(n, max(1, AUTO_BATCH_TOKENS // seq)) * seq
    visit = c[0] + c[1] * n * seq
    prop = predict_extra(f, "calibration", s, L, n, seq, 0, fitted_shape=fitted_shape)  # inputs + outputs + fwd
    half = ratio(f, "calibration", 1) * a_tok(s) / 2 * n * seq  # the outputs, not yet there in the stats pass
    fwd = max(prop, prop - half + (a_batch(s, phase) - a_batch(s, "calibration")) * bt)
    return visit, fwd


# ---------------------------------------------------------------------------------------- predictions
def gpu_table(f: dict) -> list[dict]:
    """Per target and phase: resident + working set on the GPU (GiB), CUDA context excluded (added in the verdict)."""
    rows = []
    for name, s in TARGETS.items():
        L, n, seq, k = s["L"], PAPER["nsamples"], PAPER["seqlen"], PAPER["recon"]
        w, ad = weights_b(s, L), adapters_b(s, L)
        t = FT_BATCH[name] * FT_SEQ

        def eng(phase: str, nn: int = n, kk: int = 0, s: dict = s, L: int = L, seq: int = seq) -> float:
            e = predict_extra(f, phase, s, L, nn, seq, kk)
            if phase in ("dense_targets", "recon"):  # the mmap file pages are host page cache, not GPU memory
                e -= mmap_layers(phase, L) * a_layer(s, phase, nn, kk, seq)
            return e

        tc_n = GROUP_TOKENS // FT_SEQ  # a teacher-cache group: 16384 padded tokens of 1024-token examples
        one = {"teacher_cache": (w, predict_extra(f, "teacher_cache", s, L, tc_n, FT_SEQ)),
               "teacher copy": (w, w),
               "dense_targets": (w, eng("dense_targets", n, k)), "rmi": (w + ad, eng("rmi")),
               "prune_wanda": (w + ad, eng("prune_wanda")), "recon": (w + ad, eng("recon", n, k)),
               "finetune": (w + ad, predict_extra(f, "finetune", s, L, t=t)),
               "finetune_topk": (w + ad, predict_extra(f, "finetune_topk", s, L, t=t)),
               "finetune_distill": (2 * w + ad, predict_extra(f, "finetune_distill", s, L, t=t))}
        if "prune_sparsegpt" in f["phases"]:
            one["prune_sparsegpt"] = (w + ad, eng("prune_sparsegpt"))
        one["oneshot_wanda"] = (w, eng("oneshot_wanda"))
        for phase, (res, work) in one.items():
            rows.append({"target": name, "phase": phase, "resident_gib": res / GIB, "working_gib": work / GIB,
                         "total_gib": (res + work) / GIB, "ft_tokens": t if phase.startswith("finetune") else 0})
    return rows


def onload_70b(f: dict, s: dict) -> dict:
    """One-shot Wanda with layer onload: the GPU holds the non-layer modules, one decoder layer and the
    calibration activations; the host the whole model."""
    L = s["L"]
    nonlayer = 2 * fixed_params(s)
    layer = 2 * layer_params(s)
    work = predict_extra(f, "oneshot_wanda", s, L, PAPER["nsamples"], PAPER["seqlen"])
    gpu = nonlayer + layer + work
    host = weights_b(s, L)
    return {"gpu_gib": gpu / GIB, "nonlayer_gib": nonlayer / GIB, "layer_gib": layer / GIB, "work_gib": work / GIB,
            "host_model_gib": host / GIB}


def fsdp_70b(f: dict, s: dict, name: str, gpus: int = 8) -> dict:
    """LoSA fine-tuning under FSDP full_shard: parameters (bf16 weights, fp32 LoRA), LoRA gradients and AdamW
    states sharded /gpus; buffers are not sharded by FSDP, so every GPU holds all keep-masks, bit-packed as
    built (``SparseLoRALinear.mask_bits``, :data:`MASK_BYTES` per weight); per GPU: two all-gathered layers
    (current + prefetch), the checkpoints, one layer's recompute and the logits.

    Args:
        f: the fit (:func:`fit`).
        s: the target's shape.
        name: the target's name (its fine-tuning batch).
        gpus: data-parallel processes.
    Returns:
        GiB per GPU: ``sharded_gib``, ``masks_gib`` (as built), ``gathered_gib``, ``work_gib``, ``total_gib`` (as
        built); for comparison ``bool_masks_gib`` / ``bool_total_gib`` (a bool mask per weight, before packing)
        and ``sharded_masks_total_gib`` (packed masks also sharded /gpus, not built); the engine phases'
        ``engine_gpu_gib`` and ``host_per_rank_gib``; ``ft_tokens``.
    """
    L, t = s["L"], FT_BATCH[name] * FT_SEQ
    lora = 4 * 16 * io_sum(s) * L
    sharded = (weights_b(s, L) + lora + 3 * lora) / gpus
    masks = MASK_BYTES * lin_params(s) * L
    bool_masks = MASK_BYTES_BOOL * lin_params(s) * L
    gathered = 2 * 2 * layer_params(s)
    work = predict_extra(f, "finetune", s, L, t=t) - L * lora_state(s) * ratio(f, "finetune", 1)
    rest = sharded + gathered + work
    n, seq, k = PAPER["nsamples"], PAPER["seqlen"], PAPER["recon"]
    work_eng = max(predict_extra(f, "rmi", s, L, n, seq), predict_extra(f, "prune_wanda", s, L, n, seq),
                   predict_extra(f, "recon", s, L, n, seq, k) - mmap_layers("recon", L) * a_layer(s, "recon", n, k, seq))
    engine_gpu = (2 * fixed_params(s) + 2 * layer_params(s) + MASK_BYTES * lin_params(s) + 4 * 16 * io_sum(s)
                  + work_eng)
    host_rank = weights_b(s, L) + adapters_b(s, L)
    return {"sharded_gib": sharded / GIB, "masks_gib": masks / GIB, "gathered_gib": gathered / GIB,
            "work_gib": work / GIB, "total_gib": (rest + masks) / GIB, "bool_masks_gib": bool_masks / GIB,
            "bool_total_gib": (rest + bool_masks) / GIB, "sharded_masks_total_gib": (rest + masks / gpus) / GIB,
            "engine_gpu_gib": engine_gpu / GIB, "host_per_rank_gib": host_rank / GIB, "ft_tokens": t}


# ------------------------------------------------------------------------------------------- render
def render(rows: list[dict], path: Path) -> None:
    f = fit(rows)
    L: list[str] = []
    w = L.append
    w("# Memory model: peak memory per phase, measured on the CPU, fitted, and predicted for 7B / 13B / 70B")
    w("")
    w("Issue 14, item 4. Every row below is one subprocess running one phase on a random-weight LLaMA-7B-shaped "
      "bf16 model (hidden 4096, MLP 11008, 32 heads, vocabulary 32000) with 1-5 decoder layers "
      "(`benchmarks/gpu_check.build_model`). The process builds the model, does the phase's prerequisites "
      "(adapters, dense targets, imports), trims the heap, resets the peak counter (`/proc/self/clear_refs` 5) "
      "and reads `VmHWM` after the phase: **extra = peak RSS − RSS just before the phase**. The workers run "
      "with `MALLOC_MMAP_THRESHOLD_=1048576`: every allocation of 1 MiB or more is its own mapping, returned "
      "to the OS when freed, so RSS follows the live tensors (the quantity `torch.cuda.max_memory_allocated` "
      "reports on a GPU); with glibc's default the pruning peak moved by up to ±140 MiB between runs of one "
      "configuration (heap fragmentation inside a layer). The rotary `inv_freq` buffers are recomputed after "
      "`build_model` (its `to_empty` leaves buffers uninitialised; one fine-tuning run hit a NaN loss from "
      "that). CPU RSS stands in for GPU memory (differences at the end). Provenance per row at the end; "
      "`python benchmarks/bench_memory.py` reruns everything (`--quick`: a smoke grid).")
    w("")
    w("## What is resident, per phase (read off the code)")
    w("")
    w("- **Model**: bf16 weights, 2 B/parameter. LLaMA-7B shape: a decoder layer has "
      f"{layer_params(M7B) / 1e6:.1f} M parameters ({2 * layer_params(M7B) / MIB:.0f} MiB), embeddings + "
      f"untied LM head {fixed_params(M7B) / 1e6:.1f} M ({2 * fixed_params(M7B) / MIB:.0f} MiB).")
    w("- **Adapters** (`add_sparse_lora`, from LoSA setup to the final merge, every phase after the dense "
      "targets): a **bit-packed keep-mask per linear** (`SparseLoRALinear.mask_bits`, uint8 `[out, ceil(in/8)]`: "
      "1 bit per weight, 1/16 of the bf16 weights; unpacked only as a transient of one module inside a forward, "
      "backward or merge) plus fp32 `lora_A [16, in]`, `lora_B [out, 16]` (r_max = 16): "
      f"{adapters_b(M7B, 1) / MIB:.0f} MiB per 7B layer. The measured rows below ran before the bit-packing, "
      f"with a bool mask (1 B per weight, half the bf16 weights again: "
      f"{adapters_b(M7B, 1, mask_bytes=MASK_BYTES_BOOL) / MIB:.0f} MiB per 7B layer); the adapter row of the fit "
      "compares them with that count, the predictions use the packed one. The unpack's uint8 intermediate "
      "(1 B per weight of one module) is formed before the fp32 products of the split form and stays below "
      "their peak, so the fitted working sets are unchanged.")
    w("- **Engine phases** (calibration, RMI, pruning, dense targets, reconstruction): the inputs and outputs of "
      "one layer for all windows (`nsamples × seqlen × hidden` bf16 twice, plus cos/sin per batch: "
      f"{a_tok(M7B) / 1024:.1f} KiB per token), one forward batch's transients (about 1024 tokens per batch: "
      "`max(1, 1024 // seqlen)` windows; the layer's peak is its MLP, three `intermediate`-wide bf16 tensors + "
      f"the residual stream: {a_batch(M7B, 'calibration') / 1024:.0f} KiB per batch token at 7B), and the "
      "visitor's work: Wanda norms (float64 [in], negligible) and "
      "per-module score/mask temporaries ∝ the largest linear; LoSA's pruning also keeps a pre-merge bf16 "
      "clone of the layer's weights (`merge(keep_original=True)` for all seven linears before the forward) and "
      "fp32 merge/unmerge temporaries; SparseGPT one fp32 `in × in` Hessian **per linear** (the LoSA visitor "
      "does not share them across q/k/v, gate/up) plus up to three `in × in` matrices in the inverse; RMI "
      "`L × n × n` float64 Grams with `n = nsamples` (losa uses all calibration windows for RMI, 128 at the "
      "paper's setting, not the reference code's 64) plus a 32 MiB bf16 block and its float64 chunk.")
    w("- **Unmerged adapters in the engine** (RMI and reconstruction passes run the adapter-wrapped model; a "
      "bf16 base weight takes the split form `masked_lora_branch`): every linear's forward materialises "
      "`s·(B A)`, the fp32 mask and `delta` as dense fp32 `[out, in]` matrices: about **12 B × the largest "
      f"linear** ({12 * max_module(M7B) / MIB:.0f} MiB at 7B), a weight-sized transient in passes that "
      "only measure, formed while the MLP holds one `intermediate`-wide tensor "
      f"({a_batch(M7B, 'rmi') / 1024:.0f} KiB per batch token with the residual stream).")
    w("- **Two stages of a pruning pass** (layer order): the statistics pass and the pruning visit hold the "
      "layer's inputs only (+ LoSA's pre-merge clones, the statistic's fp32 input copy, the pruner's "
      "temporaries), the propagation forward after it holds inputs + outputs + one batch's transients (as the "
      "calibration pass). The peak is the larger stage: the visit at the measured token counts, the "
      "forward at the paper's 262K calibration tokens. The model takes the maximum of the fitted visit "
      "stage and the calibration fit (+ the fp32 statistic copy); every other phase adds its terms.")
    w("- **Dense targets** are written to / read from a memory-mapped `.npy` (`L × recon_nsamples × seqlen × "
      "hidden` bf16). Those file pages are counted in the process's RSS while mapped (on the CPU they are "
      "the `k × seqlen × hidden × 2 B` per-layer term below, for the L − 1 layers written / read before the "
      "last layer's forward, where the peak is); on a GPU run they are host page cache "
      "(disk-backed), not GPU memory, and are left out of the GPU predictions.")
    w("- **Fine-tuning** (Trainer, AdamW, gradient checkpointing on): LoRA gradients + AdamW `m`, `v` "
      "(3 × 4 B per LoRA parameter, the full r_max capacity), the checkpointed hidden state of every layer "
      "(bf16 per token per layer), one layer's recomputed activations per token, and the logits "
      "(`batch × seq × vocab`, bf16 + fp32 copy + log-softmax + gradient). Design finding: a bf16 base "
      "weight takes the *split* masked-LoRA form (`masked_lora_branch`), which materialises "
      "`delta = s·(B A) ⊙ M` in fp32 `[out, in]` per linear under plain autograd, and autograd keeps the "
      "fp32 mask copy and `delta` for the backward: **8 B per weight of the layer being recomputed** "
      f"({8 * lin_params(M7B) / GIB:.2f} GiB for a 7B layer), weight-sized, not token-sized. Gradient "
      "checkpointing bounds it to one layer; without it, it would be 8 B × every adapted weight.")
    w("- **Teacher** (`--distill`): without a cache, `copy.deepcopy(model)` before the adapters, a second "
      "weight copy resident for the rest of the run. With `--teacher-topk k` (`FinetuneConfig.teacher_topk`, "
      "merged during this benchmark; k = 64 here) `TeacherTopK.compute` runs the engine over the fine-tuning "
      f"examples in groups of at most {GROUP_TOKENS} padded tokens (the group's activations are the per-token "
      "term, bounded by the group) and, after the last layer, the model's head per batch of about 1024 tokens: "
      "bf16 logits, their fp32 copy and log-softmax (10 B per vocabulary entry per batch token), top-k written to "
      "a memory-mapped file; fine-tuning then reads `[tokens, k]` targets and `topk_distill_loss` takes the "
      "student's full fp32 log-softmax, as the label loss does. No teacher copy.")
    w("- **Two stages of fine-tuning**: the backward of one checkpointed layer (its recomputed saved tensors: "
      "the weight-sized fp32 mask / delta + per-token activations) and the loss stage (logits, fp32 "
      "log-softmax, their gradients: `tokens × vocab`) do not overlap; the model takes the larger "
      "(the layer stage is fitted on the fine-tuning rows, the loss stage on the `loss_*` check rows). Both "
      "add the LoRA optimizer state and the checkpoints of every layer.")
    w("")
    # ---------------- measurements
    w("## Measurements")
    w("")
    w("set: `fit` rows are fitted on, `check` rows are single points compared with the analytic count only, "
      "`heldout` / `heldout2` rows (3 and 5 layers, other token counts) are predicted from the fit. Tokens: calibration windows × "
      "seqlen (reconstruction / dense targets: their windows); B-tok: tokens per forward batch; FT: fine-tuning "
      "batch × seq. sampled anon / file: the largest RssAnon and RssFile+RssShmem increase seen by a 2 ms "
      "sampler (can miss short spikes).")
    w("")
    w("| set | phase | layers | calib n×seq | tokens | B-tok | FT b×s | RSS model MiB | RSS before MiB | peak MiB "
      "| **extra MiB** | sampled anon / file MiB |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|")
    order = {p: i for i, p in enumerate(ENGINE + ["prune_sparsegpt", "finetune", "finetune_distill", "finetune_topk",
                                                   "teacher", "loss_label", "loss_distill", "loss_topk"])}
    sets = {"fit": 0, "check": 1, "heldout": 2, "heldout2": 3}
    srt = sorted(rows, key=lambda r: (sets[r["set"]], order.get(r["phase"], 99),
                                      r["layers"], r["tokens"], r["ft_tokens"], r["seqlen"]))
    for r in srt:
        tok = r["recon_windows"] * r["seqlen"] if r["phase"] in ("dense_targets", "recon") else r["tokens"]
        calib = f"{r['nsamples']}×{r['seqlen']}" if r["nsamples"] else ""
        w(f"| {r['set']} | {r['phase']} | {r['layers']} | {calib} "
          f"| {tok or ''} | {r['batch_tokens'] or ''} | "
          f"{str(r['ft_batch']) + '×' + str(r['seqlen']) if r['ft_batch'] else ''} | {r['rss_model_mib']:.0f} | "
          f"{r['rss_before_mib']:.0f} | {r['peak_mib']:.0f} | **{r['extra_mib']:.0f}** | "
          f"{r['sampled_anon_extra_mib']:.0f} / {r['sampled_file_extra_mib']:.0f} |")
    w("")
    # ---------------- fit
    w("## Fit: coefficients vs the analytic byte counts (LLaMA-7B shape)")
    w("")
    w("Per phase, least squares on its `fit` rows of `extra − (terms fixed analytically)`. Engine phases: "
      "[const, calibration tokens] (reconstruction / dense targets: their windows' tokens), at 2 and 4 layers "
      "(the 4-layer point is in the fit; its residual shows the absence of a per-layer term); one-shot "
      "only at 2 layers. Fixed analytically: one forward batch's transients (`B-tok ×` the KiB below; not "
      "separable from the constant at one batch size, checked by the held-out rows at 2048 tokens per "
      "batch), RMI Grams `8 n²` and the mmap pages `2 k·seqlen·hidden` per layer. For the pruning phases the "
      "fit is the visit stage (per token: the inputs only, half of the calibration count). Fine-tuning: "
      "[const, layers, fine-tuning tokens] with the checkpoints `2 B × tokens × hidden` per layer fixed; "
      "teacher: [const, layers]. Analytic constants: per phase as described above (7B shape: largest linear "
      f"{max_module(M7B) / 1e6:.1f} M weights, a layer's linears {lin_params(M7B) / 1e6:.1f} M); ratio = fitted "
      "/ analytic. The GPU predictions scale each fitted coefficient by its analytic count at the target "
      "shape, i.e. keep these ratios.")
    w("")
    w("| phase | points | const MiB: fitted (analytic, ratio) | per token KiB: fitted (analytic, ratio) | "
      "per layer MiB: fitted (analytic, ratio) | fixed analytically, not fitted | residuals MiB |")
    w("|---|---|---|---|---|---|---|")

    def cell(c: float, a: float, unit: int, fmt: str = ".0f") -> str:
        return f"{c / unit:{fmt}} ({a / unit:{fmt}}" + (f", ×{c / a:.2f})" if a else ")")

    for phase, p in f["phases"].items():
        c, a = p["coef"], p["analytic"]
        if "single" in p:
            continue
        res = ", ".join(f"{x:+.0f}" for x in p["resid_mib"])
        if phase == "teacher":
            w(f"| teacher | {p['n']} | {cell(c[0], a[0], MIB)} | | {cell(c[1], a[1], MIB)} | | {res} |")
        elif phase == "finetune":
            w(f"| finetune | {p['n']} | {cell(c[0], a[0], MIB)} | {cell(c[2], a[2], 1024)} | "
              f"{cell(c[1], a[1], MIB, '.1f')} | checkpoints {2 * M7B['h'] / 1024:.0f} KiB per token per layer | "
              f"{res} |")
        else:
            fixed = [f"batch transients {a_batch(M7B, phase) / 1024:.0f} KiB per batch token"]
            if phase == "rmi":
                fixed.append("Grams 8 n² B per layer")
            if phase in ("dense_targets", "recon"):
                fixed.append("mmap pages 2·k·seqlen·hidden B per layer")
            w(f"| {phase} | {p['n']} | {cell(c[0], a[0], MIB)} | {cell(c[1], a[1], 1024, '.1f')} | | "
              f"{'; '.join(fixed)} | {res} |")
    if "baseline" in f:
        b = f["baseline"]
        w(f"| RSS after building the model | {b['n']} | {cell(b['coef'][0], b['analytic'][0], MIB)} "
          f"(runtime + embeddings / embeddings) | | {cell(b['coef'][1], b['analytic'][1], MIB)} | | "
          f"spread at one size {b['spread_mib']:.0f} |")
    if "adapters" in f:
        a = f["adapters"]
        lay = "bool masks, before packing" if a["mask_bytes"] == MASK_BYTES_BOOL else f"{a['mask_bytes']:.3f} B/weight"
        w(f"| adapters resident (RSS before − after build; RMI, pruning rows; {lay}) | {a['n']} | "
          f"{a['coef'][0] / MIB:.0f} | | {cell(a['coef'][1], a['analytic'][1], MIB)} | | |")
    w("")
    for r in [r for r in rows if r["set"] == "check"]:
        ph = r["phase"]
        if ph == "prune_sparsegpt":
            rho = f["phases"][ph]["single"]
            an = a_fix(M7B, ph) + a_tok(M7B) / 2 * r["tokens"]
            w(f"- check, {ph} ({r['layers']} layer, {r['nsamples']}×{r['seqlen']}): extra {r['extra_mib']:.0f} MiB "
              f"vs analytic visit stage {an / MIB:.0f} MiB (×{rho:.2f}): seven fp32 Hessians "
              f"{4 * (6 * 4096**2 + 11008**2) / MIB:.0f} MiB, up to three `in × in` inverse temporaries "
              f"{12 * 11008**2 / MIB:.0f} MiB, pre-merge clones and W's fp32 copies. One point, not fitted: the GPU "
              "prediction scales the analytic count by this ratio.")
        elif ph.startswith("loss_"):
            kind = ph.split("_")[1]
            an = a_loss(M7B, loss_kind(kind)) * r["ft_tokens"]
            w(f"- check, {ph} (batch {r['ft_batch']}×{r['seqlen']}, vocabulary 32000): extra {r['extra_mib']:.0f} MiB "
              f"vs analytic {an / MIB:.0f} MiB ({a_loss(M7B, loss_kind(kind)) / M7B['V']:.0f} B per token per "
              f"vocabulary entry; ×{f['loss'][kind]:.2f}): the loss stage's ratio used for the predictions.")
        elif ph in ("finetune_distill", "finetune_topk"):
            a_, b_ = ft_stages(f, ph, M7B, r["layers"], r["ft_tokens"], fitted_shape=True)
            pred = max(a_, b_)
            lab = next((x for x in rows if x["phase"] == "finetune" and x["layers"] == r["layers"]
                        and x["ft_tokens"] == r["ft_tokens"]), None)
            w(f"- check, {ph} ({r['layers']} layers, batch {r['ft_batch']}×{r['seqlen']}): extra "
              f"{r['extra_mib']:.0f} MiB" + (f" (label loss, same shape: {lab['extra_mib']:.0f} MiB)" if lab else "")
              + f" vs {pred / MIB:.0f} MiB predicted ({100 * (pred / (r['extra_mib'] * MIB) - 1):+.1f} %; layer stage "
              f"{a_ / MIB:.0f}, loss stage {b_ / MIB:.0f}: at these token counts the layer's backward is the peak, "
              "so the distillation loss adds nothing)" + (". The teacher copy is resident before it (in RSS before)."
                                                           if ph == "finetune_distill" else "; no teacher copy."))
    w("")
    # ---------------- held-out
    w("## Held-out check (sizes not fitted on)")
    w("")
    w("`heldout`: 3 layers, calibration 2 windows of 2048 (2048 tokens per forward, as at the paper's seqlen; "
      "the fit rows have 1024), fine-tuning 1 × 1024. `heldout2`: 5 layers, 3 windows of 1024, fine-tuning "
      "2 × 192. Predicted with the fitted coefficients (same shape) + the analytic terms; the total peak adds "
      "the RSS before the phase, fitted per phase on the layer count of its `fit` rows (runtime, weights, "
      "adapters, imports). **Not blind**: the per-batch-token counts were revised once after a first run of "
      "the `heldout` rows (then the sum of every transient of a layer, 166 KiB per batch token at 7B, predicted "
      "the calibration / dense-target / teacher-cache rows +40 % and RMI / reconstruction +14 %); the recount "
      "from the code (the MLP stage is the layer's peak; an adapter pass forms its fp32 delta while one "
      "i-wide tensor is alive) is what the fit uses. `heldout2` was defined and measured after that revision.")
    w("")
    w("| set | phase | layers | calib n×seq / FT b×s | measured extra MiB | predicted MiB | error | measured peak "
      "MiB | predicted peak MiB | error |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    worst: dict[str, list[float]] = {}
    for r in [r for r in srt if r["set"].startswith("heldout")]:
        ph = r["phase"]
        if ph not in f["phases"]:
            continue
        pe = predict_extra(f, ph, M7B, r["layers"], r["nsamples"], r["seqlen"], r.get("recon_windows", 0),
                           r.get("ft_tokens", 0), fitted_shape=True)
        ptot = resident_before(f, rows, ph, r["layers"]) + pe
        err = pe / (r["extra_mib"] * MIB) - 1
        errt = ptot / (r["peak_mib"] * MIB) - 1
        wv = worst.setdefault(r["set"], [0.0, 0.0, ""])
        if abs(err) > wv[0]:
            wv[0], wv[2] = abs(err), ph
        wv[1] = max(wv[1], abs(errt))
        cfg = f"{r['ft_batch']}×{r['seqlen']}" if ph.startswith("finetune") else (
            f"{r['nsamples']}×{r['seqlen']}" if r["nsamples"] else "")
        w(f"| {r['set']} | {ph} | {r['layers']} | {cfg} | {r['extra_mib']:.0f} | {pe / MIB:.0f} | {100 * err:+.1f} % "
          f"| {r['peak_mib']:.0f} | {ptot / MIB:.0f} | {100 * errt:+.1f} % |")
    w("")
    for kind, (we, wt, ph) in worst.items():
        w(f"- {kind}: largest error {100 * we:.1f} % on a phase's extra ({ph}), {100 * wt:.1f} % on the total peak "
          f"(target: within 15 %: {'met' if we <= 0.15 else 'missed'} on the extra, "
          f"{'met' if wt <= 0.15 else 'missed'} on the total).")
    w("")
    # ---------------- predictions
    w("## Predicted peak GPU memory at the paper's settings (bf16 weights)")
    w("")
    w(f"Calibration C4 {PAPER['nsamples']}×{PAPER['seqlen']} (one window per forward: {PAPER['seqlen']} tokens per "
      f"batch), RMI on the same {PAPER['nsamples']} windows, reconstruction / dense targets on "
      f"`recon_nsamples` = {PAPER['recon']} windows, r_max 16. Fine-tuning: the reference code's per-device batch "
      f"(4 for 7B/8B, 2 for 13B; 1 assumed for 70B) × {FT_SEQ} tokens (its `max_seq_length`; the worst batch, all "
      "examples at full length), gradient checkpointing on; the peak is the larger of the layer stage and the "
      "loss stage (label, top-k or full distillation loss per row); 10K Alpaca examples only set the step "
      "count, not the peak (the teacher cache's activations are bounded by its 16384-token groups). Each fitted coefficient is scaled to the target by its analytic count "
      "(measured/analytic ratio kept); the mmap pages are left out (host page cache). Resident = weights "
      "(+ adapters from the RMI pass on); the CUDA context (~0.5-1 GB) is not included here.")
    w("")
    g = gpu_table(f)
    names = list(TARGETS)
    phases = list(dict.fromkeys(r["phase"] for r in g))
    w("| phase | " + " | ".join(names) + " |")
    w("|---|" + "---|" * len(names))
    for ph in phases:
        cells = []
        for nm in names:
            r = next(x for x in g if x["target"] == nm and x["phase"] == ph)
            cells.append(f"{r['total_gib']:.1f} ({r['resident_gib']:.1f} + {r['working_gib']:.1f})")
        w(f"| {ph} | " + " | ".join(cells) + " |")
    w("")
    w("Cells: total GiB (resident + phase working set). `teacher_cache` (`--distill --teacher-topk 64`) and "
      "`teacher copy` (`--distill` without a cache: `copy.deepcopy`, then resident in every later phase) run "
      "in the setup, before the adapters; `finetune_topk` / `finetune_distill` are the fine-tuning with "
      "either teacher (the copy counted in the resident column).")
    w("")
    # ---------------- verdicts
    w("## Verdict per target")
    w("")
    cap = 80e9 / GIB  # an 80 GB card: 74.5 GiB

    def peak(nm: str, phases: tuple, extra: float = 0.0) -> float:
        return max(r["total_gib"] + (extra if r["phase"] not in ("finetune_distill", "teacher copy") else 0.0)
                   for r in g if r["target"] == nm and r["phase"] in phases)

    for nm in ("LLaMA-2-7B", "LLaMA-2-13B"):
        base = ("dense_targets", "rmi", "prune_wanda", "recon")
        plain = peak(nm, base + ("finetune",))
        cached = peak(nm, base + ("teacher_cache", "finetune_topk"))
        copy_ = peak(nm, ("teacher copy", "finetune_distill") + base, weights_b(TARGETS[nm], TARGETS[nm]["L"]) / GIB)
        fit_ = {x: "fits" if x + CUDA_CTX_GIB < cap else "does not fit" for x in (plain, cached, copy_)}
        w(f"- **{nm} LoSA (Wanda) on one 80 GB GPU** ({cap:.1f} GiB): peak {plain:.1f} GiB + {CUDA_CTX_GIB} GiB "
          f"CUDA context = {plain + CUDA_CTX_GIB:.1f} GiB → **{fit_[plain]}** "
          f"({cap - plain - CUDA_CTX_GIB:.1f} GiB left for allocator caching / fragmentation). With "
          f"`--distill --teacher-topk 64`: {cached + CUDA_CTX_GIB:.1f} GiB → {fit_[cached]}; with `--distill` "
          f"(a teacher copy resident in every phase after the setup): {copy_ + CUDA_CTX_GIB:.1f} GiB → "
          f"{fit_[copy_]}.")
    s70 = TARGETS["LLaMA-2-70B"]
    fs = fsdp_70b(f, s70, "LLaMA-2-70B")
    fit70 = {x: "fits" if x + CUDA_CTX_GIB < cap else "does not fit"
             for x in (fs["total_gib"], fs["bool_total_gib"], fs["sharded_masks_total_gib"])}
    w(f"- **LLaMA-2-70B LoSA on 8×80 GB with FSDP** (fine-tuning, batch 1×{FT_SEQ} per GPU): sharded weights + "
      f"LoRA + gradients + AdamW {fs['sharded_gib']:.1f} GiB, **masks {fs['masks_gib']:.1f} GiB per GPU "
      f"(bit-packed `mask_bits` buffers, 1 bit per weight; replicated: FSDP shards parameters, not buffers)**, "
      f"two gathered layers {fs['gathered_gib']:.1f} GiB, working set {fs['work_gib']:.1f} GiB → "
      f"{fs['total_gib']:.1f} GiB + {CUDA_CTX_GIB} context per GPU → **{fit70[fs['total_gib']]}** as the code "
      f"stands. The fit relies on the bit-packed masks: with the earlier bool masks (1 B per weight, "
      f"{fs['bool_masks_gib']:.1f} GiB per GPU) it was {fs['bool_total_gib']:.1f} GiB → "
      f"{fit70[fs['bool_total_gib']]}. The masks are not sharded (they stay buffers: the Trainer's FSDP1 "
      f"flat parameters need one dtype per unit and DeepSpeed ZeRO-3 partitions every parameter); sharding "
      f"them too would give {fs['sharded_masks_total_gib']:.1f} GiB. The engine phases (RMI, pruning, reconstruction) run on every rank with layer onload "
      f"(`_decide_offload`: the model exceeds 70 % of the free memory): {fs['engine_gpu_gib']:.1f} GiB per "
      f"GPU, but every rank keeps the whole model + adapters in host RAM: {fs['host_per_rank_gib']:.0f} GiB per "
      f"rank, {8 * fs['host_per_rank_gib']:.0f} GiB for 8 ranks on one node. Not checked here: whether the "
      "Trainer's FSDP wrapping accepts fp32 LoRA parameters next to bf16 frozen weights in one unit "
      "(FSDP1 flat parameters need one dtype). A `--distill` teacher copy is unsharded (+"
      f"{weights_b(s70, s70['L']) / GIB:.0f} GiB per GPU): it does not fit; the top-k teacher cache needs no "
      "copy (computed once on rank 0 with layer onload).")
    ol = onload_70b(f, s70)
    w(f"- **LLaMA-2-70B one-shot Wanda on one 80 GB GPU with layer onload**: GPU {ol['gpu_gib']:.1f} GiB "
      f"(embeddings + LM head {ol['nonlayer_gib']:.1f}, one layer {ol['layer_gib']:.1f}, calibration "
      f"activations + Wanda work {ol['work_gib']:.1f}) + {CUDA_CTX_GIB} context → "
      f"**{'fits' if ol['gpu_gib'] + CUDA_CTX_GIB < cap else 'does not fit'}**; host RAM: the bf16 model "
      f"{ol['host_model_gib']:.0f} GiB + the Python/torch runtime (~0.5-1 GiB) + the calibration ids "
      "(the pruned layers are written back in place).")
    if "prune_sparsegpt" in f["phases"] or any(r["phase"] == "prune_sparsegpt" for r in rows):
        sg = [r for r in g if r["target"] == "LLaMA-2-70B" and r["phase"] == "prune_sparsegpt"]
        if sg:
            extra = sg[0]["working_gib"] - next(r["working_gib"] for r in g if r["target"] == "LLaMA-2-70B"
                                                and r["phase"] == "prune_wanda")
            w(f"  SparseGPT instead of Wanda: at most about {extra:.1f} GiB more (Hessians and inverse temporaries "
              "of one layer, from the LoSA visitor's single-point ratio, which keeps one Hessian per linear and "
              f"the pre-merge clones): {ol['gpu_gib'] + extra:.1f} GiB, still within one card.")
    w("")
    w("## CPU RSS vs GPU memory")
    w("")
    w("- RSS counts every resident page of the process: the Python/torch runtime (~300-400 MiB here, in the "
      "baseline, not on a GPU), and file pages of memory-mapped files (dense targets: excluded from the GPU "
      "predictions). A GPU adds the CUDA context and cuBLAS workspaces (~0.5-1 GB, outside "
      "`max_memory_allocated`), and PyTorch's caching allocator reserves more than it allocates "
      "(fragmentation: typically 5-20 % over the allocated peak; `nvidia-smi` shows reserved + context).")
    w("- glibc keeps freed heap memory; with `MALLOC_MMAP_THRESHOLD_=1048576` every tensor of 1 MiB or more is "
      "unmapped when freed, the worker trims the heap before the reset, so RSS tracks the live tensors "
      "(an earlier run of the fit grid, not kept, agreed with these rows within 4 MiB); VmHWM is exact, so short "
      "transients count. "
      "All rows ran on the `src/` of 4da24cc (the later commits in the provenance touched only `benchmarks/` "
      "and the README).")
    w("- On a GPU the Trainer runs under bf16 autocast: the masked-LoRA branch keeps the fp32 mask copy and a "
      "bf16 cast of `delta` (6 B per weight instead of 8 B), and the LoRA inputs are saved in bf16; the CPU "
      "run (no autocast) is therefore an upper bound for those terms. SDPA on the GPU (flash / memory-"
      "efficient) and on the CPU (flash kernel) both avoid `seq × seq` score matrices.")
    w("")
    w("## Provenance")
    w("")
    for r in srt:
        w(f"- {r['set']} {r['phase']} L={r['layers']}: {r['date']}, {r['commit']}, {r['threads']} threads, "
          f"{r['cpu']} ({r['isa']}), {r['model']}; `{r['command']}` (worker env "
          f"MALLOC_MMAP_THRESHOLD_={r.get('malloc_mmap_threshold')})")
    atomic_write_text(path, "\n".join(L) + "\n")


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small smoke grid (1-2 layers, few tokens), own files")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSONL path (default results/memory_model[_quick].jsonl)")
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from the .jsonl and exit")
    ap.add_argument("--only", nargs="*", default=None, help="run only these phases")
    ap.add_argument("--single", nargs=6, metavar=("PHASE", "L", "N", "SEQ", "K", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single:
        ph, *nums = args.single
        L, n, seq, k, b = (int(x) for x in nums)
        print("RESULT " + json.dumps(run_phase(ph, L, n, seq, k, b, args.threads)), flush=True)
        return
    out = Path(args.out or RESULTS / ("memory_model_quick.jsonl" if args.quick else "memory_model.jsonl"))
    rows = read_jsonl(out) if out.is_file() else []
    if not args.render_only:
        done = {key(r) for r in rows}
        # every allocation of 1 MiB or more is its own mapping, returned to the OS when freed: RSS then
        # follows the live tensors (what torch.cuda.max_memory_allocated counts on a GPU) instead of glibc's
        # heap fragmentation, which moved the pruning peak by ±100 MiB from run to run
        env = dict(os.environ, TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/losa-ext"),
                   OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_=str(MIB))
        passthrough = [a for a in sys.argv[1:] if a != "--render-only"]
        for j in grid(args.quick):
            if key(j) in done or (args.only and j["phase"] not in args.only):
                continue
            print(f"== {j['set']} {j['phase']} L={j['layers']} n={j['n']} seq={j['seq']} k={j['k']} b={j['batch']}",
                  flush=True)
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, *passthrough, "--single", j["phase"], str(j["layers"]),
                                   str(j["n"]), str(j["seq"]), str(j["k"]), str(j["batch"])],
                                  capture_output=True, text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(proc.stderr[-3000:], flush=True)
                continue
            row = {**json.loads(line[len("RESULT "):]), "set": j["set"]}
            print(f"   extra {row['extra_mib']:.0f} MiB, peak {row['peak_mib']:.0f} MiB, "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
            rows.append(row)
            append_jsonl(out, [row])
    if rows:
        render(rows, out.with_suffix(".md"))
        print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
