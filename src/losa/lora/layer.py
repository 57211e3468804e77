"""A frozen linear module with a masked low-rank adapter of capacity r_max and active rank r ≤ r_max.

``y = W x + (α / r_max) · ((B[:, :r] A[:r, :]) ⊙ M) x``

``M`` is a stored buffer (the mask the pruner produced), never recomputed from ``W ≠ 0``, so a kept
weight that happens to be exactly zero still receives adapter updates. It is stored bit-packed,
1 bit per weight (:mod:`losa.lora.bitmask`), and unpacked only as a transient of one module when a
computation needs it densely. The computation uses
:class:`losa.lora.function.MaskedLoRAFunction` (one fused GEMM; see its docstring for the measured
choice).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from losa.errors import LosaError
from losa.lora.bitmask import pack_bits, packed_width, unpack_bits
from losa.lora.function import effective_weight, masked_lora_branch, masked_lora_linear
from losa.models.linear import get_weight, set_weight


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as signed integers of its element size (no copy), so that ``==`` compares bit
    patterns: ``-0.0 != 0.0`` and a NaN equals itself.

    Args:
        t: a tensor of 1, 2, 4 or 8 bytes per element.
    Returns:
        the integer view (``t`` itself for integer and bool tensors).
    Raises:
        Nothing of its own.
    """
    if not (t.is_floating_point() or t.is_complex()):
        return t
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


