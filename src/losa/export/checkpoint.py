"""Atomic checkpoint output: ``save_pretrained`` safetensors plus ``losa.json``."""

from __future__ import annotations

import datetime as _dt
import os
import warnings
from pathlib import Path

from losa.errors import LosaError
from losa.models.offload import is_offloaded
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
            The model holds sparse LoRA adapters (merge them first); the manifest sets ``created`` or
            ``versions``, or a value JSON cannot hold (named), all before anything is written.
    """
    from losa.inference.sparse_linear import SparseLinear
    from losa.lora.model import sparse_lora_modules

    if any(isinstance(m, SparseLinear) for m in model.modules()):
        raise LosaError("the model holds sparse runtime layers (sparsify_for_inference); save them with "
                        "losa.inference.save_sparse, or save the checkpoint before sparsifying")
    if sparse_lora_modules(model):  # save_pretrained would write wrapper keys that load_model cannot read
        raise LosaError("the model holds sparse LoRA adapters; merge them with losa.lora.merge_and_unload(model) "
                        "before saving")
    _check_manifest(manifest or {})
    out = Path(out)
    offloaded = is_offloaded(model)
    with atomic_directory(out, overwrite=overwrite) as tmp, warnings.catch_warnings():
        # an offloaded model is written a shard at a time, each shard onloaded whole: small shards for a model
        # that did not fit in memory (transformers' default is 50GB, and it warns to check the memory for it)
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        model.save_pretrained(tmp, safe_serialization=True, **({"max_shard_size": "2GB"} if offloaded else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        data = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "versions": versions(), **(manifest or {})}
        atomic_write_json(tmp / MANIFEST, data)
    return out


def update_manifest(out: str | os.PathLike, entries: dict) -> None:
    """Replace top-level entries of the ``losa.json`` of the checkpoint ``out`` (atomically), e.g. results measured
    after the checkpoint was saved.

    Args:
        out: a checkpoint written by :func:`save_checkpoint`.
        entries: JSON-serialisable entries; ``created`` and ``versions`` stay as written.
    Raises:
        LosaError: ``out`` has no readable ``losa.json``; ``entries`` sets ``created``/``versions`` or holds a
            value JSON cannot hold.
    """
    import json

    _check_manifest(entries)
    path = Path(out) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LosaError(f"cannot update {path}: {e}") from None
    atomic_write_json(path, {**data, **entries})


def _check_manifest(manifest: dict) -> None:
    """Refuse, before anything is written, the keys losa records itself and values that JSON cannot hold."""
    import json

    from losa.utils.io import _json_default

    own = sorted({"created", "versions"} & set(manifest))
    if own:
        raise LosaError(f"manifest key(s) {', '.join(own)} are recorded by losa itself; use other key names")
    for key, value in manifest.items():
        try:
            json.dumps(value, default=_json_default)
        except (TypeError, ValueError) as e:
            raise LosaError(f"manifest[{key!r}] cannot be written to losa.json ({e}); give JSON values "
                            "(numbers, strings, lists, dicts; tensors, paths and pydantic models are converted)") from None
