"""ATP layer-wise sparsity for one-shot pruning: β from a grid search on the calibration loss.

ATP (Huang et al., ICML 2025) sets ``s_l = S − β(L−1)/2 + β(l−1)`` (:func:`losa.allocation.allocators.atp`)
and picks β by the loss of the pruned model. Here every β of the grid prunes the model with the
configured pruner on the calibration windows, the mean next-token NLL on those same calibration windows
is measured, and the weights are restored; the β with the lowest loss wins. No evaluation text is
ever used. Cost: one prune and one forward over the calibration windows per grid point.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from losa.allocation.allocators import allocate_live, atp_beta_max, atp_grid, live_layers
from losa.eval.ppl import perplexity_from_ids
from losa.models.linear import get_weight, set_weight
from losa.models.registry import get_arch, get_decoder_layers, layer_sizes, linear_modules, pruned_weights

if TYPE_CHECKING:  # pragma: no cover
    from losa.pipelines.oneshot import PruneConfig


def calibration_loss(model: nn.Module, calib_ids: torch.Tensor) -> float:
    """Mean next-token NLL (nats) of ``model`` over the calibration windows ``[n, seqlen]``."""
    return perplexity_from_ids(model, calib_ids.reshape(-1), seqlen=calib_ids.shape[1], progress=False).nll


def atp_sparsities(model: nn.Module, tokenizer, config: PruneConfig, calib_ids: torch.Tensor,
                   progress: bool = True) -> tuple[list[float], dict[str, Any]]:
    """Per-layer ATP sparsities for ``config.sparsity``; β from ``config.atp_beta`` or the grid search.

    Args:
        model: the dense model (left unchanged: every trial prune is undone).
        tokenizer: its tokenizer.
        config: the recipe (``allocator="atp"``, a single float ``sparsity``).
        calib_ids: calibration windows ``[n, seqlen]``, for pruning statistics and the loss.
        progress: a progress bar over the grid.
    Returns:
        ``([L] sparsities, {"method": "atp", "beta": β, "grid": {β: calibration NLL}})``.
    Raises:
        LosaError: an invalid β or target (from the allocator or the pruner).
    """
    from losa.pipelines.oneshot import UNUSED_LAYER_TARGETS, prune

    target = float(config.sparsity)  # type: ignore[arg-type]
    sizes = layer_sizes(model, config.ignore)
    info: dict[str, Any] = {"method": "atp"}
    if config.atp_beta is not None:
        beta = float(config.atp_beta)
    else:
        spec = get_arch(model)
        mods = [m for layer in get_decoder_layers(model, spec) for m in linear_modules(layer, spec).values()]
        saved = [get_weight(m).detach().to("cpu", copy=True) for m in mods]
        live = [sizes[i] for i in live_layers(sizes)]
        # the grid's top β leaves the deepest layer one weight in K for the narrowest pruned linear (K inputs: one
        # per row for the per-row pruners); the allocator's own bound (just below 1) would zero whole layers once
        # the pruner rounds to whole weights
        k_min = min(w.shape[-1] for _, _, w in pruned_weights(model, config.ignore))
        top = atp_beta_max(target, live, s_max=1.0 - 1.0 / k_min)
        losses: dict[float, float] = {}
        try:
            for beta in tqdm(atp_grid(target, live, config.atp_grid_points, beta_max=top), desc="ATP grid search",
                             unit="beta", disable=not progress):
                trial = config.model_copy(update={"allocator": "uniform", "verify": False, "sparsity": [
                    float(x) for x in allocate_live("atp", target, sizes, beta=beta)]})
                with warnings.catch_warnings():  # the trial's list is ATP's own: a dense layer's entry is expected
                    warnings.filterwarnings("ignore", message=UNUSED_LAYER_TARGETS)
                    prune(model, tokenizer, trial, calib_ids=calib_ids, progress=False)
                losses[beta] = calibration_loss(model, calib_ids)
                for m, w in zip(mods, saved):
                    set_weight(m, w)
        finally:
            for m, w in zip(mods, saved):
                set_weight(m, w)
        beta = min(losses, key=losses.__getitem__)
        info["grid"] = {f"{b:.6g}": v for b, v in losses.items()}
    info["beta"] = beta
    return [float(x) for x in allocate_live("atp", target, sizes, beta=beta)], info
