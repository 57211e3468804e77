"""Save and load a sparsified model in the compact format (one safetensors file).

The file holds every tensor of the model's state dict; a :class:`SparseLinear` contributes its
``meta``/``values``/``row_ptr``(/``bias``) instead of a dense weight, so the file shrinks with the
sparsity. The safetensors metadata key ``losa_sparse`` lists those modules (shape, format), so
:func:`load_sparse` can rebuild them inside a freshly loaded (dense) model of the same architecture.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from losa.errors import LosaError
from losa.inference.formats import Packed
from losa.inference.sparse_linear import SparseLinear
from losa.models.linear import get_weight
from losa.models.moe import unfuse_experts
from losa.models.registry import replace_module
from losa.utils.io import atomic_write_bytes

_KEY = "losa_sparse"
_SOURCE_KEY = "losa_source_model"


def save_sparse(model: nn.Module, path: str | os.PathLike, source_model: str | None = None) -> Path:
    """Write ``model`` (after :func:`sparsify_for_inference`) to ``path`` (a ``.safetensors`` file), atomically.

    Args:
        model: a model with :class:`SparseLinear` layers.
        path: the file to write (replaced if it exists).
        source_model: the model the file loads into (the base the checkpoint was pruned from), recorded in the
            header so that tools can name it (:func:`compact_source_model`); None records nothing.
    Returns:
        ``path``.
    Raises:
        LosaError: the model has no sparse layers; the file cannot be written.
    """
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
    meta = {_KEY: json.dumps(info), **({_SOURCE_KEY: str(source_model)} if source_model else {})}
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


#: safetensors dtype names -> torch dtype names
_DTYPES = {"BF16": "bfloat16", "F32": "float32", "F16": "float16"}


@dataclass(frozen=True)
class CompactHeader:
    """What the header of a compact file says, read without loading any tensor.

    Attributes:
        modules: the ``losa_sparse`` entries: sparse module name -> ``{"shape": [out, in], "fmt": ...}``.
        source_model: the model the file loads into, as :func:`save_sparse` recorded it (None: not recorded).
        value_dtype: dtype of the first sparse module's values ("bfloat16", "float32"; None: no sparse module).
        dense_dtype: dtype of the first tensor outside the sparse modules (embedding, norms, dense layers: the
            model's dtype when it was saved; None: every tensor belongs to a sparse module).
    """

    modules: dict[str, dict]
    source_model: str | None
    value_dtype: str | None
    dense_dtype: str | None


def _parse_header(path: Path) -> CompactHeader | None:
    """The header of a safetensors file as a :class:`CompactHeader`, None when it has no ``losa_sparse``
    metadata. Raises whatever safetensors raises for a file it cannot read."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if _KEY not in meta:
            return None
        modules = json.loads(meta[_KEY])
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    name = next(iter(modules), None)
    dense = next((d for k, d in dtypes.items() if not any(k.startswith(n + ".") for n in modules)), None)
    return CompactHeader(modules, meta.get(_SOURCE_KEY), None if name is None else _dtype(dtypes[f"{name}.values"]),
                         None if dense is None else _dtype(dense))


def _dtype(name: str) -> str:
    return _DTYPES.get(name, name.lower())


def compact_header(path: str | os.PathLike) -> CompactHeader | None:
    """The header of ``path`` if it is a compact file written by :func:`save_sparse`, read without its tensors.

    Args:
        path: any path.
    Returns:
        The :class:`CompactHeader`; None for anything else (missing, a directory, unreadable, other files).
    """
    try:
        return _parse_header(Path(path)) if os.path.isfile(path) else None
    except Exception:  # noqa: BLE001 - not a safetensors file at all
        return None


def read_compact_header(path: str | os.PathLike) -> CompactHeader:
    """The header of a compact file; every reason it is not one is one ``LosaError`` line naming the fix.

    Args:
        path: a file written by :func:`save_sparse`.
    Returns:
        The :class:`CompactHeader`.
    Raises:
        LosaError: the file is missing or a directory, not a safetensors file, or not a losa compact checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        raise LosaError(f"compact checkpoint {path} is a directory (a model checkpoint?): give it as MODEL, or write a "
                        f"compact file from it with `losa compact {path} --out FILE`")
    if not path.is_file():
        raise LosaError(f"compact checkpoint {path} not found; write one with `losa compact CHECKPOINT --out FILE` "
                        "(or losa.inference.save_sparse)")
    try:
        header = _parse_header(path)
    except Exception as e:  # noqa: BLE001 - a broken header: one line
        raise LosaError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); give a file "
                        "written by save_sparse (losa compact)") from None
    if header is None:
        raise LosaError(f"{path} is not a losa compact checkpoint (no '{_KEY}' metadata); write one from the "
                        "pruned checkpoint with `losa compact CHECKPOINT --out FILE`")
    return header


def is_compact_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file written by :func:`save_sparse` (its header has the metadata key).

    Args:
        path: any path.
    Returns:
        True for a readable compact file; False for anything else (missing, unreadable, other files).
    """
    return compact_header(path) is not None


def compact_source_model(path: str | os.PathLike) -> str | None:
    """The model a compact file loads into, as recorded by :func:`save_sparse` (``losa compact`` records the
    pruned checkpoint's source model), or None when the file records none or is not a readable compact file."""
    header = compact_header(path)
    return None if header is None else header.source_model


def stored_dense_dtype(path: str | os.PathLike) -> str | None:
    """The dtype of the tensors a compact file stores dense (embedding, norms, dense layers; the model's dtype when
    it was saved), read from its header.

    Args:
        path: a file written by :func:`save_sparse`.
    Returns:
        The dtype name ("float32", "bfloat16", "float16"), or None when every tensor belongs to a sparse layer.
    Raises:
        LosaError: the file is missing, not a safetensors file, or not a losa compact checkpoint.
    """
    return read_compact_header(path).dense_dtype


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
    return read_compact_header(path).value_dtype


def load_sparse(model: nn.Module, path: str | os.PathLike, prefill_dtype: str | torch.dtype = "float32") -> nn.Module:
    """Load a file written by :func:`save_sparse` into ``model`` (same architecture), in place.

    Works on any ``nn.Module`` that :func:`~losa.sparsify_for_inference` accepts: a registered Hugging
    Face family has its fused experts unfused first (as sparsifying did), anything else is used as is.

    Args:
        model: a freshly loaded dense model of the architecture the file was saved from.
        path: the compact file.
        prefill_dtype: precision of the sparse layers' large-batch GEMM for float32 inputs.
    Returns:
        ``model``, its sparse layers replaced by :class:`~losa.inference.SparseLinear`.
    Raises:
        LosaError: the file is missing, unreadable or not a compact checkpoint; a module or tensor of the
            file is not in the model or has another shape (another model or size).
    """
    from safetensors.torch import load_file

    from losa.models.registry import supported_model_types

    info = read_compact_header(path).modules
    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt tensor: one line
        raise LosaError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); give a file "
                        "written by save_sparse (losa compact)") from None
    if getattr(getattr(model, "config", None), "model_type", None) in supported_model_types():
        unfuse_experts(model)  # sparsify_for_inference saved the experts unfused (one linear per expert matrix)
    for name, spec in info.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise LosaError(f"{path}: module {name!r} is not in this model; load the matching base model") from None
        have = (old.out_features, old.in_features) if isinstance(old, SparseLinear) else tuple(get_weight(old).shape)
        if have != tuple(spec["shape"]):
            raise LosaError(f"{path}: module {name!r} is {list(spec['shape'])} in the file but {list(have)} in this "
                            "model; load the matching base model")
        packed = Packed(tensors[f"{name}.meta"], tensors[f"{name}.values"], tensors[f"{name}.row_ptr"],
                        tuple(spec["shape"]), spec["fmt"])
        threshold = getattr(old, "dense_batch_threshold", None)
        new = SparseLinear(packed, tensors.get(f"{name}.bias"), prefill_dtype=prefill_dtype,
                           **({"dense_batch_threshold": threshold} if threshold is not None else {}))
        replace_module(model, name, new)
    own = model.state_dict()
    wrong = [k for k, t in tensors.items() if k in own and own[k].shape != t.shape]
    if wrong:
        raise LosaError(f"{path}: tensor {wrong[0]} is {list(tensors[wrong[0]].shape)} in the file but "
                        f"{list(own[wrong[0]].shape)} in this model; load the matching base model")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise LosaError(f"{path}: tensors {unexpected[:3]} do not fit this model; load the matching base model")
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if missing and not (tied and all(k.endswith("lm_head.weight") for k in missing)):
        raise LosaError(f"{path}: missing tensors {missing[:3]}; the file is incomplete or for another model")
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model
