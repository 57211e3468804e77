"""Pure mask math: from importance scores to boolean keep-masks.

All masks are ``True`` where a weight is kept. Scores are ``[out, in]``; N:M groups run along the
input dimension (the reduction dimension of the matmul), as sparse tensor cores expect.
"""

from __future__ import annotations

import torch

from losa.errors import LosaError


def validate_nm(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or m < 2 or not (1 <= n < m):
        raise LosaError(f"invalid N:M pattern {n}:{m}; need integers with 1 <= N < M (e.g. 2:4, 4:8)")


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``.

    Raises:
        LosaError: not of the form N:M with integers 1 <= N < M.
    """
    try:
        n_str, m_str = str(text).split(":")
        n, m = int(n_str), int(m_str)
    except ValueError:
        raise LosaError(f"invalid N:M pattern {text!r}; write it as N:M, e.g. 2:4") from None
    validate_nm(n, m)
    return n, m


def max_nonzeros_per_group(weight: torch.Tensor, m: int) -> int | None:
    """The largest count of non-zeros in any group of ``m`` consecutive inputs of any row.

    The one N:M group check of losa (verification and the sparse inference formats use it).

    Args:
        weight: ``[out, in]``.
        m: the group size M.
    Returns:
        the count, or None when ``in`` is not a multiple of ``m``.
    """
    rows, cols = weight.shape
    if cols % m:
        return None
    return int((weight != 0).reshape(rows, cols // m, m).sum(-1).max())


def check_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True iff every group of ``m`` consecutive inputs of every row holds at most ``n`` non-zeros."""
    mx = max_nonzeros_per_group(weight, m)
    return mx is not None and mx <= n


def num_pruned(count: int, sparsity: float) -> int:
    """Number of weights to prune out of ``count`` for ``sparsity``: rounded to the nearest integer."""
    return min(count, int(count * sparsity + 0.5))


def smallest_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of ``[rows, n]`` scores pruning exactly the ``k`` smallest of every row."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return keep
    # kthvalue gives each row's threshold (about 2x faster than topk); rows with ties at the
    # threshold (e.g. several zeros) fall back to topk so that exactly k are pruned per row
    thr = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    keep = scores > thr
    bad = (~keep).sum(1) != k
    if bad.any():
        rows = bad.nonzero().squeeze(1)
        idx = torch.topk(scores[rows], k, dim=1, largest=False).indices
        fixed = torch.ones(len(rows), scores.shape[1], dtype=torch.bool, device=scores.device)
        keep[rows] = fixed.scatter_(1, idx, False)
    return keep


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Keep the highest scores, pruning ``round(numel·sparsity)`` in all.

    ``per_row``: scores are compared within each output row (Wanda). Every row prunes
    ``floor(total/rows)``; the remainder goes, one each, to the rows whose next-smallest score is
    lowest, so the matrix hits the target to within one weight (not only to within one per row).
    """
    if not 0.0 <= sparsity < 1.0:
        raise LosaError(f"sparsity {sparsity} is outside [0, 1); use e.g. 0.5 for 50 %")
    scores = scores.contiguous()
    rows, cols = scores.shape
    total = num_pruned(scores.numel(), sparsity)
    if per_row:
        base, extra = divmod(total, rows)
        keep = smallest_per_row(scores, base)
        if extra:
            nxt, col = scores.masked_fill(~keep, float("inf")).min(dim=1)
            chosen = torch.topk(nxt, extra, largest=False).indices
            keep[chosen, col[chosen]] = False
        return keep
    return smallest_per_row(scores.view(1, -1), total).view(rows, cols)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive inputs of each row."""
    validate_nm(n, m)
    rows, cols = scores.shape
    if cols % m:
        raise LosaError(f"N:M {n}:{m} needs in_features divisible by {m}, got {cols}; choose another M")
    groups = scores.contiguous().reshape(rows, cols // m, m)
    idx = torch.topk(groups, m - n, dim=2, largest=False).indices
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, idx, False)
    return keep.reshape(rows, cols)
