"""Layer-sequential calibration engine.

It captures the inputs of the first decoder layer, then for each decoder layer in turn:

1. moves the layer to the compute device (the rest of the model stays offloaded when it does not fit;
   a model dispatched by accelerate with offloaded weights has each layer onloaded, and its changed
   weights written back, by :func:`losa.models.offload.onloaded`),
2. runs it over all calibration samples with hooks that feed the statistics a visitor asks for,
3. hands everything to the visitor (which may prune or measure the layer),
4. recomputes the layer's outputs if the visitor modified it, and uses them as the next layer's inputs.

Single-pass mode: when a visitor sets ``single_pass = True`` (and implements ``visit_module``) and all
calibration samples form one batch, each linear module is handed to the visitor at its first call,
before it computes, with statistics of the inputs it really receives. One forward per layer then both
prunes the layer and produces its outputs ("true sequential" order within the layer), instead of a
statistics pass plus a second pass to propagate.

After the last decoder layer a visitor can ask for the model's logits with
:meth:`LayerwiseEngine.head_logits`: the model's own forward runs with the decoder layers replaced by
one that returns the propagated hidden states, so the final norm, LM head (and whatever a family does
after its layers, e.g. Gemma's logit soft-capping or OPT's ``project_out``) are the model's own code.

Memory is the model, one layer's work and the calibration activations. Pruning (Wanda, SparseGPT),
RMI Gram matrices, dense targets and reconstruction errors are all visitors of this one engine
(:mod:`losa.calib.visitor` declares the contract); every hook it needs comes from :mod:`losa.calib.hooks`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from losa.calib.chunked_mlp import chunked_gated_mlp
from losa.calib.hooks import InputsCaptured, StatsComplete, act_on_first_input, capture_inputs, collect_inputs
from losa.calib.visitor import LayerContext, LayerVisitor
from losa.errors import LosaError, option
from losa.models.linear import in_features
from losa.models.offload import execution_device, onloaded
from losa.models.registry import (
    ArchSpec,
    check_window,
    get_arch,
    get_decoder_layers,
    layer_output,
    linear_modules,
    replace_module,
)
from losa.utils.device import resolve_device
from losa.utils.memory import release_free_memory


class LayerwiseEngine:
    """Runs calibration samples through a causal LM one decoder layer at a time."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, device: str | torch.device | None = "auto",
                 batch_size: int = 1, offload: bool | None = None, progress: bool = True,
                 desc: str = "calibrating", stats_autocast: torch.dtype | None = None) -> None:
        if input_ids.ndim != 2 or input_ids.numel() == 0:
            raise LosaError("calibration input_ids must be a non-empty [nsamples, seqlen] tensor")
        check_window(model, input_ids.shape[1], "calibration window", option("seqlen"))
        self.model = model
        self.spec: ArchSpec = get_arch(model)
        self.layers = get_decoder_layers(model, self.spec)
        #: the execution device of a model dispatched by accelerate (its hooks place everything)
        self.dispatched = execution_device(model)
        self.device = self._dispatched_device(device) if self.dispatched is not None else resolve_device(device)
        self.input_ids = input_ids
        self.batch_size = max(1, int(batch_size))
        self.progress = progress
        self.desc = desc
        # hand-written layer moves only for a model accelerate does not manage
        self.offload = False if self.dispatched is not None else (
            self._decide_offload() if offload is None else offload)
        #: dtype for autocast in statistics-only passes (None: the model's dtype)
        self.stats_autocast = stats_autocast
        self._kwargs: list[dict[str, Any]] = []
        self._layer_returns_tuple = False  # what a decoder layer returns (older transformers: a tuple)

    # ------------------------------------------------------------------ devices
    def _dispatched_device(self, device: str | torch.device | None) -> torch.device:
        """The compute device of an accelerate-dispatched model; ``device`` must be ``auto`` or the same."""
        dev = self.dispatched
        assert dev is not None
        if device is None or str(device) == "auto":
            return dev
        want = torch.device(device)
        if want.type != dev.type or (want.index is not None and want.index != (dev.index or 0)):
            raise LosaError(f"the model is dispatched by accelerate to compute on {dev}, not {want}; "
                            "use device auto or reload it with another device_map")
        return dev

    def _decide_offload(self) -> bool:
        if self.device.type != "cuda":
            return False
        need = sum(p.numel() * p.element_size() for p in self.model.parameters())
        free, _ = torch.cuda.mem_get_info(self.device)
        return need > 0.7 * free

    @contextlib.contextmanager
    def _placement(self) -> Iterator[None]:
        """Everything except the decoder layers on the device; layers come over one at a time when
        offloading, otherwise the whole model is moved. The original placement is restored after.
        A model dispatched by accelerate stays where it is (its hooks onload and move inputs)."""
        orig = next(self.model.parameters()).device
        if self.dispatched is not None or self.device == orig:
            yield
            return
        if self.offload:
            layers = replace_module(self.model, self.spec.layers_path, nn.ModuleList())
            try:
                self.model.to(self.device)
            finally:
                replace_module(self.model, self.spec.layers_path, layers)
        else:
            self.model.to(self.device)
        try:
            yield
        finally:
            self.model.to(orig)

    # ------------------------------------------------------------------ capture
    def capture(self) -> list[torch.Tensor]:
        """Inputs (and keyword arguments) of the first decoder layer for every calibration batch."""
        captured: list[torch.Tensor] = []
        self._kwargs = []

        def sink(hidden: torch.Tensor, kw: dict[str, Any]) -> None:
            captured.append(hidden)
            self._kwargs.append(kw)

        with capture_inputs(self.layers[0], sink):
            for start in range(0, len(self.input_ids), self.batch_size):
                batch = self.input_ids[start:start + self.batch_size].to(self.device)
                with contextlib.suppress(InputsCaptured):
                    self.model(input_ids=batch, use_cache=False)
        if len(captured) != -(-len(self.input_ids) // self.batch_size):
            raise LosaError(f"could not capture the inputs of the first decoder layer of {type(self.model).__name__}")
        return captured

    def forward_layer(self, layer: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for x, kw in zip(inputs, self._kwargs):
            y = layer(x, **kw)
            self._layer_returns_tuple = isinstance(y, tuple | list)
            out.append(layer_output(y).detach())
        return out

    def head_logits(self, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits for calibration batch ``batch`` given its last decoder layer's outputs.

        Call it from a visitor's :meth:`~losa.calib.visitor.LayerVisitor.visit` of the last decoder
        layer (inside :meth:`run`, where everything but the decoder layers is on the compute device).
        The model's own forward runs with its decoder layers swapped for one module that returns
        ``hidden``, so everything after the layers is the model's code; the embeddings are recomputed
        (cheap) and ignored.

        Args:
            batch: index of the calibration batch (``input_ids[batch * batch_size:][:batch_size]``).
            hidden: that batch's last decoder-layer outputs, ``[b, seq, hidden]``.
        Returns:
            ``[b, seq, vocab]`` logits in the model's dtype.
        Raises:
            LosaError: ``batch`` out of range or ``hidden`` of another shape than the batch's windows.
        """
        ids = self.input_ids[batch * self.batch_size:(batch + 1) * self.batch_size]
        if batch < 0 or len(ids) == 0 or tuple(hidden.shape[:2]) != tuple(ids.shape):
            raise LosaError(f"head_logits: batch {batch} and hidden states {list(hidden.shape)} do not match the "
                            f"calibration windows {list(self.input_ids.shape)} in batches of {self.batch_size}; "
                            "pass the last layer's outputs of that batch")
        replay = nn.ModuleList([_Replay(hidden, self._layer_returns_tuple)])
        layers = replace_module(self.model, self.spec.layers_path, replay)
        try:
            return self.model(input_ids=ids.to(self.device), use_cache=False).logits
        finally:
            replace_module(self.model, self.spec.layers_path, layers)

    # ------------------------------------------------------------------ main loop
    @torch.no_grad()
    def run(self, visitor: LayerVisitor, layer_indices: Sequence[int] | None = None) -> None:
        """Visit every decoder layer in order (or only up to the last of ``layer_indices``)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self._placement():
                hidden = self.capture()
                indices = range(len(self.layers)) if layer_indices is None else sorted(set(layer_indices))
                last = max(indices) if len(indices) else -1
                wanted = set(indices)
                bar = tqdm(range(last + 1), desc=self.desc, unit="layer", disable=not self.progress)
                for i in bar:
                    layer = self.layers[i]
                    if self.offload:
                        layer.to(self.device)
                    try:
                        with onloaded(layer):  # accelerate-offloaded weights: onloaded, changes written back
                            if i in wanted:
                                hidden = self._visit_layer(i, layer, hidden, visitor)
                            else:
                                hidden = self.forward_layer(layer, hidden)
                    finally:
                        if self.offload:
                            layer.to("cpu")
                        release_free_memory()  # the layer's activations are freed: keep RSS at live memory
        finally:
            self.model.train(was_training)

    def _visit_layer(self, i: int, layer: nn.Module, hidden: list[torch.Tensor],
                     visitor: LayerVisitor) -> list[torch.Tensor]:
        linears = linear_modules(layer, self.spec)
        visitor.before_layer(i, linears)
        stats = dict(visitor.stats_for(i, linears))
        for name, st in stats.items():
            if st.in_features != in_features(linears[name]):
                raise LosaError(f"layer {i} {name}: statistic shape does not match the module")
        ctx = LayerContext(i, layer, linears, stats, hidden, [], self)
        if self.single_pass_for(visitor):
            with act_on_first_input(linears, stats, lambda n, m, st: visitor.visit_module(i, n, m, st)) as seen, \
                    chunked_gated_mlp(layer, self.spec.gated_mlp, linears, seen) as chunked:
                ctx.outputs = self.forward_layer(layer, hidden)
            ctx.single_pass, ctx.seen, ctx.chunked_mlp = True, frozenset(seen), chunked
        elif stats and not visitor.needs_outputs:
            # statistics only: each forward stops once every linear has seen its input (the layer's
            # last projection, e.g. down_proj, is skipped); the outputs come from the pass after the visit
            cast = torch.autocast(self.device.type, dtype=self.stats_autocast, enabled=self.stats_autocast is not None)
            with collect_inputs(linears, stats, stop_early=True) as reset, cast:
                for x, kw in zip(hidden, self._kwargs):
                    reset()
                    with contextlib.suppress(StatsComplete):
                        layer(x, **kw)
            ctx.outputs_skipped = True
        else:
            with collect_inputs(linears, stats):
                ctx.outputs = self.forward_layer(layer, hidden)
        visitor.visit(ctx)
        return ctx.forward() if ctx.modified or ctx.outputs_skipped else ctx.outputs

    def single_pass_for(self, visitor: LayerVisitor) -> bool:
        """Whether ``visitor`` runs in single-pass mode: it asks for it and all samples are one batch."""
        return visitor.single_pass and self.batch_size >= len(self.input_ids)


class _Replay(nn.Module):
    """Stands in for the decoder layers in :meth:`LayerwiseEngine.head_logits`: returns the given hidden
    states whatever it is called with (as a 1-tuple when the real layers return tuples)."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool) -> None:
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.hidden,) if self.as_tuple else self.hidden
