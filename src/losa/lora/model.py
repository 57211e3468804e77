"""Attach, inspect, save, load and merge sparse LoRA adapters on a causal LM.

Why not PEFT: PEFT's LoRA layer ties the scale to the rank (α/r) and fixes the rank at creation,
while LoSA changes each module's active rank between steps without losing the trained ranks and
keeps the scale α/r_max constant; PEFT's merge adds ``B A`` densely (it would fill the pruned
positions) and has no mask buffer. Bending PEFT to this means overriding its forward, merge, unmerge,
rank handling and state-dict layout, i.e. everything but the name. So losa owns the module
(:class:`SparseLoRALinear`, ~150 lines) and saves adapters as one safetensors file whose keys are
``<module path>.lora_A`` / ``.lora_B`` / ``.mask`` / ``.active_rank`` plus a JSON config.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from losa.errors import LosaError
from losa.lora.config import SparseLoRAConfig
from losa.lora.layer import SparseLoRALinear
from losa.models.linear import get_weight
from losa.models.registry import get_arch, get_decoder_layers, linear_modules
from losa.utils.io import atomic_write_bytes, atomic_write_text


def add_sparse_lora(model: nn.Module, config: SparseLoRAConfig, masks: dict[str, torch.Tensor] | None = None,
                    mask_from_weights: bool = False) -> dict[str, SparseLoRALinear]:
    """Wrap every prunable linear of every decoder layer in a :class:`SparseLoRALinear`.

    The mask of each module is ``masks[qualified name]`` if given, else derived ONCE here from
    ``W ≠ 0`` when ``mask_from_weights`` (for a model pruned elsewhere), else all-ones (dense model
    that LoSA will prune). All other parameters of the model are frozen.
    """
    if sparse_lora_modules(model):
        raise LosaError("model already has sparse LoRA adapters; merge_and_unload() them first")
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
            parent_name, _, attr = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, attr, wrapper)
            wrapped[qual] = wrapper
    if not wrapped:
        raise LosaError(f"no linear module matched target_modules={list(config.target_modules)}")
    model._losa_lora_config = config  # type: ignore[attr-defined]
    return wrapped


def sparse_lora_modules(model: nn.Module) -> dict[str, SparseLoRALinear]:
    """Qualified name -> adapter module, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in sparse_lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def set_layer_ranks(model: nn.Module, ranks: list[int], generator: torch.Generator | None = None) -> None:
    """Give every adapter of decoder layer l the rank ``ranks[l]``."""
    layers = get_decoder_layers(model)
    if len(ranks) != len(layers):
        raise LosaError(f"got {len(ranks)} ranks for {len(layers)} decoder layers")
    for r, layer in zip(ranks, layers):
        for m in layer.modules():
            if isinstance(m, SparseLoRALinear):
                m.set_rank(int(r), generator)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter into its weight (``W + s·((B A) ⊙ M)``) and put the plain module back."""
    for qual, m in list(sparse_lora_modules(model).items()):
        if m.merged:
            m.unmerge()
        m.merge(keep_original=False)
        parent_name, _, attr = qual.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, m.base)
    if hasattr(model, "_losa_lora_config"):
        del model._losa_lora_config
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for qual, m in sparse_lora_modules(model).items():
        out[f"{qual}.lora_A"] = m.lora_A.detach().cpu().contiguous()
        out[f"{qual}.lora_B"] = m.lora_B.detach().cpu().contiguous()
        out[f"{qual}.mask"] = m.mask.cpu().contiguous()
        out[f"{qual}.active_rank"] = m.active_rank.detach().cpu().reshape(1)
    return out


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    mods = sparse_lora_modules(model)
    expected = {f"{q}.{k}" for q in mods for k in ("lora_A", "lora_B", "mask", "active_rank")}
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
            m.set_mask(state[f"{q}.mask"])
            m.active_rank.fill_(int(state[f"{q}.active_rank"].item()))


def save_adapters(model: nn.Module, directory: str | Path) -> None:
    """``adapters.safetensors`` + ``adapter_config.json`` in ``directory`` (each written atomically)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = getattr(model, "_losa_lora_config", None)
    tmp = d / ".adapters.safetensors.tmp"
    save_file(adapter_state_dict(model), str(tmp))
    atomic_write_bytes(d / "adapters.safetensors", tmp.read_bytes())
    tmp.unlink()
    atomic_write_text(d / "adapter_config.json", json.dumps(cfg.model_dump() if cfg else {}, indent=2))


def load_adapters(model: nn.Module, directory: str | Path) -> None:
    f = Path(directory) / "adapters.safetensors"
    if not f.is_file():
        raise LosaError(f"no adapters.safetensors in {directory}; pass the directory save_adapters wrote")
    load_adapter_state_dict(model, load_file(str(f)))
