"""The masked-LoRA linear map as one autograd function (exact, memory-lean).

``y = x·(W + s·((B A) ⊙ M))ᵀ + b``. Only ``A`` and ``B`` receive gradients::

    G  = (∂L/∂y)ᵀ x ⊙ M                 [out, in]  (masked weight gradient)
    ∂A = s · Bᵀ G,   ∂B = s · G Aᵀ,   ∂x = ∂L/∂y · W_eff

Why this form (measured, see benchmarks/results/masked_lora.md): for an arbitrary mask there is no
exact factorisation of ``(B A) ⊙ M`` cheaper than materialising it (unlike plain LoRA, ``x Aᵀ Bᵀ``
does not commute with ⊙ M), and CPU sparse kernels (CSR SDDMM + SpMM) are much slower than dense
GEMMs at 50-70 % sparsity. Folding the masked update into W gives ONE GEMM per forward instead of
two (base + adapter), so the masked adapter costs one [out, r]×[r, in] product plus an elementwise
mask-and-add over W. Unlike plain autograd on the fused weight, this function does not keep
``W_eff`` alive between forward and backward (it is rebuilt in backward), so training memory per
module is that of plain LoRA plus the keep-mask, which the module stores bit-packed
(:mod:`losa.lora.bitmask`, 1 bit per weight) and these functions unpack once per call, straight to
the dtype they compute in (``packed=True``); the unpacked mask is a transient of one module.

Two cases take the split form instead (:func:`masked_lora_branch`: ``base(x) + x·(s·(B A) ⊙ M)ᵀ`` with
the adapter branch in float32): a base weight in reduced precision, where folding the update into W
would round away every component smaller than half a bf16 ulp of W, and a sharded base weight
(FSDP / DeepSpeed ZeRO-3), whose parameter gathering happens only when the base module is called.
"""

from __future__ import annotations

import torch

from losa.lora.bitmask import unpack_bits


def mask_as(mask: torch.Tensor, n_in: int, dtype: torch.dtype, packed: bool) -> torch.Tensor:
    """The keep-mask as a dense ``[out, n_in]`` tensor of ``dtype`` (1 where kept, 0 elsewhere).

    Args:
        mask: ``[out, n_in]`` (bool or 0/1 in any dtype), or with ``packed`` the bit-packed
            ``[out, ceil(n_in / 8)]`` uint8 of :func:`losa.lora.bitmask.pack_bits`.
        n_in: the number of input features.
        dtype: the result's dtype.
        packed: whether ``mask`` is bit-packed.
    Returns:
        ``[out, n_in]`` in ``dtype`` (``mask`` itself when it already is that; otherwise a transient).
    Raises:
        LosaError: a packed mask that does not hold ``n_in`` positions per row.
    """
    return unpack_bits(mask, n_in, dtype) if packed else mask.to(dtype)


def effective_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor,
                     scale: float, packed: bool = False) -> torch.Tensor:
    """The effective weight ``W + s·((B A) ⊙ M)``; zero wherever W is zero and M is False.

    Args:
        weight: frozen base weight ``W``, ``[out_features, in_features]``.
        a: LoRA ``A``, ``[r, in_features]`` (the active rows).
        b: LoRA ``B``, ``[out_features, r]`` (the active columns).
        mask: keep-mask ``M``, ``[out_features, in_features]`` (bool, or 0/1 in any dtype), or with
            ``packed`` its bit-packed ``[out_features, ceil(in_features / 8)]`` uint8.
        scale: adapter scale ``s`` (``alpha / r_max``).
        packed: whether ``mask`` is bit-packed (unpacked here, once, to ``weight.dtype``).
    Returns:
        ``[out_features, in_features]`` in ``weight.dtype`` (``B A`` is formed in ``a``/``b``'s dtype).
    Raises:
        LosaError: a packed mask of another width.
        Otherwise nothing of its own (mismatched shapes surface as torch's ``RuntimeError``).
    """
    delta = (b @ a).mul_(scale).to(weight.dtype)
    return torch.addcmul(weight, delta, mask_as(mask, a.shape[-1], weight.dtype, packed))


