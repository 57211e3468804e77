"""Atomic per-step checkpoints of a LoSA run, so ``--resume`` continues from the last finished step.

``<out>/state/`` holds the pruned base weights of every adapted module, the adapters (A, B, mask,
active rank) and ``state.json`` (step, recipe, data fingerprints, per-step report rows). The whole
directory is replaced atomically after every step, so a run killed at any moment leaves the previous
finished step intact.

No optimizer or RNG state is kept, because a step needs none from the step before: every step's
fine-tune starts a fresh optimizer, and every step starts by reseeding all RNGs from (seed, step). A
run killed mid-step therefore redoes that step from its start and ends bit-identical to an
uninterrupted run (tested).

A run moved to another machine resumes when its algorithm is the same: the recipe is compared without
the fields that only say where things are (:data:`PLACEMENT_FIELDS`), and the data by fingerprints of
the calibration windows and the tokenised fine-tuning examples instead of by path.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from losa.errors import LosaError
from losa.lora.model import adapter_state_dict, load_adapter_state_dict, sparse_lora_modules
from losa.utils.io import atomic_directory

STATE_DIR = "state"


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


def _algorithm(recipe: dict) -> dict:
    return {k: v for k, v in json.loads(json.dumps(recipe, default=_default)).items() if k not in PLACEMENT_FIELDS}


def save_state(out_dir: str | Path, model: nn.Module, step: int, recipe: dict, rows: list[dict],
               data: dict[str, str]) -> Path:
    """Write the state after ``step`` (atomically replacing the previous one).

    Args:
        out_dir: the run directory.
        model: the adapter-wrapped model.
        step: the finished step.
        recipe: the LoSAConfig as a mapping.
        rows: the per-step rows so far.
        data: :func:`fingerprint` of the run's data.
    Returns:
        the state directory.
    """
    out = Path(out_dir)
    weights = {f"{q}.weight": m.base.weight.detach().cpu().contiguous() for q, m in sparse_lora_modules(model).items()}
    with atomic_directory(out / STATE_DIR, overwrite=True) as tmp:
        save_file(weights, str(tmp / "weights.safetensors"))
        save_file(adapter_state_dict(model), str(tmp / "adapters.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "recipe": recipe, "data": data, "rows": rows},
                                                   indent=1, default=_default))
    return out / STATE_DIR


def _default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(type(o).__name__)


def load_state(out_dir: str | Path, model: nn.Module, recipe: dict, data: dict[str, str]) -> tuple[int, list[dict]]:
    """Restore weights and adapters into ``model``.

    Args:
        out_dir: the run directory.
        model: the adapter-wrapped model (same architecture and adapted modules).
        recipe: this run's LoSAConfig as a mapping.
        data: :func:`fingerprint` of this run's data.
    Returns:
        (finished step, per-step rows).
    Raises:
        LosaError: no state to resume; the algorithm (recipe without placement fields) or the data
            differ; the state does not fit the model.
    """
    d = Path(out_dir) / STATE_DIR
    if not (d / "state.json").is_file():
        raise LosaError(f"--resume: {out_dir} holds no finished LoSA step (no {STATE_DIR}/state.json); run without "
                        "--resume to start, or point --out at the run to continue")
    meta = json.loads((d / "state.json").read_text())
    old, new = _algorithm(meta["recipe"]), _algorithm(recipe)
    if old != new:
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise LosaError(f"--resume: the recipe in {d} differs from this run's in {', '.join(diff)}; use the same "
                        "settings or a new --out")
    for what in ("calibration", "finetune"):
        if meta.get("data", {}).get(what) != data[what]:
            raise LosaError(f"--resume: the {what} data differ from the run in {d} (fingerprint mismatch); use the "
                            "same data or a new --out")
    weights = load_file(str(d / "weights.safetensors"))
    mods = sparse_lora_modules(model)
    if set(weights) != {f"{q}.weight" for q in mods}:
        raise LosaError(f"--resume: checkpoint in {d} does not match this model; use the same model or a new --out")
    with torch.no_grad():
        for q, m in mods.items():
            m.base.weight.copy_(weights[f"{q}.weight"])
    load_adapter_state_dict(model, load_file(str(d / "adapters.safetensors")))
    return int(meta["step"]), list(meta["rows"])
