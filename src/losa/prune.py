"""The one-call pruning API: ``losa.prune(model, tokenizer, PruneConfig(...))``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from losa.calib.engine import LayerContext, LayerwiseEngine
from losa.calib.stats import InputStat
from losa.config import PruneConfig, build_config, parse_nm
from losa.data.calibration import get_calibration
from losa.models.linear import get_weight, in_features, set_weight
from losa.models.registry import get_arch, get_decoder_layers, linear_modules
from losa.pruning.base import Pruner, get_pruner
from losa.pruning.target import Target
from losa.utils.device import activation_budget, resolve_device
from losa.verify import sparsity_report, verify_targets


@dataclass
class PruneVisitor:
    """Prunes every linear module of each visited layer to that layer's target."""

    pruner: Pruner
    targets: list[Target]
    keep_masks: bool = False
    masks: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    #: prune each module at its first call in one forward per layer (see :mod:`losa.calib.engine`)
    single_pass: bool = False
    #: ``ctx.outputs`` is not read (the layer is recomputed after pruning), so statistics passes stop early
    needs_outputs: bool = False

    def stats_for(self, index: int, linears: dict[str, nn.Module]) -> dict[str, InputStat]:
        if self.pruner.stat is None:
            return {}
        return {name: self.pruner.stat(in_features(mod), device=mod.weight.device) for name, mod in linears.items()}

    def visit(self, ctx: LayerContext) -> None:
        seen = ctx.extra.get("seen", set())
        for name, mod in ctx.linears.items():
            if name not in seen:  # in single-pass mode: modules the forward never called (e.g. idle experts)
                self.prune_module(ctx.index, name, mod, ctx.stats.get(name))
        ctx.modified = not ctx.extra.get("single_pass", False)

    def visit_module(self, index: int, name: str, mod: nn.Module, stat: InputStat) -> None:
        self.prune_module(index, name, mod, stat)

    def prune_module(self, index: int, name: str, mod: nn.Module, stat: InputStat | None) -> None:
        res = self.pruner.prune(get_weight(mod).detach(), stat, self.targets[index])
        set_weight(mod, res.weight)
        if self.keep_masks:
            self.masks[(index, name)] = res.mask.cpu()


def _use_single_pass(config: PruneConfig, pruner: Pruner, model: nn.Module, layers: nn.ModuleList,
                     calib_ids: torch.Tensor) -> bool:
    """``sequential: module`` always, ``layer`` never; ``auto``: when the pruner prefers it
    (:attr:`Pruner.single_pass_default`) and one batch of all samples fits memory."""
    if config.sequential != "auto":
        return config.sequential == "module"
    if not pruner.single_pass_default or config.stats_precision != "model":
        return False
    if config.calib_batch_size is not None and config.calib_batch_size < len(calib_ids):
        return False
    widths = [max(get_weight(m).shape) for m in linear_modules(layers[0], get_arch(model)).values()]
    itemsize = next(model.parameters()).element_size()
    # the widest activation, a few of them alive at once, plus the kept layer inputs and outputs
    need = calib_ids.numel() * (6 * max(widths, default=1) + 2 * model.config.hidden_size) * max(itemsize, 4)
    return need <= activation_budget(resolve_device(config.device))


def _nm_for_report(targets: list[Target]) -> list[tuple[int, int] | None]:
    return [(t.n, t.m) if t.is_nm else None for t in targets]  # type: ignore[misc]


def prune(model: nn.Module, tokenizer=None, config: PruneConfig | dict | None = None,
          calib_ids: torch.Tensor | None = None, progress: bool = True, visitor: PruneVisitor | None = None) -> dict:
    """Prune ``model`` in place and verify it; returns a report (recipe, sparsity, timings).

    ``calib_ids`` (``[n, seqlen]``) overrides the calibration source of the config.
    """
    if config is None:
        config = PruneConfig()
    elif isinstance(config, dict):
        config = build_config(PruneConfig, config)
    t0 = time.perf_counter()
    spec = get_arch(model)
    layers = get_decoder_layers(model, spec)
    targets = config.layer_targets(len(layers))
    pruner = get_pruner(config.method, blocksize=config.blocksize, percdamp=config.percdamp)
    visitor = visitor or PruneVisitor(pruner, targets)
    timings: dict[str, float] = {}
    sequential = "none"  # data-free pruners need no calibration pass
    if pruner.stat is None:  # data-free: no calibration pass needed
        for i, layer in enumerate(tqdm(layers, desc=f"pruning ({config.method})", unit="layer", disable=not progress)):
            for name, mod in linear_modules(layer, spec).items():
                visitor.prune_module(i, name, mod, None)
    else:
        if calib_ids is None:
            t = time.perf_counter()
            calib_ids = get_calibration(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed,
                                        config.data_dir, model=model, progress=progress)
            timings["calibration_data_s"] = time.perf_counter() - t
        single = _use_single_pass(config, pruner, model, layers, calib_ids)
        visitor.single_pass = single
        if single:
            batch = len(calib_ids)
        else:
            batch = config.calib_batch(calib_ids.shape[1])
        engine = LayerwiseEngine(model, calib_ids, device=config.device, batch_size=batch,
                                 offload=config.offload, progress=progress, desc=f"pruning ({config.method})",
                                 stats_autocast=config.stats_autocast())
        t = time.perf_counter()
        engine.run(visitor)
        timings["prune_s"] = time.perf_counter() - t
        sequential = "module" if single else "layer"
    report = sparsity_report(model, _nm_for_report(targets))
    if config.verify:
        verify_targets(report, targets)
    timings["total_s"] = time.perf_counter() - t0
    return {
        "recipe": config.model_dump(),
        "targets": [t.sparsity for t in targets],
        "nm": config.nm and list(parse_nm(config.nm)),
        "sparsity": report,
        "sequential": sequential,
        "timings": timings,
    }
