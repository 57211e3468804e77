"""Whole decode steps of several decode engines of one model, alternating: the A/B of a change that shows only
end to end (the same model, engines built under different settings, timed in the same minutes)."""

from __future__ import annotations

import time
from typing import Any

import torch


def alternate_steps(engines: dict[Any, Any], reps: int, tokens: int,
                    start: int = 0) -> tuple[dict[Any, float], dict[Any, Any]]:
    """Time ``tokens`` decode steps of each engine per round, the engines one after another (every other round
    in reverse order), ``reps + 1`` rounds (the first warms up; its times count too: best of all).

    Args:
        engines: name -> :class:`~losa.inference.engine.DecodeEngine`, each with a cache of at least
            ``start + tokens`` positions (steps feed token ``100 + pos`` at positions ``start .. start + tokens - 1``).
        reps: timed rounds after the first.
        tokens: decode steps per engine and round.
        start: the first step's position: each step attends to every cached position before it (those below
            ``start`` hold what the cache held, zeros in a new engine: the same reads as a real context).

    Returns:
        ``(best, logits)``: per engine the best seconds per step, and the float32 logits ``[V]`` of its last step
        (for a check that the engines compute the same thing).
    """
    best = dict.fromkeys(engines, float("inf"))
    logits: dict[Any, torch.Tensor] = {}
    names = list(engines)
    for rep in range(reps + 1):
        for name in names if rep % 2 == 0 else names[::-1]:
            eng = engines[name]._eng
            t = time.perf_counter()
            for pos in range(start, start + tokens):
                out = eng.step(100 + pos, pos)
            best[name] = min(best[name], (time.perf_counter() - t) / tokens)
            logits[name] = out
    return best, logits
