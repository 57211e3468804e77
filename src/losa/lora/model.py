"""Attach, inspect, save, load and merge sparse LoRA adapters on a causal LM.

Why not PEFT: PEFT's LoRA layer ties the scale to the rank (α/r) and fixes the rank at creation,
while LoSA changes each module's active rank between steps without losing the trained ranks and
keeps the scale α/r_max constant; PEFT's merge adds ``B A`` densely (it would fill the pruned
positions) and has no mask buffer. Bending PEFT to this means overriding its forward, merge, unmerge,
rank handling and state-dict layout, i.e. everything but the name. So losa owns the module
(:class:`SparseLoRALinear`, ~150 lines) and saves adapters as one safetensors file whose keys are
``<module path>.lora_A`` / ``.lora_B`` / ``.mask_bits`` / ``.active_rank`` plus a JSON config
(``.mask_bits`` is the module's bit-packed keep-mask; files from older losa with a bool ``.mask``
still load).
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from losa.errors import LosaError
from losa.lora.config import SparseLoRAConfig
from losa.lora.layer import SparseLoRALinear
from losa.models.linear import get_weight
from losa.models.registry import get_arch, get_decoder_layers, linear_modules, replace_module
from losa.utils.io import atomic_write_bytes, atomic_write_text


def add_sparse_lora(model: nn.Module, config: SparseLoRAConfig, masks: dict[str, torch.Tensor] | None = None,
                    mask_from_weights: bool = False) -> dict[str, SparseLoRALinear]:
    """Wrap every prunable linear of every decoder layer in a :class:`SparseLoRALinear`.

    The mask of each module is ``masks[qualified name]`` if given, else derived ONCE here from
    ``W ≠ 0`` when ``mask_from_weights`` (for a model pruned elsewhere), else all-ones (dense model
    that LoSA will prune). All other parameters of the model are frozen. The config is kept on the
    model for :func:`save_adapters`.

    Args:
        model: a causal LM of a registered architecture; modified in place.
        config: capacity, initial rank, alpha, dropout, target modules and init seed.
        masks: qualified name (``<layers_path>.<i>.<name>``, e.g. ``model.layers.0.mlp.down_proj``) ->
            keep-mask ``[out, in]``; modules not in it fall back as above.
        mask_from_weights: derive missing masks from ``W ≠ 0``.
    Returns:
        Qualified name -> the new :class:`SparseLoRALinear`, in model order.
    Raises:
        LosaError: the model already has adapters, no module matches ``target_modules``, the
            architecture is unsupported, or a mask is not shaped like its weight.
    """
    if sparse_lora_modules(model):
        raise LosaError("model already has sparse LoRA adapters; merge them first with "
                        "losa.lora.merge_and_unload(model)")
    spec = get_arch(model)
    gen = torch.Generator().manual_seed(config.init_seed)
    for p in model.parameters():
        p.requires_grad_(False)
    prefix = spec.layers_path
    wrapped: dict[str, SparseLoRALinear] = {}
    for i, layer in enumerate(get_decoder_layers(model, spec)):
        for name, mod in linear_modules(layer, spec).items():
            if not any(fnmatch.fnmatch(name, pat) for pat in config.target_modules):
                continue
            qual = f"{prefix}.{i}.{name}"
            mask = masks.get(qual) if masks else None
            if mask is None and mask_from_weights:
                mask = get_weight(mod) != 0
            wrapper = SparseLoRALinear(mod, config.r_max, config.alpha, rank=config.rank, mask=mask,
                                       dropout=config.dropout, generator=gen)
            replace_module(layer, name, wrapper)
            wrapped[qual] = wrapper
    if not wrapped:
        raise LosaError(f"no linear module matched target_modules={list(config.target_modules)}")
    model._losa_lora_config = config  # type: ignore[attr-defined]
    return wrapped


def sparse_lora_modules(model: nn.Module) -> dict[str, SparseLoRALinear]:
    """Qualified name -> adapter module, in model order.

    Args:
        model: any module.
    Returns:
        Every :class:`SparseLoRALinear` under ``model`` by qualified name (empty if none).
    Raises:
        Nothing of its own.
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters, for the optimiser.

    Args:
        model: a model with adapters from :func:`add_sparse_lora`.
    Returns:
        ``[A, B]`` of every adapter in model order, except those :func:`freeze_adapters` froze: ``lora_A``
        ``[r_max, in]`` and ``lora_B`` ``[out, r_max]``, float32, at full capacity (inactive ranks included).
    Raises:
        Nothing of its own.
    """
    return [p for m in sparse_lora_modules(model).values() for p in (m.lora_A, m.lora_B) if p.requires_grad]


def freeze_adapters(model: nn.Module, target_modules: Sequence[str]) -> int:
    """Freeze at rank 0 every adapter whose module (named relative to its decoder layer, e.g. ``mlp.down_proj``)
    matches none of the glob patterns ``target_modules``: it adds nothing, is not trained (``requires_grad``
    off) and keeps rank 0 in :func:`set_layer_ranks`, while its mask still follows pruning and is saved with the
    others (LoSA's ``lora_target_modules``). An adapter that was already trained has its update folded into the
    weight under the mask first, as :meth:`SparseLoRALinear.set_rank` does; an untrained one (``B = 0``) keeps
    its ``A`` (no random draw).

    Args:
        model: a model with adapters from :func:`add_sparse_lora`, of a registered architecture.
        target_modules: the glob patterns of the adapters that stay trainable.
    Returns:
        How many adapters were frozen.
    Raises:
        LosaError: no adapter matches ``target_modules`` (the message lists the module names).
    """
    names: list[str] = []
    frozen = 0
    for layer in get_decoder_layers(model):
        for name, m in layer.named_modules():
            if not isinstance(m, SparseLoRALinear):
                continue
            names.append(name)
            if not any(fnmatch.fnmatch(name, pat) for pat in target_modules):
                if bool(m.lora_B.detach().any()):
                    m.set_rank(0)  # folds the trained update into W
                else:
                    m.active_rank.fill_(0)
                m.lora_A.requires_grad_(False)
                m.lora_B.requires_grad_(False)
                m.frozen = True
                frozen += 1
    if frozen == len(names):
        raise _no_target("target_modules", target_modules, names)
    return frozen


def check_target_modules(model: nn.Module, target_modules: Sequence[str], what: str = "target_modules") -> None:
    """Fail before any work when the glob patterns ``target_modules`` match no prunable linear of ``model``'s
    decoder layers (names relative to the layer, e.g. ``mlp.down_proj``).

    Args:
        model: a causal LM of a registered architecture.
        target_modules: glob patterns.
        what: the setting that gave them, as the message names it.
    Raises:
        LosaError: no match (the message lists the names).
    """
    names = [n for layer in get_decoder_layers(model) for n in linear_modules(layer)]
    if not any(fnmatch.fnmatch(n, pat) for n in names for pat in target_modules):
        raise _no_target(what, target_modules, names)


def _no_target(what: str, target_modules: Sequence[str], names: list[str]) -> LosaError:
    return LosaError(f"{what} {','.join(target_modules)} matches no linear of the decoder layers "
                     f"({', '.join(dict.fromkeys(names))}); use e.g. mlp.*")


def set_layer_ranks(model: nn.Module, ranks: list[int], generator: torch.Generator | None = None) -> None:
    """Give every adapter of decoder layer l the rank ``ranks[l]`` (adapters frozen by :func:`freeze_adapters`
    keep rank 0).

    Used by LoSA's sparsity-aware rank allocation; see :meth:`SparseLoRALinear.set_rank` for what
    happens to ranks that leave or join the active set.

    Args:
        model: a model with adapters, of a registered architecture.
        ranks: one rank per decoder layer, each in ``[0, r_max]``.
        generator: CPU generator for the re-drawn rows of A.
    Returns:
        None.
    Raises:
        LosaError: ``len(ranks)`` differs from the number of decoder layers, a rank is outside
            ``[0, r_max]``, an adapter is merged, or the architecture is unsupported.
    """
    layers = get_decoder_layers(model)
    if len(ranks) != len(layers):
        raise LosaError(f"got {len(ranks)} ranks for {len(layers)} decoder layers")
    for r, layer in zip(ranks, layers):
        for m in layer.modules():
            if isinstance(m, SparseLoRALinear) and not getattr(m, "frozen", False):  # frozen: freeze_adapters
                m.set_rank(int(r), generator)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter into its weight (``W + s·((B A) ⊙ M)``) and put the plain module back.

    The merge is exact in float32 and adds nothing outside M, so sparsity is kept; the result is
    stored in the base weight's dtype. An adapter that is already merged is first unmerged, then
    merged again at its current rank.

    Args:
        model: a model with adapters; modified in place.
    Returns:
        ``model``, with no adapters and no stored adapter config.
    Raises:
        Nothing of its own.
    """
    for qual, m in list(sparse_lora_modules(model).items()):
        if m.merged:
            m.unmerge()
        m.merge(keep_original=False)
        replace_module(model, qual, m.base)
    if hasattr(model, "_losa_lora_config"):
        del model._losa_lora_config
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters as CPU tensors, in the layout of ``adapters.safetensors``.

    Args:
        model: a model with adapters.
    Returns:
        Per qualified module name ``q``: ``q.lora_A`` ``[r_max, in]`` float32, ``q.lora_B``
        ``[out, r_max]`` float32, ``q.mask_bits`` ``[out, ceil(in / 8)]`` uint8 (the keep-mask
        bit-packed along ``in``, :func:`losa.lora.bitmask.pack_bits`; the module's buffer, not
        unpacked) and ``q.active_rank`` ``[1]`` int64; detached, contiguous copies on the CPU.
    Raises:
        Nothing of its own.
    """
    out: dict[str, torch.Tensor] = {}
    for qual, m in sparse_lora_modules(model).items():
        out[f"{qual}.lora_A"] = m.lora_A.detach().cpu().contiguous()
        out[f"{qual}.lora_B"] = m.lora_B.detach().cpu().contiguous()
        out[f"{qual}.mask_bits"] = m.mask_bits.detach().cpu().contiguous()
        out[f"{qual}.active_rank"] = m.active_rank.detach().cpu().reshape(1)
    return out


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a state from :func:`adapter_state_dict` into the model's existing adapters, in place.

    The model needs adapters on exactly the same modules (:func:`add_sparse_lora` with the same
    ``target_modules`` and ``r_max``); A, B, mask and active rank are overwritten as stored.
    Each module's mask may be the packed ``.mask_bits`` or, as written by older losa, a bool
    ``.mask`` ``[out, in]`` (packed on load).

    Args:
        model: a model with adapters.
        state: ``<module>.lora_A`` / ``.lora_B`` / ``.mask_bits`` (or ``.mask``) / ``.active_rank`` tensors.
    Returns:
        None.
    Raises:
        LosaError: the key set differs from the model's adapters, an ``A`` has another shape (other
            ``r_max``), or a mask is not shaped like its weight.
    """
    mods = sparse_lora_modules(model)
    expected = {f"{q}.{k}" for q in mods for k in ("lora_A", "lora_B", "mask_bits", "active_rank")}
    legacy = {f"{q}.mask" for q in mods if f"{q}.mask" in state and f"{q}.mask_bits" not in state}
    expected = expected - {k + "_bits" for k in legacy} | legacy
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise LosaError(f"adapter file does not match the model (missing {missing}, unexpected {extra}); "
                        "load it into the same architecture with the same target modules")
    with torch.no_grad():
        for q, m in mods.items():
            if state[f"{q}.lora_A"].shape != m.lora_A.shape:
                raise LosaError(f"{q}: adapter capacity {tuple(state[f'{q}.lora_A'].shape)} != model's "
                                f"{tuple(m.lora_A.shape)}; use the same r_max")
            m.lora_A.copy_(state[f"{q}.lora_A"])
            m.lora_B.copy_(state[f"{q}.lora_B"])
            if f"{q}.mask" in legacy:
                m.set_mask(state[f"{q}.mask"])
            else:
                m.set_mask_bits(state[f"{q}.mask_bits"])
            m.active_rank.fill_(int(state[f"{q}.active_rank"].item()))


def save_adapters(model: nn.Module, directory: str | Path) -> None:
    """``adapters.safetensors`` + ``adapter_config.json`` in ``directory`` (each written atomically).

    Args:
        model: a model with adapters; the config is the one :func:`add_sparse_lora` stored (``{}`` if none).
        directory: output directory, created if missing; existing files of these names are replaced.
    Returns:
        None.
    Raises:
        Nothing of its own (file-system errors propagate as ``OSError``).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = getattr(model, "_losa_lora_config", None)
    tmp = d / ".adapters.safetensors.tmp"
    save_file(adapter_state_dict(model), str(tmp))
    atomic_write_bytes(d / "adapters.safetensors", tmp.read_bytes())
    tmp.unlink()
    atomic_write_text(d / "adapter_config.json", json.dumps(cfg.model_dump() if cfg else {}, indent=2))


def load_adapters(model: nn.Module, directory: str | Path) -> None:
    """Load ``adapters.safetensors`` written by :func:`save_adapters` into the model's adapters.

    ``adapter_config.json`` is not read: add the adapters first with :func:`add_sparse_lora` and
    the same config.

    Args:
        model: a model with adapters on the same modules and of the same ``r_max``.
        directory: the directory :func:`save_adapters` wrote.
    Returns:
        None.
    Raises:
        LosaError: no ``adapters.safetensors`` in ``directory``, or the file does not match the model
            (see :func:`load_adapter_state_dict`).
    """
    f = Path(directory) / "adapters.safetensors"
    if not f.is_file():
        raise LosaError(f"no adapters.safetensors in {directory}; pass the directory save_adapters wrote")
    load_adapter_state_dict(model, load_file(str(f)))
