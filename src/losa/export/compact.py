"""Save and load a sparsified model in the compact format (one safetensors file).

The file holds every tensor of the model's state dict; a :class:`SparseLinear` contributes its
``meta``/``values``/``row_ptr``(/``bias``) instead of a dense weight, so the file shrinks with the
sparsity. The safetensors metadata key ``losa_sparse`` lists those modules (shape, format), so
:func:`load_sparse` can rebuild them inside a freshly loaded (dense) model of the same architecture.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from losa.errors import LosaError
from losa.inference.formats import Packed
from losa.inference.sparse_linear import SparseLinear
from losa.models.moe import unfuse_experts
from losa.models.registry import replace_module
from losa.utils.io import atomic_write_bytes

_KEY = "losa_sparse"


def save_sparse(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (after :func:`sparsify_for_inference`) to ``path`` (a ``.safetensors`` file)."""
    from safetensors.torch import save

    sparse = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    if not sparse:
        raise LosaError("the model has no sparse layers; call losa.sparsify_for_inference(model) before saving")
    info = {n: {"shape": [m.out_features, m.in_features], "fmt": m.fmt} for n, m in sparse.items()}
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen and ptr != -1:  # tied weights (embeddings / LM head) are stored once
            continue
        seen.add(ptr)
        tensors[key] = t.detach().contiguous().cpu()
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata={_KEY: json.dumps(info)}))
    return path


#: safetensors dtype names of the stored sparse values
_VALUE_DTYPES = {"BF16": "bfloat16", "F32": "float32", "F16": "float16"}


def stored_value_dtype(path: str | os.PathLike) -> str | None:
    """The dtype of the sparse values stored in a compact file (``"bfloat16"``, ``"float32"``), read from
    its header without loading tensors; :func:`load_sparse` keeps it.

    Args:
        path: a file written by :func:`save_sparse`.
    Returns:
        The dtype name, or None when the file holds no sparse module.
    Raises:
        LosaError: the file is missing, not a safetensors file, or not a losa compact checkpoint.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LosaError(f"compact checkpoint {path} not found; write one with losa.inference.save_sparse")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if _KEY not in meta:
                raise LosaError(f"{path} is not a losa compact checkpoint (no '{_KEY}' metadata); use save_sparse")
            name = next(iter(json.loads(meta[_KEY])), None)
            dtype = None if name is None else f.get_slice(f"{name}.values").get_dtype()
    except LosaError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken header: one line
        raise LosaError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); give a file "
                        "written by save_sparse (losa generate --save-compact)") from None
    return None if dtype is None else _VALUE_DTYPES.get(dtype, dtype.lower())


def load_sparse(model: nn.Module, path: str | os.PathLike, prefill_dtype: str | torch.dtype = "float32") -> nn.Module:
    """Load a file written by :func:`save_sparse` into ``model`` (same architecture), in place."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LosaError(f"compact checkpoint {path} not found; write one with losa.inference.save_sparse")
    unfuse_experts(model)  # sparsify_for_inference saved the experts unfused (one linear per expert matrix)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if _KEY not in meta:
            raise LosaError(f"{path} is not a losa compact checkpoint (no '{_KEY}' metadata); use save_sparse")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta[_KEY])
    for name, spec in info.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise LosaError(f"{path}: module {name!r} is not in this model; load the matching base model") from None
        packed = Packed(tensors[f"{name}.meta"], tensors[f"{name}.values"], tensors[f"{name}.row_ptr"],
                        tuple(spec["shape"]), spec["fmt"])
        threshold = getattr(old, "dense_batch_threshold", None)
        new = SparseLinear(packed, tensors.get(f"{name}.bias"), prefill_dtype=prefill_dtype,
                           **({"dense_batch_threshold": threshold} if threshold is not None else {}))
        replace_module(model, name, new)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise LosaError(f"{path}: tensors {unexpected[:3]} do not fit this model; load the matching base model")
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if missing and not (tied and all(k.endswith("lm_head.weight") for k in missing)):
        raise LosaError(f"{path}: missing tensors {missing[:3]}; the file is incomplete or for another model")
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model
