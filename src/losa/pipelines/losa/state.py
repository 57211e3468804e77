"""Atomic per-step checkpoints of a LoSA run, so ``--resume`` continues from the last finished step.

``<out>/state/`` holds the pruned base weights of every adapted module, the adapters (A, B, mask,
active rank), the optimizer state of the last fine-tune, the RNG states, and ``state.json`` (step,
recipe, per-step report rows). The whole directory is replaced atomically after every step, so a
run killed at any moment leaves the previous finished step intact.
"""

from __future__ import annotations

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


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save_state(out_dir: str | Path, model: nn.Module, step: int, recipe: dict, rows: list[dict],
               optimizer_state: dict | None) -> Path:
    """Write the state after ``step`` (atomically replacing the previous one)."""
    out = Path(out_dir)
    weights = {f"{q}.weight": m.base.weight.detach().cpu().contiguous() for q, m in sparse_lora_modules(model).items()}
    with atomic_directory(out / STATE_DIR, overwrite=True) as tmp:
        save_file(weights, str(tmp / "weights.safetensors"))
        save_file(adapter_state_dict(model), str(tmp / "adapters.safetensors"))
        torch.save({"optimizer": optimizer_state or {}, "rng": _rng_state()}, tmp / "optimizer_rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "recipe": recipe, "rows": rows}, indent=1,
                                                   default=_default))
    return out / STATE_DIR


def _default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(type(o).__name__)


def load_state(out_dir: str | Path, model: nn.Module, recipe: dict) -> tuple[int, list[dict]] | None:
    """Restore weights and adapters into ``model``; returns (finished step, report rows) or None."""
    d = Path(out_dir) / STATE_DIR
    if not (d / "state.json").is_file():
        return None
    meta = json.loads((d / "state.json").read_text())
    if meta["recipe"] != json.loads(json.dumps(recipe, default=_default)):
        raise LosaError(f"--resume: the recipe in {d} differs from this run's; use the same settings or a new --out")
    weights = load_file(str(d / "weights.safetensors"))
    mods = sparse_lora_modules(model)
    if set(weights) != {f"{q}.weight" for q in mods}:
        raise LosaError(f"--resume: checkpoint in {d} does not match this model; use the same model or a new --out")
    with torch.no_grad():
        for q, m in mods.items():
            m.base.weight.copy_(weights[f"{q}.weight"])
    load_adapter_state_dict(model, load_file(str(d / "adapters.safetensors")))
    return int(meta["step"]), list(meta["rows"])
