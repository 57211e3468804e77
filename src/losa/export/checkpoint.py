"""Atomic checkpoint output: ``save_pretrained`` safetensors plus ``losa.json``."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path

from losa.utils.io import atomic_directory, atomic_write_json

MANIFEST = "losa.json"


def versions() -> dict[str, str]:
    import torch
    import transformers

    import losa

    return {"losa": losa.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def save_checkpoint(model, tokenizer, out: str | os.PathLike, manifest: dict, overwrite: bool = False) -> Path:
    """Write model, tokenizer and ``losa.json`` to a temp dir, then rename it to ``out``."""
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        data = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "versions": versions(), **manifest}
        atomic_write_json(tmp / MANIFEST, data)
    return out
