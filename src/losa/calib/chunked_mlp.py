"""Lower peak memory for single-pass calibration: a gated MLP run in token chunks.

A gated MLP computes ``down(act(gate(x)) * up(x))``. Over a whole calibration batch (16 x 512 tokens)
its default forward holds ``act(gate(x))``, ``up(x)`` and their product at once: three
``tokens x intermediate`` tensors (the peak of a SparseGPT run, benchmarks/results/prune_sameday2.md). In single-pass mode
each projection must first see its *whole* input (its statistic, then pruning) before it computes, so
this forward primes ``gate``/``up`` with the full ``x``, fills the product chunk by chunk into one
buffer, primes ``down`` with that buffer and then runs ``down``: one ``tokens x intermediate`` tensor
plus chunk-sized temporaries. The arithmetic is the default forward's, row block by row block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from losa.calib.hooks import FirstInputs, patched_forward
from losa.utils.memory import release_free_memory

#: tokens per chunk of the gate/up projections
CHUNK_TOKENS = 1024


def _chunked_forward(mlp: nn.Module, names: tuple[str, str, str], seen: FirstInputs, chunk: int,
                     x: torch.Tensor) -> torch.Tensor:
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    # the attention's full-batch temporaries are free now but can stay resident in glibc's heap: hand them
    # back before the MLP's peak (part of the configuration in benchmarks/results/prune_sameday2.md)
    release_free_memory()
    seen.prime(names[0], gate, x)  # statistics of the whole input, then pruning, before any chunk runs
    seen.prime(names[1], up, x)  # the same tensor: shares gate's statistic
    flat = x.reshape(-1, x.shape[-1])
    inter: torch.Tensor | None = None
    for s in range(0, flat.shape[0], chunk):
        xc = flat[s:s + chunk]
        part = mlp.act_fn(gate(xc)).mul_(up(xc))
        if inter is None:
            inter = part.new_empty(flat.shape[0], part.shape[-1])
        inter[s:s + chunk] = part
        del part
    assert inter is not None
    inter = inter.view(*x.shape[:-1], inter.shape[-1])
    seen.prime(names[2], down, inter)
    return down(inter)


@contextlib.contextmanager
def chunked_gated_mlp(layer: nn.Module, path: str | None, linears: Mapping[str, nn.Module], seen: FirstInputs,
                      chunk: int | None = None) -> Iterator[bool]:
    """While active, ``layer.<path>`` (a gated MLP) runs in chunks of ``chunk`` tokens (default
    :data:`CHUNK_TOKENS`); yields whether it does.

    Nothing changes when ``path`` is None or the module there lacks ``gate_proj``/``up_proj``/``down_proj``/
    ``act_fn`` among the pruned linears.
    """
    mlp = layer.get_submodule(path) if path else None
    names = tuple(f"{path}.{n}" for n in ("gate_proj", "up_proj", "down_proj"))
    ok = (mlp is not None and hasattr(mlp, "act_fn") and all(n in linears for n in names)
          and all(linears[n] is getattr(mlp, n.rsplit(".", 1)[1]) for n in names))
    if not ok:
        yield False
        return
    size = CHUNK_TOKENS if chunk is None else chunk
    with patched_forward(mlp, lambda x: _chunked_forward(mlp, names, seen, size, x)):
        yield True
