"""Atomic per-step checkpoints of a LoSA run, so ``--resume`` continues from the last finished step.

``<out>/state/`` stores, per adapted module, only what the run changed, relative to the original
checkpoint the run always starts from (:meth:`LoSARun.setup` wraps the freshly loaded model before
any pruning, and a resume loads the same checkpoint):

- ``adapters.safetensors``: per module ``q``, the adapter ``q.lora_A`` / ``q.lora_B`` (float32),
  ``q.active_rank`` and the keep-mask as a bitmask ``q.mask_bits`` (1-D uint8, 1 bit per weight:
  the row-major flattened ``[out, in]`` mask, 8 positions per byte, first position in the most
  significant bit, the last byte zero-padded; :func:`pack_mask`, the layout of ``numpy.packbits``;
  for ``in`` a multiple of 8 these are the bytes of the module's own ``mask_bits`` buffer, saved as
  they are).
- ``weights.safetensors``: only the base weights that ``W₀ ⊙ M`` does not give (``W₀`` the original
  weight): ``q.kept``, the kept values ``W[M]`` (1-D, row-major, in the weight's dtype), for modules
  whose kept values differ from the original: SparseGPT's error compensation, or a LoRA rank that
  dropped and folded its trained update into W. Wanda / magnitude prune to exactly ``W₀ ⊙ M``, so
  their modules store nothing here until a rank fold (none when ranks never drop). A module with
  nonzero weights outside its mask (which the runner never produces) is stored whole, ``q.weight``.
  Which modules differ is tracked exactly by ``SparseLoRALinear.base_edited`` and cross-checked
  against a sample of the original values at every save. Kept values are stored whole, not as
  their differences from ``W₀``: SparseGPT and a fold change nearly every kept value.
- ``state.json``: step, recipe, data fingerprints, per-step report rows, and the SHA-256 of every
  adapted module's original weight (``origin``), so a state is only applied to the checkpoint it was
  written for.

On resume the weights are rebuilt as ``W = W₀ ⊙ M`` (or from the stored kept values / weight), bit
for bit. With Wanda / magnitude (no rank fold) the state is the masks, 1/16 of the dense bf16 weights
(1/32 of fp32), plus the adapters: about 9.4 GB for LLaMA-2-70B at ``r_max=16``, where the dense
layout (every pruned weight plus a bool per weight) wrote 206 GB per step; with SparseGPT at 50 %
the kept values add half the dense size (about 78 GB in all).
A state written by an older losa (dense ``weights.safetensors``, bool masks) still loads.

The whole directory is replaced atomically after every step, so a run killed at any moment leaves the
previous finished step intact. Only the main process writes (``LoSARun.write``); every process loads.

No optimizer or RNG state is kept, because a step needs none from the step before: every step's
fine-tune starts a fresh optimizer, and every step starts by reseeding all RNGs from (seed, step). A
run killed mid-step therefore redoes that step from its start and ends bit-identical to an
uninterrupted run (tested).

A run moved to another machine resumes when its algorithm is the same: the recipe is compared without
the fields that only say where things are (:data:`PLACEMENT_FIELDS`), and the data by fingerprints of
the calibration windows and the tokenised fine-tuning examples instead of by path.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from losa.errors import LosaError, option
from losa.lora.bitmask import bits_at, pack_bits, unpack_bits
from losa.lora.layer import SparseLoRALinear, bits
from losa.lora.model import sparse_lora_modules
from losa.models.linear import get_weight, set_weight
from losa.utils.dist import world_size
from losa.utils.io import atomic_directory

STATE_DIR = "state"
#: version of the state layout written by :func:`save_state` (a state without one is the dense layout)
STATE_FORMAT = 2
#: original values per module kept in memory to cross-check ``base_edited`` at every save
ORIGIN_SAMPLES = 256
#: how errors name the settings of :func:`losa.run` (and ``losa run``) that resume a run
RESUME, OUT_DIR = option("resume"), option("out_dir", "--out")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


#: recipe fields that say where the run happens or where its data lie, not what it computes
PLACEMENT_FIELDS = ("device", "data_dir", "finetune_data")


def fingerprint(calib_ids: torch.Tensor, examples: list[dict[str, list[int]]]) -> dict[str, str]:
    """SHA-256 of the calibration windows ``[n, seqlen]`` and of the tokenised fine-tuning examples."""
    calib = hashlib.sha256(calib_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    ft = hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()
    return {"calibration": calib, "finetune": ft}


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask as a flat bitmask: 1 bit per position, in the layout of ``numpy.packbits``.

    :func:`losa.lora.bitmask.pack_bits` of the flattened mask.

    Args:
        mask: any shape, bool (or 0/1 in any dtype); packed on its own device.
    Returns:
        1-D uint8 of ``ceil(numel / 8)`` bytes: the row-major flattened mask, 8 positions per byte,
        the first in the most significant bit, the last byte padded with zeros.
    Raises:
        Nothing of its own.
    """
    return pack_bits(mask.reshape(-1))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_mask`.

    Args:
        packed: 1-D uint8 from :func:`pack_mask`; unpacked on its own device.
        shape: the mask's shape.
    Returns:
        the bool mask of ``shape``.
    Raises:
        LosaError: ``packed`` holds another number of bytes than ``shape`` needs.
    """
    numel = int(np.prod(shape)) if len(shape) else 1
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise LosaError(f"bitmask of {packed.numel()} bytes does not fit a mask of shape {tuple(shape)}; "
                        "use the state with the model it was written for")
    return unpack_bits(packed, numel).reshape(shape)


def _module_mask_bits(m: SparseLoRALinear) -> torch.Tensor:
    """The module's keep-mask in the flat layout of :func:`pack_mask`, on the CPU: its own packed
    rows when they carry no padding (``in`` a multiple of 8: the same bytes), else repacked."""
    if m.in_features % 8 == 0:
        return m.mask_bits.detach().reshape(-1).cpu().contiguous()
    return pack_mask(m.mask).cpu()


@dataclass
class WeightOrigin:
    """The original weights of the adapted modules, as the run found them before any pruning.

    Attributes:
        digests: per module name, the SHA-256 of its weight's shape, dtype and raw bytes (the whole
            weight, on the CPU in up to 8 threads; about 1 GB/s per thread, so once per run some
            20 s for a 70B model in bf16 with 8 free cores).
        samples: per module name, (flat indices into the ``[out, in]`` weight, the original values there
            in the weight's dtype, CPU), :data:`ORIGIN_SAMPLES` evenly spaced ones; used by
            :func:`save_state` to cross-check ``SparseLoRALinear.base_edited``.
    """

    digests: dict[str, str]
    samples: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def of(cls, model: nn.Module) -> WeightOrigin:
        """Fingerprint the adapted modules' weights of ``model`` (call it before any pruning).

        Args:
            model: the adapter-wrapped model, straight from its checkpoint.
        Returns:
            the :class:`WeightOrigin`.
        Raises:
            Nothing of its own.
        """
        mods = sparse_lora_modules(model)
        samples: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for q, m in mods.items():
            w = get_weight(m.base).detach()
            n = w.numel()
            idx = torch.arange(min(ORIGIN_SAMPLES, n), dtype=torch.int64) * n // max(min(ORIGIN_SAMPLES, n), 1)
            d_idx = idx.to(w.device)
            samples[q] = (idx, w[d_idx // w.shape[1], d_idx % w.shape[1]].cpu())
        workers = max(1, min(8, os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            digests = dict(zip(mods, pool.map(lambda m: _digest(m.base.weight), mods.values())))
        return cls(digests, samples)


def _digest(weight: torch.Tensor) -> str:
    w = weight.detach()
    h = hashlib.sha256(f"{tuple(w.shape)}|{w.dtype}|".encode())
    host = w.to("cpu").contiguous().reshape(-1)
    h.update(memoryview(host.view(torch.uint8).numpy()))
    return h.hexdigest()


def _algorithm(recipe: dict) -> dict:
    return {k: v for k, v in json.loads(json.dumps(recipe, default=_default)).items() if k not in PLACEMENT_FIELDS}


def _sample_moved(m: SparseLoRALinear, sample: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """True when a sampled kept value of W is not the original one (an edit ``base_edited`` missed)."""
    idx, orig = sample
    w = get_weight(m.base).detach()
    d_idx = idx.to(w.device)
    rows, cols = d_idx // w.shape[1], d_idx % w.shape[1]
    kept = bits_at(m.mask_bits, rows.to(m.mask_bits.device), cols.to(m.mask_bits.device)).cpu()
    return bool(((bits(w[rows, cols].cpu()) != bits(orig)) & kept).any())


def save_state(out_dir: str | Path, model: nn.Module, step: int, recipe: dict, rows: list[dict],
               data: dict[str, str], origin: WeightOrigin) -> Path:
    """Write the state after ``step`` (atomically replacing the previous one), in the compact layout
    of the module docstring.

    Args:
        out_dir: the run directory.
        model: the adapter-wrapped model, adapters unmerged.
        step: the finished step.
        recipe: the LoSAConfig as a mapping.
        rows: the per-step rows so far.
        data: :func:`fingerprint` of the run's data.
        origin: :meth:`WeightOrigin.of` the model before its first pruning.
    Returns:
        the state directory.
    Raises:
        LosaError: an adapter is merged (its update would be saved inside the base weight), or
            ``origin`` is of another model.
    """
    out = Path(out_dir)
    mods = sparse_lora_modules(model)
    if set(mods) != set(origin.digests):
        raise LosaError("save_state: the weight origin was taken from another model; pass WeightOrigin.of(model) "
                        "from before the first pruning")
    adapters: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for q, m in mods.items():
            if m.merged:
                raise LosaError(f"save_state: the adapter of {q} is merged into its weight; unmerge the adapters "
                                "before saving the state")
            w = get_weight(m.base).detach()
            mask = m.mask  # one unpacked transient for this module
            if bool(((bits(w) != 0) & ~mask).any()):  # never after pruning; kept whole if it happens
                weights[f"{q}.weight"] = w.cpu().contiguous()
            elif m.base_edited or _sample_moved(m, origin.samples[q]):
                weights[f"{q}.kept"] = w[mask].cpu()
            del mask
            adapters[f"{q}.lora_A"] = m.lora_A.detach().cpu().contiguous()
            adapters[f"{q}.lora_B"] = m.lora_B.detach().cpu().contiguous()
            adapters[f"{q}.active_rank"] = m.active_rank.detach().cpu().reshape(1)
            adapters[f"{q}.mask_bits"] = _module_mask_bits(m)
    meta = {"format": STATE_FORMAT, "step": step, "recipe": recipe, "data": data, "origin": origin.digests,
            "rows": rows, "processes": world_size()}  # with the recipe's batch: the global batch (check_resume)
    with atomic_directory(out / STATE_DIR, overwrite=True) as tmp:
        save_file(weights, str(tmp / "weights.safetensors"))
        save_file(adapters, str(tmp / "adapters.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=_default))
    return out / STATE_DIR


def _default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(type(o).__name__)


def _differing(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the fields in which two recipes differ (``finetune.lr``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [p for k in sorted(old.keys() | new.keys(), key=str)
                for p in _differing(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _value_at(recipe: Any, path: str) -> Any:
    """The value at a dotted path of :func:`_differing` (None where a level is missing)."""
    for key in path.split("."):
        recipe = recipe.get(key) if isinstance(recipe, dict) else None
    return recipe


def _shown(value: Any, width: int = 40) -> str:
    """``value`` for a one-line message, cut to ``width`` characters."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _filled(defaults: dict, recipe: dict) -> dict:
    """``recipe`` with the fields it lacks (nested too) taken from ``defaults``."""
    return {**defaults, **{k: _filled(defaults[k], v) if isinstance(v, dict) and isinstance(defaults.get(k), dict)
                           else v for k, v in recipe.items()}}


def saved_step(out_dir: str | Path) -> int | None:
    """The last finished step saved in ``out_dir``'s state, or None when none is (no or unreadable state.json)."""
    try:
        return int(json.loads((Path(out_dir) / STATE_DIR / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_resume(out_dir: str | Path, recipe: dict, processes: int | None = None) -> dict:
    """The state of the run in ``out_dir`` to resume with ``recipe``, checked before any work: there is a
    finished step, its algorithm (the recipe without placement fields) is this one, and so is its global
    fine-tuning batch (``batch_size × grad_accum × processes``: a run may resume under another number of
    processes, or another per-device batch, with the ``grad_accum`` that keeps it).

    Args:
        out_dir: the run directory.
        recipe: this run's LoSAConfig as a mapping.
        processes: this run's number of processes (None: :func:`losa.utils.dist.world_size`).
    Returns:
        the state's ``state.json`` as a mapping.
    Raises:
        LosaError: no finished step in ``out_dir``; the recipes differ (naming every differing field); the
            global batch differs (naming the ``grad_accum`` that keeps it, where one does).
    """
    d = Path(out_dir) / STATE_DIR
    if not (d / "state.json").is_file():
        raise LosaError(f"{RESUME}: {out_dir} holds no finished LoSA step (no {STATE_DIR}/state.json); run without "
                        f"{RESUME} to start, or point {OUT_DIR} at the run to continue")
    meta = json.loads((d / "state.json").read_text())
    from losa.pipelines.losa.config import LoSAConfig

    # a field added to losa after the run was saved ran with its default (new fields keep the old behaviour)
    old = _filled(_algorithm(LoSAConfig().model_dump()), _algorithm(meta["recipe"]))
    new = _algorithm(recipe)
    saved_processes = meta.get("processes")  # absent from older states: grad_accum must then match
    batch = ("finetune.batch_size", "finetune.grad_accum")  # free while their global batch is kept (below)
    diff = [f for f in _differing(old, new) if not (f in batch and saved_processes is not None)]
    if diff:
        shown = ", ".join(f"{f} (saved {_shown(_value_at(old, f))}, now {_shown(_value_at(new, f))})" for f in diff)
        raise LosaError(f"{RESUME}: the recipe in {d} differs from this run's in {shown}; use the same "
                        f"settings or a new {OUT_DIR}")
    if saved_processes is not None and int(meta["step"]) < int(new["steps"]):  # else nothing is left to train
        _check_global_batch(d, old["finetune"], int(saved_processes), new["finetune"],
                            world_size() if processes is None else processes)
    return meta


def _check_global_batch(d: Path, old: dict, old_processes: int, new: dict, processes: int) -> None:
    """Fail when the global fine-tuning batch of a resumed run (``old``: the saved recipe's ``finetune``) is
    not this run's: the rest of the run would take other optimizer steps than the run it continues."""
    was, now = (f["batch_size"] * f["grad_accum"] * n for f, n in ((old, old_processes), (new, processes)))
    if was == now:
        return
    per_step = new["batch_size"] * processes
    fix = (f"pass {option('finetune.grad_accum', '--grad-accum')} {was // per_step} to keep it" if was % per_step == 0
           else f"run it with {old_processes} process{'es' if old_processes > 1 else ''}")
    raise LosaError(f"{RESUME}: the run in {d} fine-tunes with a global batch of {was} examples (batch size "
                    f"{old['batch_size']} x grad_accum {old['grad_accum']} x {old_processes} process"
                    f"{'es' if old_processes > 1 else ''}), this one with {now} ({new['batch_size']} x "
                    f"{new['grad_accum']} x {processes}); {fix}")


def check_resume_data(out_dir: str | Path, meta: dict, data: dict[str, str]) -> None:
    """Fail when this run's data (:func:`fingerprint`) are not those of the state ``meta`` in ``out_dir``.

    Raises:
        LosaError: the calibration or the fine-tuning data differ.
    """
    for what in ("calibration", "finetune"):
        if meta.get("data", {}).get(what) != data[what]:
            raise LosaError(f"{RESUME}: the {what} data differ from the run in {Path(out_dir) / STATE_DIR} "
                            f"(fingerprint mismatch); use the same data or a new {OUT_DIR}")


def load_state(out_dir: str | Path, model: nn.Module, recipe: dict, data: dict[str, str],
               origin: WeightOrigin | None = None) -> tuple[int, list[dict]]:
    """Restore weights, masks and adapters into ``model``, which must hold its original weights.

    Every weight is rebuilt bit for bit as ``W₀ ⊙ M``, or from the stored kept values (or whole
    weight), ``W₀`` being the model's current (original) weight; ``base_edited`` is set exactly.

    Args:
        out_dir: the run directory.
        model: the adapter-wrapped model (same architecture and adapted modules), freshly loaded from
            the checkpoint the run started from, not yet pruned.
        recipe: this run's LoSAConfig as a mapping.
        data: :func:`fingerprint` of this run's data.
        origin: :meth:`WeightOrigin.of` ``model`` (computed here when None).
    Returns:
        (finished step, per-step rows).
    Raises:
        LosaError: no state to resume; the algorithm (recipe without placement fields) or the data
            differ; the model's weights are not those the run started from; the state does not fit
            the model.
    """
    d = Path(out_dir) / STATE_DIR
    meta = check_resume(out_dir, recipe)
    check_resume_data(out_dir, meta, data)
    mods = sparse_lora_modules(model)
    mismatch = LosaError(f"{RESUME}: checkpoint in {d} does not match this model; use the same model or a new "
                         f"{OUT_DIR}")
    fmt = int(meta.get("format", 1))
    if fmt > STATE_FORMAT:
        raise LosaError(f"{RESUME}: the state in {d} was written by a newer losa (format {fmt}); upgrade losa to "
                        "resume it")
    if fmt >= 2:
        if set(meta.get("origin", {})) != set(mods):
            raise mismatch
        origin = origin or WeightOrigin.of(model)
        moved = [q for q in mods if meta["origin"][q] != origin.digests.get(q)]
        if moved:
            raise LosaError(f"{RESUME}: the model's weights differ from those the run in {d} started from "
                            f"({len(moved)} of {len(mods)} modules, e.g. {moved[0]}); load the same checkpoint or use a "
                            f"new {OUT_DIR}")
    mask_key = "mask_bits" if fmt >= 2 else "mask"
    adapters = load_file(str(d / "adapters.safetensors"))
    if set(adapters) != {f"{q}.{k}" for q in mods for k in ("lora_A", "lora_B", "active_rank", mask_key)}:
        raise mismatch
    with safe_open(str(d / "weights.safetensors"), framework="pt") as stored, torch.no_grad():
        keys = set(stored.keys())
        if fmt < 2 and keys != {f"{q}.weight" for q in mods}:
            raise mismatch
        if not keys <= {f"{q}.{k}" for q in mods for k in ("weight", "kept")}:
            raise mismatch
        for q, m in mods.items():
            _restore(m, q, adapters, stored, keys, mask_key, mismatch)
    return int(meta["step"]), list(meta["rows"])


def _restore(m: SparseLoRALinear, q: str, adapters: dict[str, torch.Tensor], stored: Any, keys: set[str],
             mask_key: str, mismatch: LosaError) -> None:
    """One module: W from ``W₀``, the mask and any stored values; then the adapter."""
    w0 = get_weight(m.base).detach()
    for k, like in (("lora_A", m.lora_A), ("lora_B", m.lora_B)):
        if adapters[f"{q}.{k}"].shape != like.shape:
            raise LosaError(f"{RESUME}: {q}: stored adapter {k} {tuple(adapters[f'{q}.{k}'].shape)} != model's "
                            f"{tuple(like.shape)}; use the same r_max and model")
    raw = adapters[f"{q}.{mask_key}"].to(w0.device)
    mask = unpack_mask(raw, w0.shape) if mask_key == "mask_bits" else raw.to(torch.bool)
    if mask.shape != w0.shape:
        raise mismatch
    if f"{q}.weight" in keys:
        new = stored.get_tensor(f"{q}.weight").to(device=w0.device, dtype=w0.dtype)
        if new.shape != w0.shape:
            raise mismatch
    elif f"{q}.kept" in keys:
        kept = stored.get_tensor(f"{q}.kept").to(device=w0.device, dtype=w0.dtype)
        if kept.dim() != 1 or kept.numel() != int(mask.sum()):
            raise mismatch
        new = torch.zeros_like(w0)
        new[mask] = kept
    else:
        new = torch.where(mask, w0, torch.zeros((), dtype=w0.dtype, device=w0.device))
    edited = bool(((bits(new) != bits(w0)) & mask).any())
    set_weight(m.base, new)
    if mask_key == "mask_bits" and m.in_features % 8 == 0:  # the flat bytes are the module's packed rows
        m.set_mask_bits(raw.reshape(m.mask_bits.shape))
    else:
        m.set_mask(mask)
    m.base_edited = edited
    m.lora_A.copy_(adapters[f"{q}.lora_A"])
    m.lora_B.copy_(adapters[f"{q}.lora_B"])
    m.active_rank.fill_(int(adapters[f"{q}.active_rank"].item()))
