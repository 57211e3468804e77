"""SparseGPT (Frantar & Alistarh, 2023): blockwise OBS pruning with lazy batched weight updates.

For each block of ``blocksize`` columns the mask is chosen by the OBS saliency w²/[H⁻¹]²_jj (for
unstructured targets, over the whole block; for N:M, per group of M columns). Columns are then pruned
one by one; each pruned weight's error is compensated in the remaining columns of the block through
the upper Cholesky factor of H⁻¹, and the accumulated block error is applied to all later columns in
one matmul (the lazy batch update).
"""

from __future__ import annotations

import math

import torch

from losa.calib.stats import HessianStat, InputStat
from losa.errors import LosaError
from losa.pruning.base import Pruner, PruneResult, register_pruner
from losa.pruning.masks import num_pruned
from losa.pruning.target import Target


def inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = percdamp·mean(diag H); also the dead-input mask."""
    H = hessian.clone().float()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    damp = percdamp * H.diagonal().mean()
    H.diagonal().add_(damp)
    for attempt in range(4):
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            break
        H.diagonal().add_(damp * 10**attempt)  # escalate dampening for ill-conditioned Hessians
    else:
        raise LosaError("SparseGPT: the calibration Hessian is not positive definite even with dampening; "
                        "use more calibration samples or raise --percdamp")
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True), dead


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, target: Target, blocksize: int = 128,
                    percdamp: float = 0.01) -> PruneResult:
    """Prune ``weight`` ``[out, in]`` to ``target`` given the input Hessian ``[in, in]``."""
    W = weight.detach().float().clone(memory_format=torch.contiguous_format)
    rows, cols = W.shape
    Hinv, dead = inverse_hessian_cholesky(hessian.to(W.device), percdamp)
    W[:, dead] = 0
    if target.is_nm:
        m = target.m
        n_prune = m - target.n  # type: ignore[operator]
        if cols % m:  # type: ignore[operator]
            raise LosaError(f"N:M {target.n}:{m} needs in_features divisible by {m}, got {cols}")
        blocksize = math.lcm(blocksize, m)  # type: ignore[arg-type]
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()
        prune1 = torch.zeros_like(W1, dtype=torch.bool)
        if not target.is_nm:
            k = num_pruned(W1.numel(), target.sparsity)
            if k:
                sal = (W1.square() / d.square().unsqueeze(0)).flatten()
                prune1.view(-1)[torch.topk(sal, k, largest=False).indices] = True
        for i in range(count):
            w = W1[:, i]
            if target.is_nm and i % m == 0:  # type: ignore[operator]
                sal = W1[:, i:i + m].square() / d[i:i + m].square().unsqueeze(0)
                idx = torch.topk(sal, n_prune, dim=1, largest=False).indices
                prune1[:, i:i + m].scatter_(1, idx, True)
            q = w.clone()
            q[prune1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~prune1
        if i2 < cols:
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W = W * keep
    if not torch.isfinite(W).all():
        raise LosaError("SparseGPT produced non-finite weights; raise --percdamp or check the calibration data")
    return PruneResult(W.to(weight.dtype), keep)


@register_pruner
class SparseGPTPruner(Pruner):
    name = "sparsegpt"
    stat = HessianStat

    def prune(self, weight: torch.Tensor, stat: InputStat | None, target: Target) -> PruneResult:
        if stat is None or not hasattr(stat, "hessian"):
            raise LosaError("sparsegpt needs calibration data; pass --calib (or use --method magnitude)")
        return sparsegpt_prune(
            weight, stat.hessian, target,
            blocksize=int(self.options.get("blocksize", 128)),
            percdamp=float(self.options.get("percdamp", 0.01)),
        )
