"""SparseGPT (Frantar & Alistarh, 2023): blockwise OBS pruning with lazy batched weight updates.

For each block of ``blocksize`` columns the mask is chosen by the OBS saliency w²/[H⁻¹]²_jj (for
unstructured targets, over the whole block; for N:M, per group of M columns). Columns are then pruned
one by one; each pruned weight's error is compensated in the remaining columns of the block through
the upper Cholesky factor of H⁻¹, and the accumulated block error is applied to all later columns in
one matmul (the lazy batch update).

The column loop inside a block is independent per row, so on CPU it runs in a small compiled kernel
(``csrc/obs_block.cpp``, built on first use) that walks each row through the whole block; without a
compiler the same loop runs column by column in torch (identical results up to float rounding).
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch
from pydantic import Field

from losa.errors import LosaError, option
from losa.pruning.base import Pruner, PruneResult, PrunerOptions, register_pruner
from losa.pruning.masks import num_pruned, smallest_per_row
from losa.pruning.stats import HessianStat, InputStat
from losa.pruning.target import Target
from losa.utils.cpp import KernelUnavailable, build_extension

_SRC = Path(__file__).parent / "csrc" / "obs_block.cpp"
#: the dampening option as errors name it (a config's ``options``, the command line's ``--percdamp``)
PERCDAMP = option("options['percdamp']", "--percdamp")


@lru_cache(maxsize=1)
def obs_kernel() -> ModuleType | None:
    """The compiled block kernel, or ``None`` (one warning) where it cannot be built."""
    try:
        return build_extension("losa_obs_kernel", _SRC)
    except KernelUnavailable as exc:
        warnings.warn(f"losa SparseGPT kernel unavailable ({exc}); using the slower torch column loop "
                      "(same results). Install a C++ compiler and ninja to enable it.", RuntimeWarning, stacklevel=2)
        return None


def inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float, overwrite: bool = False,
                             label: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of (H + λI)⁻¹ = UᵀU with λ = percdamp·mean(diag H); also the dead-input mask.

    Computed from one Cholesky factorisation of the index-reversed matrix: if PHP = L'L'ᵀ (P reverses the
    order), then U = P·L'⁻¹·P is upper triangular and UᵀU = H⁻¹. ``overwrite=True`` lets it reuse
    ``hessian``'s memory (a float32 temporary the caller no longer needs); at most three matrices of its
    size are alive at once. Inputs that were always zero (``diag H = 0``) get a unit diagonal.

    When the factorisation fails (H + λI numerically not positive definite, e.g. from rank-deficient
    calibration inputs) λ is raised to 2λ, 12λ, 112λ and 1112λ in turn, and a warning names the module
    and the dampening that was finally used: the pruned weights then differ from the requested
    ``percdamp``'s.

    Args:
        hessian: ``[in, in]`` input Hessian (``2·XᵀX / n`` or any positive semi-definite matrix).
        percdamp: λ as a fraction of ``mean(diag H)``.
        overwrite: reuse ``hessian``'s memory (it is clobbered).
        label: the module the Hessian belongs to, named in the warning (e.g. ``layer 3 self_attn.q_proj``).
    Returns:
        ``(U, dead)``: U ``[in, in]`` float32 upper triangular, and the boolean mask of dead inputs.
    Raises:
        LosaError: not positive definite even at the highest dampening.
    """
    H = hessian.float() if overwrite else hessian.clone().float()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    mean_diag = H.diagonal().mean()
    damp = percdamp * mean_diag
    H.diagonal().add_(damp)
    Hr = H.flip(0, 1)
    del H, hessian
    added = 0.0  # dampening added beyond λ, as a multiple of λ
    steps = (1, 10, 100, 1000)
    for attempt in range(len(steps) + 1):
        L, info = torch.linalg.cholesky_ex(Hr)
        if int(info) == 0:
            break
        if attempt == len(steps):
            raise LosaError(f"SparseGPT{_where(label)}: the calibration Hessian is not positive definite even with "
                            f"dampening {percdamp * (1 + added):.4g}·mean(diag H); use more calibration samples "
                            f"or raise {PERCDAMP}")
        Hr.diagonal().add_(damp * steps[attempt])  # escalate dampening for ill-conditioned Hessians
        added += steps[attempt]
    if added:
        final = float(damp) * (1 + added)
        warnings.warn(f"SparseGPT{_where(label)}: Hessian not positive definite with percdamp {percdamp:g}; raised "
                      f"the dampening to {final:.6g} ({percdamp * (1 + added):.6g}·mean(diag H)), so this module's "
                      f"pruning differs from the requested {PERCDAMP}; use more calibration samples",
                      RuntimeWarning, stacklevel=2)
    del Hr
    Linv = torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=L.dtype, device=L.device), upper=False)
    del L
    return Linv.flip(0, 1).contiguous(), dead


