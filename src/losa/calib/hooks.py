"""The single owner of calibration hooks: registers forward hooks that feed linear inputs to
statistics (and, in the single-pass mode, act on each module before it runs), and always removes them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

from torch import nn

from losa.calib.stats import InputStat


@contextlib.contextmanager
def collect_inputs(modules: Mapping[str, nn.Module], stats: Mapping[str, InputStat]) -> Iterator[None]:
    """While active, every forward of ``modules[name]`` feeds its input to ``stats[name]``."""
    handles = []
    try:
        for name, stat in stats.items():
            def hook(_mod: nn.Module, args: tuple, _out: object, stat: InputStat = stat) -> None:
                stat.update(args[0].detach())

            handles.append(modules[name].register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def act_on_first_input(modules: Mapping[str, nn.Module], stats: dict[str, InputStat],
                       action: Callable[[str, nn.Module, InputStat], None]) -> Iterator[set[str]]:
    """While active, the first call of ``modules[name]`` feeds its input to ``stats[name]`` and then runs
    ``action(name, module, stat)`` *before* the module computes, so the module already runs as the action
    left it (e.g. pruned). Modules that receive the very same input tensor as the previous one (q/k/v,
    gate/up) share one statistic: ``stats[name]`` is replaced by it. Yields the names that were seen."""
    seen: set[str] = set()
    last: dict[str, object] = {}
    handles = []

    def make(name: str) -> Callable[[nn.Module, tuple], None]:
        def pre_hook(mod: nn.Module, args: tuple) -> None:
            if name in seen:
                return
            seen.add(name)
            x, stat = args[0], stats[name]
            prev = last.get("stat")
            if last.get("x") is x and type(prev) is type(stat) and prev.in_features == stat.in_features:  # type: ignore[union-attr]
                stats[name] = stat = prev  # type: ignore[assignment]
            else:
                stat.update(x.detach())
            last.update(x=x, stat=stat)
            action(name, mod, stat)

        return pre_hook

    try:
        for name in stats:
            handles.append(modules[name].register_forward_pre_hook(make(name)))
        yield seen
    finally:
        for h in handles:
            h.remove()
        last.clear()
