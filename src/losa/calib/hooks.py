"""The single owner of every hook and forward patch that losa puts on a model.

Each is a context manager that registers on entry and always removes on exit (also when the body
raises): statistics of linear inputs (:func:`collect_inputs`), act-on-first-call for the single-pass
mode (:func:`act_on_first_input`), the capture of the first decoder layer's inputs
(:func:`capture_inputs`) and a temporary ``forward`` replacement (:func:`patched_forward`, used by the
chunked gated MLP). No other module of losa registers a hook or assigns ``forward``; a test checks
that none is left behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import nn

from losa.pruning.stats import InputStat


class StatsComplete(Exception):
    """Raised by :func:`collect_inputs` with ``stop_early=True`` once every module has fed its statistic
    in the current forward: the rest of that forward is not needed (its outputs are discarded)."""


@contextlib.contextmanager
def collect_inputs(modules: Mapping[str, nn.Module], stats: Mapping[str, InputStat],
                   stop_early: bool = False) -> Iterator[Callable[[], None]]:
    """While active, every forward of ``modules[name]`` feeds its input to ``stats[name]`` (before the
    module computes). With ``stop_early``, the call that completes the set raises :class:`StatsComplete`,
    which skips e.g. the last projection of a decoder layer when only statistics are wanted; the caller
    catches it and calls the yielded ``reset`` before each forward."""
    handles = []
    seen: set[str] = set()

    def make(name: str, stat: InputStat) -> Callable[[nn.Module, tuple], None]:
        def pre_hook(_mod: nn.Module, args: tuple) -> None:
            stat.update(args[0].detach())
            if stop_early:
                seen.add(name)
                if len(seen) == len(stats):
                    seen.clear()
                    raise StatsComplete

        return pre_hook

    try:
        for name, stat in stats.items():
            handles.append(modules[name].register_forward_pre_hook(make(name, stat)))
        yield seen.clear
    finally:
        for h in handles:
            h.remove()


class FirstInputs(set):
    """The names of the modules seen so far by :func:`act_on_first_input`; :meth:`prime` runs a module's
    first-input step on a given input without calling the module (for forwards that then call it in chunks)."""

    def __init__(self, first: Callable[[str, nn.Module, object], None]) -> None:
        super().__init__()
        self._first = first

    def prime(self, name: str, module: nn.Module, x) -> None:
        if name not in self and self._first is not None:
            self._first(name, module, x)

    def close(self) -> None:
        """Drop the step (it refers back to this set: without this the cycle keeps the statistics alive
        until the garbage collector runs)."""
        self._first = None  # type: ignore[assignment]


@contextlib.contextmanager
def act_on_first_input(modules: Mapping[str, nn.Module], stats: dict[str, InputStat],
                       action: Callable[[str, nn.Module, InputStat], None]) -> Iterator[FirstInputs]:
    """While active, the first call of ``modules[name]`` feeds its input to ``stats[name]`` and then runs
    ``action(name, module, stat)`` *before* the module computes, so the module already runs as the action
    left it (e.g. pruned). Modules that receive the very same input tensor as the previous one (q/k/v,
    gate/up) share one statistic: ``stats[name]`` is replaced by it. Yields the names that were seen
    (a :class:`FirstInputs`)."""
    last: dict[str, object] = {}
    handles = []

    def first(name: str, mod: nn.Module, x) -> None:
        if name not in stats:  # a module without a statistic (left dense), primed by a chunked forward
            return
        seen.add(name)
        stat = stats[name]
        prev = last.get("stat")
        if last.get("x") is x and type(prev) is type(stat) and prev.in_features == stat.in_features:  # type: ignore[union-attr]
            stats[name] = stat = prev  # type: ignore[assignment]
        else:
            stat.update(x.detach())
        last.update(x=x, stat=stat)
        action(name, mod, stat)

    seen = FirstInputs(first)

    def make(name: str) -> Callable[[nn.Module, tuple], None]:
        def pre_hook(mod: nn.Module, args: tuple) -> None:
            if name not in seen:
                first(name, mod, args[0])

        return pre_hook

    try:
        for name in stats:
            handles.append(modules[name].register_forward_pre_hook(make(name)))
        yield seen
    finally:
        for h in handles:
            h.remove()
        last.clear()
        seen.close()


class InputsCaptured(Exception):
    """Raised by the :func:`capture_inputs` hook to stop the model's forward once the inputs are taken."""


#: keyword arguments of a decoder layer that must not be replayed from a capture (caches)
_CACHE_KWARGS = ("hidden_states", "past_key_values", "past_key_value", "layer_past")


@contextlib.contextmanager
def capture_inputs(layer: nn.Module, sink: Callable[[Any, dict[str, Any]], None]) -> Iterator[None]:
    """While active, a call of ``layer`` hands ``(hidden_states, kwargs)`` to ``sink`` and raises
    :class:`InputsCaptured` (the rest of the model's forward is not needed). Cache arguments are
    dropped from ``kwargs`` and ``use_cache=False`` is set, so the layer can be replayed with them."""

    def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        kw = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
        kw["use_cache"] = False
        sink(hidden.detach(), kw)
        raise InputsCaptured

    handle = layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def patched_forward(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """While active, ``module`` computes with ``forward`` instead of its class's ``forward``; the instance
    attribute is deleted on exit, so the class's method is back (also when the body raises)."""
    module.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.forward
