"""Atomic checkpoint output: ``save_pretrained`` safetensors plus ``losa.json``."""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

from losa.errors import LosaError
from losa.utils.io import atomic_directory, atomic_write_json
from losa.utils.versions import versions

MANIFEST = "losa.json"


def save_checkpoint(model, tokenizer, out: str | os.PathLike, manifest: dict | None = None,
                    overwrite: bool = False) -> Path:
    """Write model, tokenizer and ``losa.json`` to a temp dir, then rename it to ``out``.

    ``losa.json`` holds ``created`` (UTC, ISO 8601), ``versions`` (losa, torch, transformers,
    python) and then the keys of ``manifest``. If anything fails, ``out`` is left untouched.

    Args:
        model: a Hugging Face model (``save_pretrained``, safetensors).
        tokenizer: its tokenizer, or None to save none.
        out: the checkpoint directory.
        manifest: JSON-serialisable entries for ``losa.json`` (tensors, paths and pydantic models are converted);
            None: none.
        overwrite: replace an existing ``out``.
    Returns:
        ``out`` as a ``Path``.
    Raises:
        LosaError: ``out`` exists and ``overwrite`` is False; the model holds the runtime's sparse layers
            (:func:`losa.sparsify_for_inference`), which ``save_pretrained`` cannot write in a form
            ``load_model`` reads (save them with :func:`losa.inference.save_sparse`, or save before sparsifying).
        TypeError: a manifest value is not JSON serialisable.
    """
    from losa.inference.sparse_linear import SparseLinear

    if any(isinstance(m, SparseLinear) for m in model.modules()):
        raise LosaError("the model holds sparse runtime layers (sparsify_for_inference); save them with "
                        "losa.inference.save_sparse, or save the checkpoint before sparsifying")
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        data = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "versions": versions(), **(manifest or {})}
        atomic_write_json(tmp / MANIFEST, data)
    return out
