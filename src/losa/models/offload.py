"""Onloading the blocks of a model dispatched by accelerate with offloaded weights.

A model loaded with ``from_pretrained(..., device_map=..., max_memory=..., offload_folder=...)`` keeps
the weights that do not fit on the CPU or on disk: each module holding them has an accelerate
``AlignDevicesHook`` with ``offload=True``, its parameters sit on the meta device, and the hook's
``weights_map`` (a CPU state dict, or an ``OffloadedWeightsLoader`` reading safetensors files and
``.dat`` files of the offload folder) holds their values. A forward onloads them and drops them again.

Pruning changes weights in place, which a forward alone would lose. :func:`onloaded` brings a whole
block (e.g. one decoder layer) to the execution device with accelerate's own
``align_module_device``, keeps the hooks from reloading the stored values while it is open, and on
exit writes every tensor that changed back into its hook's ``weights_map`` (disk entries through
accelerate's ``offload_weight``, with the offload folder's ``index.json`` updated) before the
parameters go back to meta.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, MutableMapping

import torch
from accelerate.hooks import AlignDevicesHook
from accelerate.utils import align_module_device, has_offloaded_params, named_module_tensors
from accelerate.utils.offload import (
    OffloadedWeightsLoader,
    PrefixedDataset,
    offload_weight,
    save_offload_index,
)
from torch import nn

from losa.errors import LosaError
from losa.utils.memory import release_free_memory


def is_offloaded(model: nn.Module) -> bool:
    """Whether any module of ``model`` has weights offloaded by an accelerate hook.

    Args:
        model: any module.
    Returns:
        True when some module's ``AlignDevicesHook`` offloads its parameters (they are on meta).
    Raises:
        Nothing of its own.
    """
    return any(has_offloaded_params(m) for m in model.modules())


def input_device(model: nn.Module) -> torch.device:
    """The device to put a forward's input ids on.

    Args:
        model: any module with parameters.
    Returns:
        The first parameter's device, or CPU when that parameter is offloaded by accelerate (on meta):
        the model's accelerate hooks then move the inputs to where each module computes.
    Raises:
        Nothing of its own.
    """
    device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def execution_device(model: nn.Module) -> torch.device | None:
    """The one device a model dispatched by accelerate computes on.

    Args:
        model: any module.
    Returns:
        The ``execution_device`` shared by all its accelerate hooks, or None when it has no hooks
        that name one.
    Raises:
        LosaError: the hooks compute on more than one device (a model split across accelerators).
    """
    hooks = [h for m in model.modules() if isinstance(h := getattr(m, "_hf_hook", None), AlignDevicesHook)]
    devices = {torch.device(h.execution_device) for h in hooks if h.execution_device is not None}
    if len(devices) > 1:
        names = ", ".join(sorted(map(str, devices)))
        raise LosaError(f"the model is dispatched across several compute devices ({names}); layer-by-layer "
                        "pruning needs one: load it with one accelerator plus CPU/disk offload")
    return next(iter(devices), None)


def _tensors(module: nn.Module, hook: AlignDevicesHook) -> dict[str, torch.Tensor]:
    """The tensors ``hook`` onloads and offloads, by name (as in accelerate's hook)."""
    return dict(named_module_tensors(module, include_buffers=hook.offload_buffers,
                                     recurse=hook.place_submodules, remove_non_persistent=True))


def _store(weights_map: Mapping, name: str, value: torch.Tensor) -> None:
    """Write ``value`` as entry ``name`` of an offload hook's ``weights_map``.

    Args:
        weights_map: the hook's map (a ``PrefixedDataset`` over an ``OffloadedWeightsLoader`` or a
            state dict, or a state dict).
        name: the tensor's name relative to the hooked module.
        value: the new value (any device).
    Raises:
        LosaError: a map of another kind, or a disk entry without an offload folder to write to.
    """
    key, base = name, weights_map
    while isinstance(base, PrefixedDataset):
        key, base = base.prefix + key, base.dataset
    value = value.detach()
    if isinstance(base, OffloadedWeightsLoader):
        if key in base.state_dict:  # offloaded to the CPU
            base.state_dict[key] = value.to(base.state_dict[key].device)
            return
        if base.save_folder is None:
            raise LosaError(f"cannot write the changed {key} back to disk: its offload map has no folder; "
                            "load the model with offload_folder=...")
        # a .dat file in the offload folder; the index entry (it may have pointed at the checkpoint's
        # safetensors file) now names its dtype and shape, so later loads read this value
        offload_weight(value, key, base.save_folder, index=base.index)
        save_offload_index({key: base.index[key]}, base.save_folder)
    elif isinstance(base, MutableMapping):
        old = base.get(key)
        base[key] = value.to(old.device if isinstance(old, torch.Tensor) else "cpu")
    else:
        raise LosaError(f"cannot write the changed {key} back into an offload map of type "
                        f"{type(base).__name__}")


@contextlib.contextmanager
def onloaded(block: nn.Module) -> Iterator[None]:
    """Onload every offloaded tensor of ``block`` for the duration of the context, keeping changes.

    Inside, the hooked submodules hold real tensors on their execution device and a forward does not
    reload them (the hooks still move inputs). On exit (also on error) each tensor replaced or changed
    in place (its version counter moved; writes through ``.data`` bypass it and are not detected) is
    written back into its hook's ``weights_map``; then accelerate puts the parameters back on meta and
    the freed memory is returned to the OS.
    A block without offloaded weights passes through unchanged.

    Args:
        block: a module of a model dispatched by accelerate (e.g. one decoder layer).
    Yields:
        None.
    Raises:
        LosaError: a changed tensor cannot be written back (see :func:`_store`).
    """
    hooked = [m for m in block.modules() if has_offloaded_params(m)]
    if not hooked:
        yield
        return
    with contextlib.ExitStack() as stack:
        for m in hooked:
            stack.enter_context(align_module_device(m))
        seen: list[dict[str, tuple[torch.Tensor, int]]] = []
        for m in hooked:
            seen.append({n: (t, t._version) for n, t in _tensors(m, m._hf_hook).items()})
            m._hf_hook.offload = False  # a forward in the block must not reload the stored values
        try:
            yield
        finally:
            for m in hooked:
                m._hf_hook.offload = True  # so that align_module_device's exit offloads again
            for m, before in zip(hooked, seen):
                for n, t in _tensors(m, m._hf_hook).items():
                    old, version = before.get(n, (None, -1))
                    if t is not old or t._version != version:
                        _store(m._hf_hook.weights_map, n, t)
                before.clear()
    release_free_memory()  # the onloaded copies are freed: keep resident memory at one block
