"""Unfuse a model's fused experts for pruning, and fuse them back.

:func:`unfused_experts` swaps, in every decoder layer, the family's fused experts module
(``ArchSpec.experts``) for an equivalent :class:`~losa.models.experts.UnfusedExperts` whose experts are
plain ``nn.Linear`` (``mlp.experts.3.gate_proj`` ...). Everything that works on linear modules then
handles the experts unchanged: :func:`~losa.models.registry.linear_modules` lists them, the calibration
engine's input hooks see exactly the tokens routed to each expert, adapters wrap them. On exit every
expert weight is written back into the fused 3-D parameters and the original modules return, so the
model saves and loads as a normal Hugging Face checkpoint.

The pipelines (``losa.prune``, ``losa.run``) call it; the swap is a module replacement, not a hook.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from losa.errors import LosaError
from losa.models.experts import UnfusedExperts, is_fused_experts
from losa.models.registry import get_arch, get_decoder_layers, replace_module

log = logging.getLogger(__name__)


@dataclass
class FusedExperts:
    """The fused experts modules taken out of a model by :func:`unfuse_experts`, to put back with :meth:`refuse`.

    Attributes:
        model: the model.
        swapped: full module path -> the original fused module (now replaced by an :class:`UnfusedExperts`).
    """

    model: nn.Module
    swapped: dict[str, nn.Module] = field(default_factory=dict)

    def refuse(self) -> None:
        """Write each expert's weights into its fused parameters and put the fused modules back.

        Raises:
            LosaError: an expert projection is still wrapped (e.g. by an adapter that was not merged).
        """
        for path, fused in list(self.swapped.items()):
            unfused = self.model.get_submodule(path)
            try:
                unfused.fold_into(fused)
            except TypeError as exc:
                raise LosaError(f"cannot fuse the experts at {path} back ({exc}); merge the adapters first "
                                "(losa.lora.merge_and_unload)") from None
            replace_module(self.model, path, fused)
            del self.swapped[path]


def unfuse_experts(model: nn.Module) -> FusedExperts:
    """Replace every fused experts module of ``model`` by an :class:`UnfusedExperts`, in place.

    The expert linears view the fused storage (no copy). Already unfused modules and layers without
    experts are left alone; a dense family is a no-op. Keep the result to :meth:`FusedExperts.refuse`
    (an inference model may simply stay unfused).

    Args:
        model: a causal LM of a registered family.
    Returns:
        the handle holding the original modules.
    Raises:
        LosaError: the family is not registered, or its experts cannot be pruned (from ``get_arch``).
    """
    spec = get_arch(model)
    handle = FusedExperts(model)
    if spec.experts is None:
        return handle
    prefix = {id(layer): name for name, layer in model.named_modules()}
    for layer in get_decoder_layers(model, spec):
        try:
            mod = layer.get_submodule(spec.experts)
        except AttributeError:  # a dense layer of a MoE family
            continue
        if not is_fused_experts(mod):
            continue
        path = f"{prefix[id(layer)]}.{spec.experts}"
        replace_module(model, path, UnfusedExperts.from_fused(mod))
        handle.swapped[path] = mod
    return handle


@contextlib.contextmanager
def unfused_experts(model: nn.Module) -> Iterator[FusedExperts]:
    """While active, ``model``'s fused experts are unfused (:func:`unfuse_experts`); on exit they are fused
    back (also when the body raises; then a failure to fuse back is logged, not raised over the original error).

    Args:
        model: a causal LM of a registered family.
    Yields:
        the :class:`FusedExperts` handle.
    Raises:
        LosaError: from :func:`unfuse_experts`, or an expert still wrapped by an adapter at exit.
    """
    handle = unfuse_experts(model)
    try:
        yield handle
    except BaseException:
        try:
            handle.refuse()
        except LosaError as exc:
            log.warning("experts left unfused after an error: %s", exc)
        raise
    handle.refuse()
