"""Bit-packed boolean masks: 1 bit per position, 8 positions per ``uint8`` byte.

The layout is that of ``numpy.packbits(mask, axis=-1)`` (big-endian bit order): along the last
dimension, position ``j`` lives in byte ``j // 8`` at bit ``7 - j % 8`` (the first position of a
byte in its most significant bit), and a last dimension that is not a multiple of 8 is padded with
zero bits at the end of every row. Packing ``[out, in]`` therefore gives ``[out, ceil(in / 8)]``,
and packing a flattened mask gives the row-major flat layout; both coincide byte for byte when
``in`` is a multiple of 8.

Used by :class:`losa.lora.layer.SparseLoRALinear` (its keep-mask buffer) and by the LoSA resume
state (:mod:`losa.pipelines.losa.state`), so both share one packing.
"""

from __future__ import annotations

import torch

from losa.errors import LosaError

#: bit shift of each position within its byte, first position first (in the most significant bit)
_SHIFTS = (7, 6, 5, 4, 3, 2, 1, 0)


def packed_width(n: int) -> int:
    """Bytes needed for ``n`` positions, ``ceil(n / 8)``.

    Args:
        n: number of positions (≥ 0).
    Returns:
        the number of bytes.
    Raises:
        Nothing of its own.
    """
    return (int(n) + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a mask along its last dimension, 8 positions per byte (``numpy.packbits(axis=-1)``).

    Args:
        mask: ``[..., n]`` (at least 1-D), bool or any dtype (nonzero = set); packed on its own device.
    Returns:
        ``[..., ceil(n / 8)]`` uint8, contiguous; padding bits are zero.
    Raises:
        LosaError: ``mask`` is 0-D.
    """
    if mask.dim() == 0:
        raise LosaError("pack_bits needs a mask of at least one dimension; reshape a scalar to [1] first")
    m = mask.detach()
    m = m.view(torch.uint8) if m.dtype == torch.bool else (m != 0).view(torch.uint8)
    n = m.shape[-1]
    pad = packed_width(n) * 8 - n
    if pad:
        m = torch.nn.functional.pad(m, (0, pad))
    groups = m.reshape(*m.shape[:-1], -1, 8)
    out = groups[..., 0] << _SHIFTS[0]
    for i, s in enumerate(_SHIFTS[1:], 1):
        out |= groups[..., i] << s
    return out.contiguous()


def unpack_bits(packed: torch.Tensor, n: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` positions of every row, in ``dtype``.

    The result is a fresh tensor (a transient the caller owns); asking for the dtype the caller
    computes in (e.g. float32 for ``W + Δ ⊙ M``) avoids a second, bool, copy.

    Args:
        packed: ``[..., ceil(n / 8)]`` uint8 from :func:`pack_bits`; unpacked on its own device.
        n: number of positions per row of the unpacked mask.
        dtype: the result's dtype; set positions become ``True`` / ``1``, the others ``False`` / ``0``.
    Returns:
        ``[..., n]`` in ``dtype``, contiguous.
    Raises:
        LosaError: ``packed`` is not uint8, is 0-D, or its last dimension is not ``ceil(n / 8)``.
    """
    if packed.dtype != torch.uint8 or packed.dim() == 0 or packed.shape[-1] != packed_width(n):
        raise LosaError(f"bitmask {tuple(packed.shape)} ({packed.dtype}) does not hold {n} positions per row "
                        f"(needs uint8 with {packed_width(n)} bytes per row); use the mask written for this shape")
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=packed.device)
    unpacked = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(*packed.shape[:-1], -1)[..., :n]
    if dtype == torch.bool:
        return unpacked.contiguous().view(torch.bool)
    return unpacked.to(dtype).contiguous()


def bits_at(packed: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Selected positions of a packed 2-D mask, without unpacking the rest.

    Args:
        packed: ``[out, ceil(in / 8)]`` uint8 from :func:`pack_bits` of an ``[out, in]`` mask.
        rows: integer row indices, any shape, on ``packed``'s device.
        cols: integer column indices (in ``[0, in)``), the shape of ``rows``.
    Returns:
        bool, the shape of ``rows``: the mask at ``(rows[i], cols[i])``.
    Raises:
        Nothing of its own (indices out of range surface as torch's ``IndexError`` / ``RuntimeError``).
    """
    byte = packed[rows, cols // 8]
    shift = (7 - cols % 8).to(torch.uint8)
    return ((byte >> shift) & 1).view(torch.bool)


def count_bits(packed: torch.Tensor) -> int:
    """Number of set positions in a packed mask (padding bits are zero, so they do not count).

    Args:
        packed: uint8 from :func:`pack_bits`, any shape.
    Returns:
        the count.
    Raises:
        Nothing of its own.
    """
    return int(sum(int(((packed >> s) & 1).sum()) for s in _SHIFTS))