class SparseLoRALinear(nn.Module):
    """Wraps ``base`` (``nn.Linear`` or GPT-2 ``Conv1D``); only ``lora_A`` and ``lora_B`` are trainable.

    LoSA's sparse adapter (Huang et al., ICLR 2025): ``ΔW = s·((B A) ⊙ M)`` with ``s = alpha / r_max``,
    merged exactly into the pruned weight. Parameters and buffers: ``lora_A`` ``[r_max, in]`` float32
    (Kaiming-uniform), ``lora_B`` ``[out, r_max]`` float32 (zeros, so the update starts at 0),
    ``mask_bits`` ``[out, ceil(in / 8)]`` uint8 (the keep-mask bit-packed along ``in`` in the layout of
    ``numpy.packbits(axis=-1)``, see :mod:`losa.lora.bitmask`), ``active_rank`` 0-d integer tensor; all
    on the base weight's device. The base module's parameters are frozen. :attr:`mask` unpacks the
    keep-mask to a bool ``[out, in]`` tensor on demand (a fresh transient on every access: nothing
    unpacked is kept on the module, so under FSDP each process holds 1 bit per weight of masks).
    ``mask_bits`` stays a buffer, replicated by FSDP (``fully_shard`` shards parameters only).
    A state dict with the older bool ``mask`` key (``[out, in]``) still loads; it is packed on load.

    ``base_edited`` (a plain attribute, not saved with the module) is False while the kept values of
    the base weight are bit for bit those of the weight the wrapper was built on, ``W[M] == W₀[M]``,
    so that a resume state can rebuild W from ``W₀`` and ``M`` alone
    (:mod:`losa.pipelines.losa.state`). Every change that may break that sets it, and nothing here
    clears it: a rank fold (:meth:`set_rank`), an unmerge whose pruned weight changed a kept value
    (SparseGPT's compensation), a mask that grows (:meth:`set_mask`), a pre-merge weight recomputed
    instead of kept. Positions outside M are not covered (they are zero after any pruning).

    Args:
        base: the linear module to wrap; its weight is read as ``[out, in]``.
        r_max: adapter capacity (≥ 1).
        alpha: LoRA alpha; the scale is ``alpha / r_max``.
        rank: initial active rank in ``[0, r_max]``; None means ``r_max``.
        mask: keep-mask ``[out, in]`` (converted to bool); None means all-ones.
        dropout: dropout probability on the module input (0 = none).
        generator: CPU generator for the initialisation of ``A``.
    Returns:
        The wrapper (on construction).
    Raises:
        LosaError: ``r_max < 1``, ``rank`` outside ``[0, r_max]``, or ``mask`` not shaped like the weight.
    """

    def __init__(self, base: nn.Module, r_max: int, alpha: float, rank: int | None = None,
                 mask: torch.Tensor | None = None, dropout: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        w = get_weight(base)
        d_out, d_in = w.shape
        if r_max < 1:
            raise LosaError(f"LoRA capacity r_max must be ≥ 1, got {r_max}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r_max = int(r_max)
        self.scale = float(alpha) / self.r_max
        self.lora_A = nn.Parameter(torch.empty(self.r_max, d_in, dtype=torch.float32, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, self.r_max, dtype=torch.float32, device=w.device))
        self._init_a(slice(0, self.r_max), generator)
        self.in_features = int(d_in)
        self.register_buffer("mask_bits", pack_bits(torch.ones(d_out, d_in, dtype=torch.bool, device=w.device)))
        self.register_buffer("active_rank", torch.tensor(self.r_max if rank is None else int(rank)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._pre_merge: torch.Tensor | None = None
        self.base_edited = False
        if mask is not None:
            self.set_mask(mask)
        self.set_rank(int(self.active_rank))

    # ------------------------------------------------------------------ state
    def _init_a(self, rows: slice, generator: torch.Generator | None) -> None:
        """Kaiming-uniform rows of A (as PEFT/nn.Linear do); B stays zero so the update starts at 0."""
        bound = 1.0 / math.sqrt(self.lora_A.shape[1])
        with torch.no_grad():
            fresh = torch.rand(self.lora_A[rows].shape, generator=generator, dtype=torch.float32) * 2 - 1
            self.lora_A[rows] = (fresh * bound).to(self.lora_A.device)

    @property
    def mask(self) -> torch.Tensor:
        """The keep-mask ``M`` as bool ``[out, in]``: unpacked from ``mask_bits`` on every access.

        A fresh tensor (writing to it does not change the module; use :meth:`set_mask`), as large as a
        bool copy of the mask; read it once per computation.
        """
        return unpack_bits(self.mask_bits, self.in_features)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        """Accept the older layout: a bool ``mask`` ``[out, in]`` instead of ``mask_bits`` is packed here.

        Args:
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs: those
                of :meth:`torch.nn.Module._load_from_state_dict`.
        Returns:
            None.
        Raises:
            Nothing of its own (a mask of another shape is reported through ``error_msgs``).
        """
        old = prefix + "mask"
        if old in state_dict and prefix + "mask_bits" not in state_dict:
            dense = state_dict.pop(old)
            if dense.dim() == 2 and dense.shape[1] == self.in_features:
                state_dict[prefix + "mask_bits"] = pack_bits(dense)
            else:
                error_msgs.append(f"size mismatch for {old}: copying a mask of shape {tuple(dense.shape)}, the "
                                  f"weight is {(self.mask_bits.shape[0], self.in_features)}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def rank(self) -> int:
        """The active rank ``r`` (the first ``r`` rows of A / columns of B are used)."""
        return int(self.active_rank)

    def set_rank(self, rank: int, generator: torch.Generator | None = None) -> None:
        """Use the first ``rank`` components.

        Lowering the rank folds the dropped components' trained update into the weight under the mask
        first, ``W += s·((B[:, r:old] A[r:old]) ⊙ M)``, so the module computes the same function and W
        stays exactly as sparse as M; the dropped components are then reset (A re-drawn, B zeroed), so a
        later increase starts them from a zero update. Ranks < min(old, new) keep their trained values.

        Args:
            rank: the new active rank, in ``[0, r_max]``.
            generator: CPU generator for the re-drawn rows of A (None: torch's global RNG).
        Returns:
            None.
        Raises:
            LosaError: ``rank`` outside ``[0, r_max]``, or the adapter is merged.
        """
        if not 0 <= rank <= self.r_max:
            raise LosaError(f"LoRA rank {rank} outside [0, r_max={self.r_max}]; raise r_max or lower the rank")
        if self.merged:
            raise LosaError("cannot change the rank of a merged adapter; unmerge first")
        old = self.rank
        if rank < old:
            with torch.no_grad():
                dropped = (self.lora_B[:, rank:old] @ self.lora_A[rank:old]).mul(self.scale) * self.mask
                if dropped.any():
                    set_weight(self.base, get_weight(self.base).float() + dropped)
                    self.base_edited = True
                self.lora_B[:, rank:old] = 0
            self._init_a(slice(rank, old), generator)
        self.active_rank.fill_(rank)

    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the stored keep-mask ``M`` (in place; it is never derived from ``W ≠ 0``).

        A mask that keeps a position the old one did not sets ``base_edited`` (W there is no longer
        known to be the original value).

        Args:
            mask: ``[out, in]``, any dtype (nonzero = kept); stored bit-packed.
        Returns:
            None.
        Raises:
            LosaError: ``mask`` is not shaped like the weight.
        """
        shape = (self.mask_bits.shape[0], self.in_features)
        if tuple(mask.shape) != shape:
            raise LosaError(f"mask shape {tuple(mask.shape)} does not match the weight {shape}")
        self.set_mask_bits(pack_bits(mask.to(self.mask_bits.device)))

    def set_mask_bits(self, packed: torch.Tensor) -> None:
        """:meth:`set_mask` from an already packed mask (no unpacking; padding bits are cleared).

        Args:
            packed: ``[out, ceil(in / 8)]`` uint8 in the layout of :func:`losa.lora.bitmask.pack_bits`.
        Returns:
            None.
        Raises:
            LosaError: ``packed`` is not uint8 of that shape.
        """
        if packed.dtype != torch.uint8 or packed.shape != self.mask_bits.shape:
            raise LosaError(f"packed mask {tuple(packed.shape)} ({packed.dtype}) does not fit the weight "
                            f"{(self.mask_bits.shape[0], self.in_features)}: needs uint8 "
                            f"{(self.mask_bits.shape[0], packed_width(self.in_features))}")
        new = packed.to(self.mask_bits.device)
        pad = packed_width(self.in_features) * 8 - self.in_features
        if pad and new.numel():  # clear stray padding bits, so counts over the packed bytes stay exact
            new = new.clone()
            new[:, -1] &= (0xFF << pad) & 0xFF
        if not self.base_edited and bool((new & ~self.mask_bits).any()):  # a position the old mask did not keep
            self.base_edited = True
        self.mask_bits.copy_(new)

    def delta(self) -> torch.Tensor:
        """The masked update ``s·((B A) ⊙ M)`` as a dense [out, in] float32 matrix (merge / tests).

        Args:
            None.
        Returns:
            ``[out, in]`` float32, with the active rank only; attached to the autograd graph of A and B.
        Raises:
            Nothing of its own.
        """
        r = self.rank
        return (self.lora_B[:, :r] @ self.lora_A[:r]).mul(self.scale) * self.mask

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = x·(W + s·((B A) ⊙ M))ᵀ + b``.

        A float32, unsharded W takes one fused GEMM (:func:`masked_lora_linear`). Otherwise (W in bf16 /
        fp16, or sharded by FSDP / ZeRO-3) the base layer is called and the adapter branch is added in
        float32 (:func:`masked_lora_branch`), so updates below W's rounding still count and sharded
        parameters are gathered by the base layer's own hooks. When merged or at rank 0 this is just the
        base module. Dropout (if configured) applies to the adapter's input in the split form and to
        ``x`` before the fused map (so in training it reaches the base term too) in the fused form.

        Args:
            x: ``[..., in]``.
        Returns:
            ``[..., out]`` in ``x.dtype``.
        Raises:
            Nothing of its own.
        """
        r = self.rank
        if self.merged or r == 0:
            return self.base(x)
        w = self.base.weight
        if self.split_forward(w):
            y = self.base(x)
            return (y.to(self.lora_A.dtype) + masked_lora_branch(self.dropout(x), self.lora_A[:r], self.lora_B[:, :r],
                                                                 self.mask_bits, self.scale, packed=True)).to(y.dtype)
        bias = getattr(self.base, "bias", None)
        return masked_lora_linear(self.dropout(x), get_weight(self.base), bias, self.lora_A[:r], self.lora_B[:, :r],
                                  self.mask_bits, self.scale, packed=True)

    @staticmethod
    def split_forward(weight: torch.Tensor) -> bool:
        """True when the base must be called separately: W not float32, or a sharded parameter (a DTensor,
        a DeepSpeed ZeRO-3 partition, or an FSDP-flattened placeholder)."""
        sharded = (type(weight).__name__ == "DTensor" or hasattr(weight, "ds_id")
                   or weight.dim() != 2)
        return sharded or weight.dtype != torch.float32

    # ------------------------------------------------------------------ merge
    def merge(self, keep_original: bool = True) -> None:
        """``W ← W + s·((B A) ⊙ M)``: positions outside M keep W's value (zero after pruning).

        With ``keep_original`` the pre-merge weight is kept (one weight copy) so that :meth:`unmerge`
        restores it bit-exactly; the runner merges one decoder layer at a time, so that is the extra
        memory of one layer. The sum is formed in float32 and stored in the base weight's dtype. A
        no-op if already merged.

        Args:
            keep_original: keep a copy of the pre-merge weight for :meth:`unmerge`.
        Returns:
            None.
        Raises:
            Nothing of its own.
        """
        if self.merged:
            return
        w = get_weight(self.base)
        self._pre_merge = w.detach().clone() if keep_original else None
        with torch.no_grad():
            r = self.rank
            set_weight(self.base, effective_weight(w.float(), self.lora_A[:r].detach(), self.lora_B[:, :r].detach(),
                                                   self.mask_bits, self.scale, packed=True))
        self.merged = True

    def unmerge(self, pruned_weight: torch.Tensor | None = None, new_mask: torch.Tensor | None = None) -> None:
        """Undo :meth:`merge`, optionally after the merged weight ``W'`` was pruned.

        Without arguments W is restored. After pruning ``W'`` into ``pruned_weight`` with keep-mask
        ``new_mask``: ``W ← (W_old + (pruned_weight − W')) ⊙ M_new`` and ``M ← M_new``. That keeps W on
        the surviving positions (plus any compensation the pruner applied there, e.g. SparseGPT's
        update; exactly W_old for Wanda/magnitude) and drops the adapter mass on newly pruned positions,
        since the new mask masks it out. The adapter's forward then equals ``pruned_weight`` up to
        float rounding. Without a kept original (``merge(keep_original=False)``) ``W_old`` is
        recomputed as ``W' − delta()``, exact only up to rounding. Sets ``base_edited`` when a kept
        value changes bit-wise (or W_old had to be recomputed).

        Args:
            pruned_weight: the pruned merged weight, ``[out, in]``; with ``new_mask`` or not at all.
            new_mask: its keep-mask, ``[out, in]`` (converted to bool); becomes the stored mask.
        Returns:
            None.
        Raises:
            LosaError: the adapter is not merged, only one of ``pruned_weight``/``new_mask`` is given, or
                ``new_mask`` is not shaped like the weight.
        """
        if not self.merged:
            raise LosaError("adapter is not merged; nothing to unmerge")
        if (pruned_weight is None) != (new_mask is None):
            raise LosaError("unmerge after pruning needs both the pruned weight and its mask")
        with torch.no_grad():
            w_merged = get_weight(self.base).float()
            if self._pre_merge is not None:
                w_old = self._pre_merge.float()
            else:
                w_old = w_merged - self.delta()
            if pruned_weight is not None:
                keep = new_mask.to(torch.bool)
                w_old = torch.where(keep, w_old + (pruned_weight.float() - w_merged), torch.zeros_like(w_old))
                self.set_mask(keep)
            set_weight(self.base, w_old)
            if self._pre_merge is None:
                self.base_edited = True
            elif pruned_weight is not None and not self.base_edited:
                self.base_edited = bool(((bits(get_weight(self.base)) != bits(self._pre_merge)) & keep).any())
        self._pre_merge = None
        self.merged = False