def _where(label: str | None) -> str:
    return f" ({label})" if label else ""


def _obs_block_torch(W1: torch.Tensor, U1: torch.Tensor, prune1: torch.Tensor, err1: torch.Tensor,
                     m: int, n_prune: int) -> None:
    """Reference column loop (also the fallback): same contract as the C++ ``obs_block``."""
    d = U1.diagonal()
    scale = prune1.to(W1.dtype) / d.unsqueeze(0)  # err_i = w_i·[pruned]/d_i
    for i in range(W1.shape[1]):
        if m and i % m == 0:
            sal = W1[:, i:i + m].square() / d[i:i + m].square().unsqueeze(0)
            idx = torch.topk(sal, min(n_prune, sal.shape[1]), dim=1, largest=False).indices
            prune1[:, i:i + m] = False
            prune1[:, i:i + m].scatter_(1, idx, True)
            scale[:, i:i + m] = prune1[:, i:i + m].to(W1.dtype) / d[i:i + m].unsqueeze(0)
        err = torch.mul(W1[:, i], scale[:, i], out=err1[:, i])
        # column i becomes w - err·d_i (its pruned value); later columns get the OBS compensation
        W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
    W1.masked_fill_(prune1, 0.0)


def _obs_block(W1: torch.Tensor, U1: torch.Tensor, prune1: torch.Tensor, err1: torch.Tensor,
               m: int, n_prune: int) -> None:
    k = obs_kernel() if W1.device.type == "cpu" and W1.dtype == torch.float32 else None
    if k is None:
        _obs_block_torch(W1, U1, prune1, err1, m, n_prune)
    else:
        k.obs_block(W1, U1.contiguous(), prune1, err1, m, n_prune)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor | None, target: Target, blocksize: int = 128,
                    percdamp: float = 0.01, hinv: tuple[torch.Tensor, torch.Tensor] | None = None,
                    label: str | None = None) -> PruneResult:
    """Prune ``weight`` ``[out, in]`` to ``target`` given the input Hessian ``[in, in]``.

    Args:
        weight: ``[out, in]``.
        hessian: the input Hessian ``[in, in]`` (unused when ``hinv`` is given).
        target: unstructured sparsity or N:M pattern.
        blocksize: columns per lazy-update block.
        percdamp: dampening as a fraction of ``mean(diag H)``.
        hinv: a precomputed :func:`inverse_hessian_cholesky` (shared by modules with one input).
        label: the module's name for warnings and errors.
    Returns:
        The pruned weight (``weight``'s dtype) and its keep-mask.
    Raises:
        LosaError: no Hessian; an N:M pattern that does not divide ``in``; a Hessian that stays
            indefinite; non-finite results.
    """
    W = weight.detach().float().clone(memory_format=torch.contiguous_format)
    rows, cols = W.shape
    if hinv is None:
        if hessian is None:
            raise LosaError("sparsegpt_prune needs the Hessian or its precomputed inverse factor")
        hinv = inverse_hessian_cholesky(hessian.to(W.device), percdamp, label=label)
    Hinv, dead = hinv
    W[:, dead] = 0
    m, n_prune = 0, 0
    if target.is_nm:
        m, n_prune = int(target.m), int(target.m - target.n)  # type: ignore[operator]
        if cols % m:
            raise LosaError(f"N:M {target.n}:{m} needs in_features divisible by {m}, got {cols}")
        blocksize = math.lcm(blocksize, m)
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        err1 = torch.empty_like(W1)
        U1 = Hinv[i1:i2, i1:i2]
        prune1 = torch.zeros_like(W1, dtype=torch.bool)
        if not target.is_nm:
            # this block's share of the matrix's round(numel·s): the shares add up to it exactly (rounding
            # each block alone missed it by up to a weight per block)
            k = num_pruned(rows * i2, target.sparsity) - num_pruned(rows * i1, target.sparsity)
            if k:
                sal = (W1.square() / U1.diagonal().square().unsqueeze(0)).flatten()
                prune1.view(-1).copy_(~smallest_per_row(sal.unsqueeze(0), k).squeeze(0))
        _obs_block(W1, U1, prune1, err1, m, n_prune)
        keep[:, i1:i2] = ~prune1
        W[:, i1:i2] = W1
        if i2 < cols:
            W[:, i2:].addmm_(err1, Hinv[i1:i2, i2:], alpha=-1.0)
    W.masked_fill_(~keep, 0.0)
    if not torch.isfinite(W).all():
        raise LosaError(f"SparseGPT produced non-finite weights; raise {PERCDAMP} or check the calibration data")
    return PruneResult(W.to(weight.dtype), keep)