class MaskedLoRAFunction(torch.autograd.Function):
    """Autograd function behind :func:`masked_lora_linear` (use that; ``apply`` takes the same arguments).

    Saves ``x, W, A, B, M`` (``M`` as given: bit-packed when ``packed``) and rebuilds ``W_eff`` in
    backward instead of keeping it alive.

    Args:
        Those of :func:`masked_lora_linear`, positionally.
    Returns:
        ``[..., out_features]`` in ``x.dtype``.
    Raises:
        Nothing of its own.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, mask: torch.Tensor, scale: float, packed: bool = False) -> torch.Tensor:
        """One GEMM with ``W_eff = W + s·((B A) ⊙ M)`` (formed in W's dtype, applied in x's dtype).

        Args:
            ctx: autograd context.
            x, weight, bias, a, b, mask, scale, packed: see :func:`masked_lora_linear`.
        Returns:
            ``[..., out_features]`` in ``x.dtype``.
        Raises:
            Nothing of its own.
        """
        w_eff = effective_weight(weight, a.to(weight.dtype), b.to(weight.dtype), mask, scale, packed)
        ctx.save_for_backward(x, weight, a, b, mask)
        ctx.scale = scale
        ctx.packed = packed
        return torch.nn.functional.linear(x, w_eff.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        """Gradients of ``x``, ``A`` and ``B`` (see the module docstring); W, bias, M and s get None.

        Args:
            ctx: autograd context with the saved ``x, W, A, B, M`` and ``scale``.
            grad_out: ``∂L/∂y``, ``[..., out_features]``.
        Returns:
            ``(∂x [..., in] in x.dtype, None, None, ∂A [r, in], ∂B [out, r], None, None, None)``; ``∂A``/``∂B``
            in ``A``'s dtype, each None when not required.
        Raises:
            Nothing of its own.
        """
        x, weight, a, b, mask = ctx.saved_tensors
        s = ctx.scale
        grad_x = grad_a = grad_b = None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        need_ab = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        if ctx.needs_input_grad[0] or need_ab:  # one dense mask for both uses (same dtype: one unpack)
            dtype = a.dtype if need_ab else weight.dtype
            dense = mask_as(mask, a.shape[-1], dtype, ctx.packed)
        if ctx.needs_input_grad[0]:
            w_eff = effective_weight(weight, a.to(weight.dtype), b.to(weight.dtype), dense, s)
            grad_x = (g2 @ w_eff.to(g2.dtype)).reshape(x.shape).to(x.dtype)
            del w_eff
        if need_ab:
            x2 = x.reshape(-1, x.shape[-1])
            g = (g2.t().to(a.dtype) @ x2.to(a.dtype)).mul_(dense)  # [out, in]
            if ctx.needs_input_grad[3]:
                grad_a = (b.t() @ g).mul_(s)
            if ctx.needs_input_grad[4]:
                grad_b = (g @ a.t()).mul_(s)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def masked_lora_branch(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor,
                       scale: float, packed: bool = False) -> torch.Tensor:
    """The adapter's own contribution ``x·(s·(B A) ⊙ M)ᵀ``, computed in ``a``'s dtype (float32).

    Plain autograd (gradients for ``x``, ``a`` and ``b``); the caller adds it to the base layer's output,
    so the update never passes through the rounding of a reduced-precision W.

    Args:
        x: input, ``[..., in_features]``.
        a: LoRA ``A``, ``[r, in_features]``.
        b: LoRA ``B``, ``[out_features, r]``.
        mask: keep-mask ``M``, ``[out_features, in_features]``, or with ``packed`` its bit-packed
            ``[out_features, ceil(in_features / 8)]`` uint8 (unpacked here, once, to ``a.dtype``).
        scale: adapter scale ``s``.
        packed: whether ``mask`` is bit-packed.
    Returns:
        ``[..., out_features]`` in ``a.dtype``.
    Raises:
        LosaError: a packed mask of another width.
    """
    delta = (b @ a).mul(scale) * mask_as(mask, a.shape[-1], a.dtype, packed)
    return torch.nn.functional.linear(x.to(a.dtype), delta)


def masked_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                       b: torch.Tensor, mask: torch.Tensor, scale: float, packed: bool = False) -> torch.Tensor:
    """``x·(W + s·((B A) ⊙ M))ᵀ + bias`` with gradients for ``x``, ``a`` and ``b`` only.

    The masked LoRA map of LoSA (Huang et al., ICLR 2025, "Dynamic Low-Rank Sparse Adaptation"): the
    update ``ΔW = (B·A) ⊙ M`` stays inside the sparsity pattern, so it merges into W exactly.

    Args:
        x: input, ``[..., in_features]``.
        weight: frozen base weight ``W``, ``[out_features, in_features]`` (receives no gradient).
        bias: ``[out_features]`` or None (receives no gradient).
        a: LoRA ``A``, ``[r, in_features]`` (usually float32).
        b: LoRA ``B``, ``[out_features, r]``.
        mask: keep-mask ``M``, ``[out_features, in_features]``, bool; or with ``packed`` its bit-packed
            ``[out_features, ceil(in_features / 8)]`` uint8 (saved packed for backward; unpacked once
            in forward and once in backward).
        scale: adapter scale ``s = alpha / r_max``.
        packed: whether ``mask`` is bit-packed.
    Returns:
        ``[..., out_features]`` in ``x.dtype``.
    Raises:
        LosaError: a packed mask of another width.
        Otherwise nothing of its own (mismatched shapes surface as torch's ``RuntimeError``).
    """
    return MaskedLoRAFunction.apply(x, weight, bias, a, b, mask, scale, packed)
