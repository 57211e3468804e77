"""Compact storage formats for pruned weights (pure tensor math, no kernels).

A weight ``W [N, K]`` is stored as three tensors (see ``csrc/sparse_linear.cpp`` for the byte layout):

* ``meta`` (uint8, ``[N, stride]``): the kept positions. ``bitmask``: one bit per input (K rounded
  up to 32). ``nm24`` / ``nm14``: 2-bit indices of the 2 (or 1) kept inputs in every group of 4.
* ``values`` (float32 or bfloat16): the kept weights row by row in input order, then
  :data:`PAD` zeros so vector loads never leave the buffer.
* ``row_ptr`` (int64, ``[N + 1]``): offset of each row's first value.

For 2:4 both encodings cost 1 bit per weight; ``nm14`` halves the metadata of 1:4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from losa.errors import LosaError
from losa.pruning.masks import check_nm

FORMATS = ("bitmask", "nm24", "nm14")
FORMAT_CODES = {name: i for i, name in enumerate(FORMATS)}
VALUE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
PAD = 64
_KEEP_PER_GROUP = {"nm24": 2, "nm14": 1}


@dataclass
class Packed:
    """A packed weight: ``meta``, ``values`` and ``row_ptr`` plus its shape and format name."""

    meta: torch.Tensor
    values: torch.Tensor
    row_ptr: torch.Tensor
    shape: tuple[int, int]
    fmt: str

    @property
    def nnz(self) -> int:
        return int(self.row_ptr[-1])

    def nbytes(self) -> int:
        """Bytes of the compact representation (values without padding, metadata, row offsets)."""
        return (self.meta.numel() + self.nnz * self.values.element_size() + self.row_ptr.numel() * 8)


def resolve_value_dtype(value_dtype: str | torch.dtype, what: str = "value_dtype") -> torch.dtype:
    if isinstance(value_dtype, torch.dtype) and value_dtype in (torch.float32, torch.bfloat16):
        return value_dtype
    if isinstance(value_dtype, str) and value_dtype in VALUE_DTYPES:
        return VALUE_DTYPES[value_dtype]
    raise LosaError(f"{what}={value_dtype!r} is not supported; use 'float32' or 'bfloat16'")


def round32(k: int) -> int:
    return (k + 31) // 32 * 32


def meta_stride(fmt: str, k: int) -> int:
    return round32(k) // (16 if fmt == "nm14" else 8)


def nm_fits(keep: torch.Tensor, n: int, m: int = 4) -> bool:
    """True if every group of ``m`` consecutive inputs keeps at most ``n`` weights (``keep``: ``[out, in]``)."""
    return check_nm(keep, n, m)


def choose_format(keep: torch.Tensor) -> str:
    """``nm14`` when the mask is (at most) 1:4 and dense enough for its index format to pay, else ``bitmask``.

    2:4 stays a bitmask: ``nm24`` costs exactly the same bytes (1 bit per weight) and its table decode is
    slower (benchmarks/results/inference.md, the ``2:4 nm24`` column); it remains available explicitly.
    """
    density = float(keep.float().mean()) if keep.numel() else 0.0
    if density > 0.2 and nm_fits(keep, 1):  # the index format stores exactly 1 of 4: half the bitmask's bytes
        return "nm14"
    return "bitmask"


def _pad_cols(t: torch.Tensor, k32: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, k32 - t.shape[1]))


def _pack_bits(bits: torch.Tensor, width: int) -> torch.Tensor:
    """Pack ``[N, C]`` small unsigned integers of ``width`` bits into bytes, little-endian."""
    per = 8 // width
    rows = bits.shape[0]
    shifts = torch.arange(per, dtype=torch.int32) * width
    return (bits.to(torch.int32).reshape(rows, -1, per) << shifts).sum(-1).to(torch.uint8)


def _unpack_bits(meta: torch.Tensor, width: int) -> torch.Tensor:
    per = 8 // width
    shifts = torch.arange(per, dtype=torch.int32) * width
    return ((meta.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << width) - 1)).reshape(meta.shape[0], -1)


def pack(weight: torch.Tensor, value_dtype: torch.dtype = torch.float32, fmt: str = "auto",
         keep: torch.Tensor | None = None) -> Packed:
    """Pack ``weight [N, K]``; kept positions are ``keep`` (default: the non-zeros of ``weight``)."""
    if weight.dim() != 2:
        raise LosaError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    w = weight.detach().to("cpu", torch.float32)
    keep = (w != 0) if keep is None else keep.to("cpu", torch.bool)
    if keep.shape != w.shape:
        raise LosaError(f"keep-mask shape {tuple(keep.shape)} differs from weight shape {tuple(w.shape)}")
    w = w * keep
    fmt = choose_format(keep) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise LosaError(f"unknown sparse format {fmt!r}; use 'auto' or one of {', '.join(FORMATS)}")
    rows, k = w.shape
    k32 = round32(k)
    if fmt == "bitmask":
        keep32 = _pad_cols(keep, k32)
        meta = _pack_bits(keep32, 1)
        vals = w[keep]
        counts = keep.sum(1)
    else:
        n = _KEEP_PER_GROUP[fmt]
        if not nm_fits(keep, n):
            raise LosaError(f"format {fmt!r} needs at most {n} kept weights in every group of 4 inputs; "
                            "use fmt='bitmask' (or 'auto') for this mask")
        keep32 = _pad_cols(keep, k32).reshape(rows, k32 // 4, 4)
        # exactly n positions per group: kept ones first, then the lowest zero positions (value 0)
        rank = keep32.to(torch.float32) * 8 - torch.arange(4, dtype=torch.float32)
        idx = torch.topk(rank, n, dim=-1).indices.sort(dim=-1).values
        vals = torch.gather(_pad_cols(w, k32).reshape(rows, k32 // 4, 4), 2, idx).reshape(-1)
        meta = _pack_bits(idx.reshape(rows, -1), 2)
        counts = torch.full((rows,), k32 // 4 * n, dtype=torch.int64)
    row_ptr = torch.zeros(rows + 1, dtype=torch.int64)
    row_ptr[1:] = counts.cumsum(0)
    values = torch.cat([vals.to(value_dtype), torch.zeros(PAD, dtype=value_dtype)])
    return Packed(meta.contiguous(), values, row_ptr, (rows, k), fmt)


def pack_dense(weight: torch.Tensor, value_dtype: torch.dtype = torch.bfloat16) -> Packed:
    """Pack every weight of ``weight [N, K]`` (zeros included): the bitmask format with every bit set.

    The same buffers as ``pack(weight, value_dtype, "bitmask", keep=all True)``, built with one copy of the weight
    instead of a mask and a gather (the LM head copies of the decode path: a vocabulary-sized matrix).

    Args:
        weight: the dense weight ``[N, K]``.
        value_dtype: the stored precision (``torch.float32`` or ``torch.bfloat16``; values are rounded to it).

    Returns:
        The packed weight.

    Raises:
        LosaError: when ``weight`` is not 2-D.
    """
    if weight.dim() != 2:
        raise LosaError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    rows, k = weight.shape
    row_meta = _pack_bits(_pad_cols(torch.ones(1, k, dtype=torch.bool), round32(k)), 1)  # [1, K32 / 8]
    values = torch.cat([weight.detach().to("cpu").reshape(-1).to(value_dtype), torch.zeros(PAD, dtype=value_dtype)])
    row_ptr = torch.arange(rows + 1, dtype=torch.int64) * k
    return Packed(row_meta.expand(rows, -1).contiguous(), values, row_ptr, (rows, k), "bitmask")


def unpack(p: Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense ``[N, K]`` weight (reference decoder in plain torch; also the no-compiler path)."""
    rows, k = p.shape
    k32 = round32(k)
    vals = p.values[: p.nnz].to(dtype)
    if p.fmt == "bitmask":
        keep = _unpack_bits(p.meta, 1).bool()
        dense = torch.zeros(rows, k32, dtype=dtype)
        dense[keep] = vals
    else:
        n = _KEEP_PER_GROUP[p.fmt]
        idx = _unpack_bits(p.meta, 2).reshape(rows, k32 // 4, n).long()
        dense = torch.zeros(rows, k32 // 4, 4, dtype=dtype)
        dense.scatter_(2, idx, vals.reshape(rows, k32 // 4, n))
        dense = dense.reshape(rows, k32)
    return dense[:, :k].contiguous()