class SparseGPTOptions(PrunerOptions):
    """SparseGPT's options (Frantar & Alistarh, 2023, Algorithm 1)."""

    blocksize: int = Field(128, ge=1, description="SparseGPT: columns per lazy-update block (B in the paper)")
    percdamp: float = Field(0.01, gt=0, description="SparseGPT: dampening λ added to diag(H), as a fraction of "
                                                    "mean(diag(H)); raised automatically if H is not positive definite")


@register_pruner
class SparseGPTPruner(Pruner):
    """SparseGPT: OBS pruning with lazy block updates of the remaining weights (Frantar & Alistarh, 2023)."""

    name = "sparsegpt"
    stat = HessianStat
    single_pass_default = True
    Options = SparseGPTOptions
    options: SparseGPTOptions

    def prune(self, weight: torch.Tensor, stat: InputStat | None, target: Target,
              label: str | None = None) -> PruneResult:
        """SparseGPT on ``weight`` from ``stat``'s Hessian (factorised once per shared input).

        Args:
            weight: ``[out, in]``.
            stat: the :class:`HessianStat` of the module's input.
            target: unstructured sparsity or N:M pattern.
            label: the module's name (e.g. ``layer 3 self_attn.q_proj``) for the dampening warning.
        Returns:
            The pruned weight and its keep-mask.
        Raises:
            LosaError: no calibration statistic, or an error of :func:`sparsegpt_prune`.
        """
        if stat is None or not hasattr(stat, "hessian"):
            fix = option("method='magnitude'", "--method magnitude")
            raise LosaError(f"sparsegpt needs calibration data; pass {option('calib')}, or use {fix}")
        percdamp = self.options.percdamp
        # modules fed the same input share one statistic object: factor its Hessian once
        cache = stat.__dict__.setdefault("_hinv_cache", {})
        key = (percdamp, stat.tokens, weight.device)
        if key not in cache:
            cache.clear()
            cache[key] = inverse_hessian_cholesky(stat.hessian.to(weight.device), percdamp, overwrite=True,
                                                  label=label)
        return sparsegpt_prune(weight, None, target, blocksize=self.options.blocksize, percdamp=percdamp,
                               hinv=cache[key], label=label)
