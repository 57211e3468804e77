"""Single-token attention for decode: grouped-query attention without repeating the KV cache.

A decode step attends one query token per head to every cached key. With grouped-query attention (GQA: ``G``
query heads share each key/value head, e.g. SmolLM2's 9 query / 3 KV heads) transformers' ``sdpa`` path
repeats the key and value cache ``G`` times before ``scaled_dot_product_attention`` whenever the step is
compiled (its un-repeated form is eager-only), so a compiled step with a static cache copies
``2 · G · cache_len · head_dim`` floats per layer and token, and the CPU flash kernel then works on the
copies. Here the ``G`` query heads of a KV head form the rows of one small matrix product instead::

    q: [B, H_kv, G, D]   (the step's [B, H_q, 1, D] query, query head h = kv head h // G, as repeat_kv)
    scores = q · Kᵀ · scaling          [B, H_kv, G, S]   (+ mask, softmax in float32)
    out    = softmax(scores) · V       [B, H_kv, G, D] -> [B, 1, H_q, D]

which is the same attention (Vaswani et al. 2017, eq. 1, with GQA of Ainslie et al. 2023) without the copies.
float32 and bf16 steps on the CPU run the compiled kernel (``csrc/decode_attention.cpp``: the same two
products as dot products over the attended cache positions only, scores, probabilities and sums in float32, a
bf16 output rounded once; a static cache's unused slots cost nothing) where it is built and the mask is boolean
or absent. Elsewhere float32 steps run these two products with torch, and bf16 / fp16 steps pass the grouped
query to ``scaled_dot_product_attention``, which keeps scores in float32 but rounds the exponentiated scores to
bf16 before multiplying by V: the kernel is at least as accurate, not bit-identical, and much faster at one query
token (benchmarks/results/decode_attention.md).
Every other call (prompts, several query tokens, dropout, soft-capping, attention sinks, position biases,
per-head masks) goes to transformers' own ``sdpa`` function unchanged.

:func:`use_decode_attention` switches a model that uses ``sdpa`` to this function (name
:data:`ATTENTION_NAME`, registered with transformers' ``AttentionInterface`` together with the ``sdpa`` mask);
:class:`~losa.inference.decode.LeanDecoder` does so for every model it decodes. Measured before/after:
benchmarks/bench_decode.py ``--with-sdpa``, benchmarks/results/decode.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from losa.inference import kernel as _kernel

#: the name under which :func:`decode_attention` is registered with transformers' attention interface
ATTENTION_NAME = "losa_decode"
#: the compiled kernel's ISA level for float32 and bf16 steps, None: torch products / SDPA (set by
#: :func:`use_decode_attention`
#: outside any traced code, so a compiled step reads a plain value)
_KERNEL: dict[str, int | None] = {"isa": None}


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of one query token per head over the cache, with GQA groups as matrix rows (no repeated KV).

    The signature is transformers' attention-function interface (as ``sdpa_attention_forward``).

    Args:
        module: the attention module (``num_key_value_groups`` = query heads per KV head, 1 if absent).
        query: ``[B, H_q, T, D]`` (float32 and bf16: the compiled kernel where built, else two matrix products /
            torch's SDPA; fp16: torch's SDPA).
        key: ``[B, H_kv, S, D]`` (the whole cache, static or dynamic).
        value: ``[B, H_kv, S, D]``.
        attention_mask: None, boolean ``[B, 1, T, S]`` (True = attend) or additive float ``[B, 1, T, S]``.
        dropout: attention dropout probability (only 0 takes the decode path).
        scaling: score scale (None: ``1 / sqrt(D)``).
        is_causal: passed on to ``sdpa`` (irrelevant for one query token).
        **kwargs: passed on to ``sdpa`` (``softcap``, ``s_aux``, ``position_bias`` select it).

    Returns:
        ``(attn_output [B, T, H_q, D], None)``, as transformers' attention functions.

    Raises:
        ValueError: from transformers' ``sdpa`` for options it does not support (e.g. ``softcap``).
    """
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    mask_ok = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1)
    if (t != 1 or dropout or hq % hkv or not mask_ok or key.shape[-1] != value.shape[-1]
            or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
            or kwargs.get("position_bias") is not None):
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       is_causal=is_causal, **kwargs)
    q = query.reshape(b, hkv, hq // hkv, d)  # [B, H_kv, G, D]
    if _KERNEL["isa"] is not None and query.dtype in (torch.float32, torch.bfloat16) \
            and key.dtype == value.dtype == query.dtype \
            and query.device.type == key.device.type == value.device.type == "cpu" \
            and (attention_mask is None or attention_mask.dtype == torch.bool):
        # the compiled kernel: dot products over the attended cache positions only, no BLAS call per product
        keep = None if attention_mask is None else attention_mask.expand(b, 1, 1, key.shape[2]).reshape(b, -1)
        out = _kernel.decode_attn_op()(q, key, value, keep, scaling if scaling is not None else 1.0 / math.sqrt(d),
                                       _KERNEL["isa"])
    elif query.dtype != torch.float32:
        # bf16 / fp16: torch's kernel keeps scores and probabilities in float32 (a matmul here would round them)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
    else:
        scores = torch.matmul(q, key.transpose(-1, -2)) * (scaling if scaling is not None else 1.0 / math.sqrt(d))
        if attention_mask is not None:  # [B, 1, 1, S] broadcasts over heads and groups
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, float("-inf"))
            else:
                scores = scores + attention_mask
        # a fully masked row attends to nothing: 0, as sdpa (softmax of all -inf is NaN); a NaN score elsewhere
        # stays NaN, as in sdpa and the kernel
        probs = torch.softmax(scores, dim=-1)  # [B, H_kv, G, S]
        probs = probs.masked_fill((scores == float("-inf")).all(-1, keepdim=True), 0.0)
        out = torch.matmul(probs, value)  # [B, H_kv, G, D]
    return out.reshape(b, hq, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, decode_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_decode_attention(model: nn.Module) -> bool:
    """Make a model that attends with ``sdpa`` use :func:`decode_attention` (a lasting change to the model).

    Models with another attention implementation (``eager``, flash, flex, a user's own) are left alone.

    Args:
        model: a transformers ``PreTrainedModel``.

    Returns:
        Whether the model now uses :data:`ATTENTION_NAME` (True also when it already did).
    """
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    # the compiled kernel when it is already built (sparse models build it; a dense model keeps torch's paths)
    _KERNEL["isa"] = _kernel.best_isa() if _kernel.decode_attn_op() is not None else None
    if impl == ATTENTION_NAME:
        return True
    if impl != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    _register()
    model.set_attn_implementation(ATTENTION_NAME)  # may only warn (a model that cannot switch)
    return getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME
