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
"""

from __future__ import annotations

import torch


def effective_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """``W + s·((B A) ⊙ M)`` in W's dtype; zero wherever both W and M are zero."""
    delta = (b @ a).mul_(scale).to(weight.dtype)
    return torch.addcmul(weight, delta, mask.to(weight.dtype))


class MaskedLoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        w_eff = effective_weight(weight, a.to(weight.dtype), b.to(weight.dtype), mask, scale)
        ctx.save_for_backward(x, weight, a, b, mask)
        ctx.scale = scale
        return torch.nn.functional.linear(x, w_eff.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
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


def masked_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                       b: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``x·(W + s·((B A) ⊙ M))ᵀ + bias`` with gradients for ``x``, ``a`` and ``b`` only."""
    return MaskedLoRAFunction.apply(x, weight, bias, a, b, mask, scale)
