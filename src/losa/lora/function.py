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
module is that of plain LoRA plus the boolean mask.

Two cases take the split form instead (:func:`masked_lora_branch`: ``base(x) + x·(s·(B A) ⊙ M)ᵀ`` with
the adapter branch in float32): a base weight in reduced precision, where folding the update into W
would round away every component smaller than half a bf16 ulp of W, and a sharded base weight
(FSDP / DeepSpeed ZeRO-3), whose parameter gathering happens only when the base module is called.
"""

from __future__ import annotations

import torch


def effective_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """The effective weight ``W + s·((B A) ⊙ M)``; zero wherever W is zero and M is False.

    Args:
        weight: frozen base weight ``W``, ``[out_features, in_features]``.
        a: LoRA ``A``, ``[r, in_features]`` (the active rows).
        b: LoRA ``B``, ``[out_features, r]`` (the active columns).
        mask: keep-mask ``M``, ``[out_features, in_features]`` (bool, or 0/1 in any dtype).
        scale: adapter scale ``s`` (``alpha / r_max``).
    Returns:
        ``[out_features, in_features]`` in ``weight.dtype`` (``B A`` is formed in ``a``/``b``'s dtype).
    Raises:
        Nothing of its own (mismatched shapes surface as torch's ``RuntimeError``).
    """
    delta = (b @ a).mul_(scale).to(weight.dtype)
    return torch.addcmul(weight, delta, mask.to(weight.dtype))


class MaskedLoRAFunction(torch.autograd.Function):
    """Autograd function behind :func:`masked_lora_linear` (use that; ``apply`` takes the same arguments).

    Saves ``x, W, A, B, M`` and rebuilds ``W_eff`` in backward instead of keeping it alive.

    Args:
        Those of :func:`masked_lora_linear`, positionally.
    Returns:
        ``[..., out_features]`` in ``x.dtype``.
    Raises:
        Nothing of its own.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        """One GEMM with ``W_eff = W + s·((B A) ⊙ M)`` (formed in W's dtype, applied in x's dtype).

        Args:
            ctx: autograd context.
            x, weight, bias, a, b, mask, scale: see :func:`masked_lora_linear`.
        Returns:
            ``[..., out_features]`` in ``x.dtype``.
        Raises:
            Nothing of its own.
        """
        w_eff = effective_weight(weight, a.to(weight.dtype), b.to(weight.dtype), mask, scale)
        ctx.save_for_backward(x, weight, a, b, mask)
        ctx.scale = scale
        return torch.nn.functional.linear(x, w_eff.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        """Gradients of ``x``, ``A`` and ``B`` (see the module docstring); W, bias, M and s get None.

        Args:
            ctx: autograd context with the saved ``x, W, A, B, M`` and ``scale``.
            grad_out: ``∂L/∂y``, ``[..., out_features]``.
        Returns:
            ``(∂x [..., in] in x.dtype, None, None, ∂A [r, in], ∂B [out, r], None, None)``; ``∂A``/``∂B``
            in ``A``'s dtype, each None when not required.
        Raises:
            Nothing of its own.
        """
        x, weight, a, b, mask = ctx.saved_tensors
        s = ctx.scale
        grad_x = grad_a = grad_b = None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            w_eff = effective_weight(weight, a.to(weight.dtype), b.to(weight.dtype), mask, s)
            grad_x = (g2 @ w_eff.to(g2.dtype)).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            x2 = x.reshape(-1, x.shape[-1])
            g = (g2.t().to(a.dtype) @ x2.to(a.dtype)).mul_(mask.to(a.dtype))  # [out, in]
            if ctx.needs_input_grad[3]:
                grad_a = (b.t() @ g).mul_(s)
            if ctx.needs_input_grad[4]:
                grad_b = (g @ a.t()).mul_(s)
        return grad_x, None, None, grad_a, grad_b, None, None


def masked_lora_branch(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """The adapter's own contribution ``x·(s·(B A) ⊙ M)ᵀ``, computed in ``a``'s dtype (float32).

    Plain autograd (gradients for ``x``, ``a`` and ``b``); the caller adds it to the base layer's output,
    so the update never passes through the rounding of a reduced-precision W.

    Args:
        x: input, ``[..., in_features]``.
        a: LoRA ``A``, ``[r, in_features]``.
        b: LoRA ``B``, ``[out_features, r]``.
        mask: keep-mask ``M``, ``[out_features, in_features]``.
        scale: adapter scale ``s``.
    Returns:
        ``[..., out_features]`` in ``a.dtype``.
    Raises:
        Nothing of its own.
    """
    delta = (b @ a).mul(scale) * mask.to(a.dtype)
    return torch.nn.functional.linear(x.to(a.dtype), delta)


def masked_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                       b: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``x·(W + s·((B A) ⊙ M))ᵀ + bias`` with gradients for ``x``, ``a`` and ``b`` only.

    The masked LoRA map of LoSA (Huang et al., ICLR 2025, "Dynamic Low-Rank Sparse Adaptation"): the
    update ``ΔW = (B·A) ⊙ M`` stays inside the sparsity pattern, so it merges into W exactly.

    Args:
        x: input, ``[..., in_features]``.
        weight: frozen base weight ``W``, ``[out_features, in_features]`` (receives no gradient).
        bias: ``[out_features]`` or None (receives no gradient).
        a: LoRA ``A``, ``[r, in_features]`` (usually float32).
        b: LoRA ``B``, ``[out_features, r]``.
        mask: keep-mask ``M``, ``[out_features, in_features]``, bool.
        scale: adapter scale ``s = alpha / r_max``.
    Returns:
        ``[..., out_features]`` in ``x.dtype``.
    Raises:
        Nothing of its own (mismatched shapes surface as torch's ``RuntimeError``).
    """
    return MaskedLoRAFunction.apply(x, weight, bias, a, b, mask, scale)
