"""The single owner of calibration hooks: registers forward hooks that feed linear inputs to
statistics, and always removes them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

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
